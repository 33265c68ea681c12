// A decode step's small neighbouring ops fused, so that a step launches about half the kernels
// it did (a replayed graph pays per node, an eager step per launch):
// - `rope_cache_write`: the query, key and value of one position per row, cut from their
//   projections' outputs where they lie (row strides), each part's LoRA delta added where it
//   has one, rotated (q, k) and the key and value written into the row's cache at the
//   position read on the device. Composed, that is a LoRA add per adapted part, a copy per
//   part, two rotary launches and `kv_write`.
// - `add_rms_norm`: the residual add and the next RMS norm, both results written (two ops).
// - `swiglu_joint`: silu(gate) * up read from the joint gate/up product (silu and a product,
//   each reading a strided half).
// Sums are in f32 in a fixed order, one rounding to the stored type per result. The composed
// candle ops are the reference (`ttarag bench --kernels`); the CPU runs those ops.
#include "common.cuh"

#define THREADS 128
#define NORM_THREADS 256

// A LoRA delta on one of q, k, v, added inside `rope_cache_write` (null `a`: none): row r's
// `scale_r B_r (A_r x_r)`, A `(rank, in)` and B `(outs, rank)` stepping `a_stride`/`b_stride`
// elements from one row's pair to the next (0: one pair for every row), `scales` a scale
// per row or null for `scale`. As `lora.cu` adds it (shrink by a warp per component, lanes
// over the input; expand in component order), so the sum rounded to T is the one the
// LoRA add would have stored: the fused step keeps the bits of the unfused one.
struct LoraPart {
    const void *a;
    const void *b;
    const float *scales;
    int64_t a_stride;
    int64_t b_stride;
    float scale;
    int rank;
};

#define MAX_RANK 64

// `h[k] = A_r x_r` for every component, into shared memory (every thread takes part; the
// caller waits for the block after).
template <typename T>
__device__ void lora_shrink(const LoraPart &p, const T *x, int64_t r, int in, float *h) {
    const T *a = (const T *)p.a + r * p.a_stride;
    const T *xr = x + r * in;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int k = warp; k < p.rank; k += THREADS / 32) {
        float acc = 0.f;
        for (int i = lane; i < in; i += 32) acc += to_f(a[(int64_t)k * in + i]) * to_f(xr[i]);
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffff, acc, o);
        if (lane == 0) h[k] = acc;
    }
}

// Output `j` of row r's part, `y` plus the part's delta when it has one, rounded to T as
// stored between the two launches this replaces.
template <typename T>
__device__ float with_delta(const LoraPart &p, float y, int64_t r, int64_t j, const float *h) {
    if (p.a == nullptr) return y;
    const T *b = (const T *)p.b + r * p.b_stride + j * p.rank;
    float acc = 0.f;
    for (int k = 0; k < p.rank; k++) acc += to_f(b[k]) * h[k];
    const float s = p.scales != nullptr ? p.scales[r] : p.scale;
    return rounded<T>(y + s * acc);
}

// Block (head, row). Heads below `heads` are query heads: rotated into `q_out`
// `(rows, heads, 1, d)`. The next `kv_heads` are KV heads: the rotated key and the value
// written into the row's cache (table as in decode_attention.cu: addresses, strides, capacity,
// position address), nothing where the position is past the capacity. `cos`/`sin` hold each
// row's angles, `(rows, d / 2)`. `lq`, `lk`, `lv`: LoRA deltas on the parts' outputs, read
// from `x` `(rows, in)` (the projections' input).
template <typename T>
__device__ void rope_cache_write(const T *q, const T *k, const T *v, int64_t q_rs, int64_t k_rs,
                                 int64_t v_rs, const T *cos, const T *sin, const int64_t *table,
                                 T *q_out, int heads, int d, const T *x, int in, LoraPart lq,
                                 LoraPart lk, LoraPart lv) {
    __shared__ float h1[MAX_RANK], h2[MAX_RANK];
    const int h = blockIdx.x, r = blockIdx.y, half = d / 2;
    const T *c = cos + (int64_t)r * half, *s = sin + (int64_t)r * half;
    if (h < heads) {
        if (lq.a != nullptr) lora_shrink(lq, x, r, in, h1);
        __syncthreads();
        const T *xq = q + r * q_rs + (int64_t)h * d;
        T *y = q_out + ((int64_t)r * heads + h) * d;
        const int64_t j = (int64_t)h * d;
        for (int i = threadIdx.x; i < half; i += THREADS) {
            const float a = with_delta<T>(lq, to_f(xq[i]), r, j + i, h1);
            const float b = with_delta<T>(lq, to_f(xq[i + half]), r, j + i + half, h1);
            const float ci = to_f(c[i]), si = to_f(s[i]);
            put(y, i, a * ci - b * si);
            put(y, i + half, b * ci + a * si);
        }
        return;
    }
    const int kh = h - heads;
    const int64_t *t = table + 8 * r;
    const int64_t p = *(const unsigned int *)t[7];
    if (p >= t[6]) return;
    if (lk.a != nullptr) lora_shrink(lk, x, r, in, h1);
    if (lv.a != nullptr) lora_shrink(lv, x, r, in, h2);
    __syncthreads();
    T *kc = (T *)t[0] + kh * t[2] + p * t[3];
    T *vc = (T *)t[1] + kh * t[4] + p * t[5];
    const T *kx = k + r * k_rs + (int64_t)kh * d;
    const T *vx = v + r * v_rs + (int64_t)kh * d;
    const int64_t j = (int64_t)kh * d;
    for (int i = threadIdx.x; i < half; i += THREADS) {
        const float a = with_delta<T>(lk, to_f(kx[i]), r, j + i, h1);
        const float b = with_delta<T>(lk, to_f(kx[i + half]), r, j + i + half, h1);
        const float ci = to_f(c[i]), si = to_f(s[i]);
        put(kc, i, a * ci - b * si);
        put(kc, i + half, b * ci + a * si);
        put(vc, i, with_delta<T>(lv, to_f(vx[i]), r, j + i, h2));
        put(vc, i + half, with_delta<T>(lv, to_f(vx[i + half]), r, j + i + half, h2));
    }
}

