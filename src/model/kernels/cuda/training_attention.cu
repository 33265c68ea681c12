// Adaptation's causal self-attention with rotary embedding on the GPU, the CUDA body of
// `fused::causal_attention` (whose CPU body is the reference): from the projections' outputs
// `q` (b, t, heads * d), `k`, `v` (b, t, kv * d) to the heads' values (b, t, heads * d), and its
// backward, f32 or bf16 operands with f32 arithmetic. Composed from candle's ops the same is about fifteen launches forward and
// thirty backward per block (copies to split the heads, rotary, scale, two products, mask,
// softmax, and their gradients); here two forward and three backward.
//
// Every sum runs in a fixed order (warp reductions by xor shuffles, loops in index order) and
// no kernel adds into memory another thread also adds to, so a pass gives the same bits on
// every run: an adapted answer at temperature 0 must not change from one run to the next.
// One warp per query row (forward, backward rows) or per key row (backward columns).
#include "common.cuh"

#define WARPS 4

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// Block (head, position, sequence): row `x` (b, t, heads * d) rotated by its position's angles
// into `out` (b, heads, t, d), f32 whatever `x` holds. cos/sin: (>= t, d / 2).
template <typename T>
__device__ void attn_rotate(const T *x, const float *cos, const float *sin, float *out, int t,
                            int heads, int d) {
    const int h = blockIdx.x, i = blockIdx.y, bi = blockIdx.z, half = d / 2;
    const T *xr = x + (((int64_t)bi * t + i) * heads + h) * d;
    float *o = out + (((int64_t)bi * heads + h) * t + i) * d;
    for (int c = threadIdx.x; c < half; c += blockDim.x) {
        const float co = cos[i * half + c], si = sin[i * half + c];
        const float a = to_f(xr[c]), b = to_f(xr[c + half]);
        o[c] = a * co - b * si;
        o[c + half] = b * co + a * si;
    }
}

// Query row i's softmax over keys 0..=i into `p` (normalised), from the rotated query `q`
// (already scaled) and the rotated keys `kg` (t, d) of its KV head. Lanes over keys.
__device__ void row_probs(const float *q, const float *kg, float *p, int i, int d) {
    const int lane = threadIdx.x % 32;
    float m = -INFINITY;
    for (int j = lane; j <= i; j += 32) {
        const float *kj = kg + (int64_t)j * d;
        float s = 0.f;
        for (int c = 0; c < d; c++) s += q[c] * kj[c];
        p[j] = s;
        m = fmaxf(m, s);
    }
    m = warp_max(m);
    float sum = 0.f;
    for (int j = lane; j <= i; j += 32) {
        const float e = expf(p[j] - m);
        p[j] = e;
        sum += e;
    }
    const float inv = 1.0f / warp_sum(sum);
    for (int j = lane; j <= i; j += 32) p[j] *= inv;
    __syncwarp();
}

// Warp (head, sequence, row i): y_i = softmax(scale q_i K^T) V. Dynamic shared memory per
// warp: d + t floats.
template <typename T>
__device__ void attn_fwd(const float *qr, const float *kr, const T *v, T *y, int t, int heads,
                         int kv, int d, float scale) {
    extern __shared__ float sh[];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int h = blockIdx.x, bi = blockIdx.y, i = blockIdx.z * WARPS + warp;
    if (i >= t) return;
    const int g = h / (heads / kv);
    float *q = sh + warp * (d + t), *p = q + d;
    const float *qi = qr + (((int64_t)bi * heads + h) * t + i) * d;
    for (int c = lane; c < d; c += 32) q[c] = qi[c] * scale;
    __syncwarp();
    row_probs(q, kr + ((int64_t)bi * kv + g) * t * d, p, i, d);
    T *yi = y + (((int64_t)bi * t + i) * heads + h) * d;
    for (int c = lane; c < d; c += 32) {
        float acc = 0.f;
        for (int j = 0; j <= i; j++)
            acc += p[j] * to_f(v[(((int64_t)bi * t + j) * kv + g) * d + c]);
        put(yi, c, acc);
    }
}

