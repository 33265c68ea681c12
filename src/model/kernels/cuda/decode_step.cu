// A decode step's small neighbouring ops fused, so that a step launches about half the kernels
// it did (a replayed graph pays per node, an eager step per launch):
// - `rope_cache_write`: the query, key and value of one position per row, cut from their
//   projections' outputs where they lie (row strides), rotated (q, k) and the key and value
//   written into the row's cache at the position read on the device. Composed, that is a copy
//   per part, two rotary launches and `kv_write`.
// - `add_rms_norm`: the residual add and the next RMS norm, both results written (two ops).
// - `swiglu_joint`: silu(gate) * up read from the joint gate/up product (silu and a product,
//   each reading a strided half).
// Sums are in f32 in a fixed order, one rounding to the stored type per result. The composed
// candle ops are the reference (`ttarag bench --kernels`); the CPU runs those ops.
#include "common.cuh"

#define THREADS 128
#define NORM_THREADS 256

// Block (head, row). Heads below `heads` are query heads: rotated into `q_out`
// `(rows, heads, 1, d)`. The next `kv_heads` are KV heads: the rotated key and the value
// written into the row's cache (table as in decode_attention.cu: addresses, strides, capacity,
// position address), nothing where the position is past the capacity. `cos`/`sin` hold each
// row's angles, `(rows, d / 2)`.
template <typename T>
__device__ void rope_cache_write(const T *q, const T *k, const T *v, int64_t q_rs, int64_t k_rs,
                                 int64_t v_rs, const T *cos, const T *sin, const int64_t *table,
                                 T *q_out, int heads, int d) {
    const int h = blockIdx.x, r = blockIdx.y, half = d / 2;
    const T *c = cos + (int64_t)r * half, *s = sin + (int64_t)r * half;
    if (h < heads) {
        const T *x = q + r * q_rs + (int64_t)h * d;
        T *y = q_out + ((int64_t)r * heads + h) * d;
        for (int i = threadIdx.x; i < half; i += THREADS) {
            const float a = to_f(x[i]), b = to_f(x[i + half]), ci = to_f(c[i]), si = to_f(s[i]);
            put(y, i, a * ci - b * si);
            put(y, i + half, b * ci + a * si);
        }
        return;
    }
    const int kh = h - heads;
    const int64_t *t = table + 8 * r;
    const int64_t p = *(const unsigned int *)t[7];
    if (p >= t[6]) return;
    T *kc = (T *)t[0] + kh * t[2] + p * t[3];
    T *vc = (T *)t[1] + kh * t[4] + p * t[5];
    const T *kx = k + r * k_rs + (int64_t)kh * d;
    const T *vx = v + r * v_rs + (int64_t)kh * d;
    for (int i = threadIdx.x; i < half; i += THREADS) {
        const float a = to_f(kx[i]), b = to_f(kx[i + half]), ci = to_f(c[i]), si = to_f(s[i]);
        put(kc, i, a * ci - b * si);
        put(kc, i + half, b * ci + a * si);
        vc[i] = vx[i];
        vc[i + half] = vx[i + half];
    }
}

#define ROPE_CACHE_WRITE(NAME, T)                                                              \
    extern "C" __global__ void NAME(const T *q, const T *k, const T *v, int64_t q_rs,           \
                                    int64_t k_rs, int64_t v_rs, const T *cos, const T *sin,     \
                                    const int64_t *table, T *q_out, int heads, int d) {         \
        rope_cache_write<T>(q, k, v, q_rs, k_rs, v_rs, cos, sin, table, q_out, heads, d);       \
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