#define ROPE_CACHE_WRITE(NAME, T)                                                              \
    extern "C" __global__ void NAME(const T *q, const T *k, const T *v, int64_t q_rs,           \
                                    int64_t k_rs, int64_t v_rs, const T *cos, const T *sin,     \
                                    const int64_t *table, T *q_out, int heads, int d,           \
                                    const T *x, int in, LoraPart lq, LoraPart lk,               \
                                    LoraPart lv) {                                              \
        rope_cache_write<T>(q, k, v, q_rs, k_rs, v_rs, cos, sin, table, q_out, heads, d, x, in, \
                            lq, lk, lv);                                                        \
    }
ROPE_CACHE_WRITE(rope_cache_write_f32, float)
ROPE_CACHE_WRITE(rope_cache_write_bf16, __nv_bfloat16)

// One block per row of `n`: out[0] = x + a (rounded to T, as the add stores it), out[1] = its
// RMS norm times `w`, from the stored sum.
template <typename T>
__device__ void add_rms_norm(const T *x, const T *a, const T *w, T *out, int64_t rows, int n,
                             float eps) {
    const int64_t o = (int64_t)blockIdx.x * n;
    T *sum = out + o, *normed = out + rows * n + o;
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += NORM_THREADS) {
        put(sum, i, to_f(x[o + i]) + to_f(a[o + i]));
        const float s = to_f(sum[i]);
        ss += s * s;
    }
    const float r = 1.0f / sqrtf(block_sum<NORM_THREADS>(ss) / n + eps);
    for (int i = threadIdx.x; i < n; i += NORM_THREADS) put(normed, i, to_f(sum[i]) * r * to_f(w[i]));
}

#define ADD_RMS_NORM(NAME, T)                                                                  \
    extern "C" __global__ void NAME(const T *x, const T *a, const T *w, T *out, int64_t rows,   \
                                    int n, float eps) {                                         \
        add_rms_norm<T>(x, a, w, out, rows, n, eps);                                            \
    }
ADD_RMS_NORM(add_rms_norm_f32, float)
ADD_RMS_NORM(add_rms_norm_bf16, __nv_bfloat16)

// out[r, i] = silu(gu[r, i]) * gu[r, n + i] for `rows` rows of the joint product `(rows, 2n)`.
template <typename T>
__device__ void swiglu_joint(const T *gu, T *out, int64_t rows, int n) {
    const int64_t len = rows * n;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = i / n, j = i - r * n;
        const float g = to_f(gu[2 * r * n + j]), u = to_f(gu[2 * r * n + n + j]);
        put(out, i, g / (1.0f + expf(-g)) * u);
    }
}

#define SWIGLU_JOINT(NAME, T)                                                                  \
    extern "C" __global__ void NAME(const T *gu, T *out, int64_t rows, int n) {                 \
        swiglu_joint<T>(gu, out, rows, n);                                                      \
    }
SWIGLU_JOINT(swiglu_joint_f32, float)
SWIGLU_JOINT(swiglu_joint_bf16, __nv_bfloat16)