// Warp (head, sequence, row i) of the backward: recomputes p_i, then dp_j = dy_i . v_j,
// ds_j = p_j (dp_j - sum p dp) scale (stored with p_j, rows (b, heads, t, t), for the columns
// pass), and dq_i = sum_j ds_j k_j rotated back to the input's frame, into `dq`
// (b, t, heads * d). Dynamic shared memory per warp: 2 d + 2 t floats.
template <typename T>
__device__ void attn_bwd_rows(const float *qr, const float *kr, const T *v, const T *dy,
                              const float *cos, const float *sin, float *ds, float *pr, T *dq,
                              int t, int heads, int kv, int d, float scale) {
    extern __shared__ float sh[];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int h = blockIdx.x, bi = blockIdx.y, i = blockIdx.z * WARPS + warp;
    if (i >= t) return;
    const int g = h / (heads / kv), half = d / 2;
    float *q = sh + warp * (2 * d + 2 * t), *g_i = q + d, *p = g_i + d, *dp = p + t;
    const float *qi = qr + (((int64_t)bi * heads + h) * t + i) * d;
    const T *dyi = dy + (((int64_t)bi * t + i) * heads + h) * d;
    for (int c = lane; c < d; c += 32) {
        q[c] = qi[c] * scale;
        g_i[c] = to_f(dyi[c]);
    }
    __syncwarp();
    const float *kg = kr + ((int64_t)bi * kv + g) * t * d;
    row_probs(q, kg, p, i, d);
    float s = 0.f;
    for (int j = lane; j <= i; j += 32) {
        const T *vj = v + (((int64_t)bi * t + j) * kv + g) * d;
        float acc = 0.f;
        for (int c = 0; c < d; c++) acc += g_i[c] * to_f(vj[c]);
        dp[j] = acc;
        s += p[j] * acc;
    }
    s = warp_sum(s);
    const int64_t row = (((int64_t)bi * heads + h) * t + i) * t;
    for (int j = lane; j <= i; j += 32) {
        dp[j] = p[j] * (dp[j] - s) * scale;
        ds[row + j] = dp[j];
        pr[row + j] = p[j];
    }
    __syncwarp();
    // dq in the rotated frame, pair by pair, then rotated back by position i's angles.
    T *dqi = dq + (((int64_t)bi * t + i) * heads + h) * d;
    for (int c = lane; c < half; c += 32) {
        float a = 0.f, b = 0.f;
        for (int j = 0; j <= i; j++) {
            a += dp[j] * kg[(int64_t)j * d + c];
            b += dp[j] * kg[(int64_t)j * d + c + half];
        }
        const float co = cos[i * half + c], si = sin[i * half + c];
        put(dqi, c, a * co + b * si);
        put(dqi, c + half, b * co - a * si);
    }
}

// Warp (KV head, key row j, sequence) of the backward: dk_j = sum over the group's heads and
// rows i >= j of ds_ij q_i, rotated back by position j's angles, and dv_j = sum of p_ij dy_i,
// into `dk`, `dv` (b, t, kv * d).
template <typename T>
__device__ void attn_bwd_cols(const float *qr, const T *dy, const float *cos, const float *sin,
                              const float *ds, const float *pr, T *dk, T *dv, int t, int heads,
                              int kv, int d) {
    const int g = blockIdx.x, j = blockIdx.y, bi = blockIdx.z, lane = threadIdx.x;
    const int rep = heads / kv, half = d / 2;
    const int64_t out = (((int64_t)bi * t + j) * kv + g) * d;
    for (int c = lane; c < half; c += 32) {
        float ka = 0.f, kb = 0.f, va = 0.f, vb = 0.f;
        for (int h = g * rep; h < (g + 1) * rep; h++) {
            const int64_t rows = ((int64_t)bi * heads + h) * t;
            for (int i = j; i < t; i++) {
                const float dsv = ds[(rows + i) * t + j], pv = pr[(rows + i) * t + j];
                const float *qi = qr + (rows + i) * d;
                const T *gi = dy + (((int64_t)bi * t + i) * heads + h) * d;
                ka += dsv * qi[c];
                kb += dsv * qi[c + half];
                va += pv * to_f(gi[c]);
                vb += pv * to_f(gi[c + half]);
            }
        }
        const float co = cos[j * half + c], si = sin[j * half + c];
        put(dk, out + c, ka * co + kb * si);
        put(dk, out + c + half, kb * co - ka * si);
        put(dv, out + c, va);
        put(dv, out + c + half, vb);
    }
}

// The entry points, for f32 and bf16 operands (the rotated copies, scores and sums are f32).
#define ATTN_KERNELS(SUFFIX, T)                                                                \
    extern "C" __global__ void attn_rotate_##SUFFIX(const T *x, const float *cos,              \
                                                    const float *sin, float *out, int t,        \
                                                    int heads, int d) {                         \
        attn_rotate<T>(x, cos, sin, out, t, heads, d);                                          \
    }                                                                                          \
    extern "C" __global__ void attn_fwd_##SUFFIX(const float *qr, const float *kr, const T *v, \
                                                 T *y, int t, int heads, int kv, int d,         \
                                                 float scale) {                                 \
        attn_fwd<T>(qr, kr, v, y, t, heads, kv, d, scale);                                      \
    }                                                                                          \
    extern "C" __global__ void attn_bwd_rows_##SUFFIX(                                         \
        const float *qr, const float *kr, const T *v, const T *dy, const float *cos,            \
        const float *sin, float *ds, float *pr, T *dq, int t, int heads, int kv, int d,         \
        float scale) {                                                                         \
        attn_bwd_rows<T>(qr, kr, v, dy, cos, sin, ds, pr, dq, t, heads, kv, d, scale);          \
    }                                                                                          \
    extern "C" __global__ void attn_bwd_cols_##SUFFIX(                                         \
        const float *qr, const T *dy, const float *cos, const float *sin, const float *ds,      \
        const float *pr, T *dk, T *dv, int t, int heads, int kv, int d) {                       \
        attn_bwd_cols<T>(qr, dy, cos, sin, ds, pr, dk, dv, t, heads, kv, d);                    \
    }
ATTN_KERNELS(f32, float)
ATTN_KERNELS(bf16, __nv_bfloat16)
