// Adaptation's RMS norm (f32 or bf16 operands) and gated activation on the GPU, each one launch forward and one
// backward, where candle's composed ops take about six launches forward and a dozen backward
// per norm (`model/kernels/fused/` holds the same ops for the CPU, and the reference math).
// Sums are in f32 in a fixed order (one block per row, a fixed tree), so a pass gives the
// same bits run after run.
#include "common.cuh"

#define THREADS 256

// y = x / rms(x) * w, one block per row of `n`, in f32 whatever the operands hold.
template <typename T>
__device__ void rms_norm_fwd_t(const T *x, const T *w, T *y, int n, float eps) {
    const T *xr = x + (int64_t)blockIdx.x * n;
    T *yr = y + (int64_t)blockIdx.x * n;
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += THREADS) ss += to_f(xr[i]) * to_f(xr[i]);
    const float r = 1.0f / sqrtf(block_sum<THREADS>(ss) / n + eps);
    for (int i = threadIdx.x; i < n; i += THREADS) put(yr, i, to_f(xr[i]) * r * to_f(w[i]));
}

// out[0] = dx = r (g w) - x r^3 / n * sum(g w x); out[1] = each row's g x r (dw is their sum
// over rows, taken after, in a fixed order). `rows` rows of `n`; `out` is f32 for any operands.
template <typename T>
__device__ void rms_norm_bwd_t(const T *x, const T *w, const T *g, float *out, int64_t rows,
                               int n, float eps) {
    const int64_t o = (int64_t)blockIdx.x * n;
    const T *xr = x + o, *gr = g + o;
    float ss = 0.f, s = 0.f;
    for (int i = threadIdx.x; i < n; i += THREADS) {
        const float xi = to_f(xr[i]);
        ss += xi * xi;
        s += to_f(gr[i]) * to_f(w[i]) * xi;
    }
    ss = block_sum<THREADS>(ss);
    s = block_sum<THREADS>(s);
    const float r = 1.0f / sqrtf(ss / n + eps);
    const float c = s * r * r * r / n;
    float *dx = out + o, *dw = out + rows * n + o;
    for (int i = threadIdx.x; i < n; i += THREADS) {
        const float xi = to_f(xr[i]), gi = to_f(gr[i]);
        dx[i] = r * gi * to_f(w[i]) - c * xi;
        dw[i] = gi * xi * r;
    }
}

extern "C" __global__ void rms_norm_fwd(const float *x, const float *w, float *y, int n,
                                        float eps) {
    rms_norm_fwd_t<float>(x, w, y, n, eps);
}
extern "C" __global__ void rms_norm_fwd_bf16(const __nv_bfloat16 *x, const __nv_bfloat16 *w,
                                             __nv_bfloat16 *y, int n, float eps) {
    rms_norm_fwd_t<__nv_bfloat16>(x, w, y, n, eps);
}
extern "C" __global__ void rms_norm_bwd(const float *x, const float *w, const float *g,
                                        float *out, int64_t rows, int n, float eps) {
    rms_norm_bwd_t<float>(x, w, g, out, rows, n, eps);
}
extern "C" __global__ void rms_norm_bwd_bf16(const __nv_bfloat16 *x, const __nv_bfloat16 *w,
                                             const __nv_bfloat16 *g, float *out, int64_t rows,
                                             int n, float eps) {
    rms_norm_bwd_t<__nv_bfloat16>(x, w, g, out, rows, n, eps);
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

template <typename T>
__device__ void swiglu_fwd(const T *a, const T *b, T *y, int64_t len) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (int64_t)gridDim.x * blockDim.x) {
        const float av = to_f(a[i]);
        put(y, i, av * sigmoid(av) * to_f(b[i]));
    }
}

// out[0] = da = g b silu'(a), out[1] = db = g silu(a); `len` elements each.
template <typename T>
__device__ void swiglu_bwd(const T *a, const T *b, const T *g, T *out, int64_t len) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < len;
         i += (int64_t)gridDim.x * blockDim.x) {
        const float av = to_f(a[i]), gv = to_f(g[i]);
        const float sg = sigmoid(av);
        put(out, i, gv * to_f(b[i]) * sg * (1.0f + av * (1.0f - sg)));
        put(out, len + i, gv * av * sg);
    }
}

extern "C" __global__ void swiglu_fwd_f32(const float *a, const float *b, float *y, int64_t len) {
    swiglu_fwd<float>(a, b, y, len);
}
extern "C" __global__ void swiglu_fwd_bf16(const __nv_bfloat16 *a, const __nv_bfloat16 *b,
                                           __nv_bfloat16 *y, int64_t len) {
    swiglu_fwd<__nv_bfloat16>(a, b, y, len);
}
extern "C" __global__ void swiglu_bwd_f32(const float *a, const float *b, const float *g,
                                          float *out, int64_t len) {
    swiglu_bwd<float>(a, b, g, out, len);
}
extern "C" __global__ void swiglu_bwd_bf16(const __nv_bfloat16 *a, const __nv_bfloat16 *b,
                                           const __nv_bfloat16 *g, __nv_bfloat16 *out,
                                           int64_t len) {
    swiglu_bwd<__nv_bfloat16>(a, b, g, out, len);
}

// Rotary embedding, rotate-half layout: x (rows of d, position = row % t), cos/sin (t, d/2).
// sign -1 rotates back (the backward).
extern "C" __global__ void rope_f32(const float *x, const float *cos, const float *sin, float *y,
                                    int64_t rows, int t, int d, float sign) {
    const int half = d / 2;
    const int64_t pairs = rows * half;
    for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < pairs;
         j += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = j / half;
        const int i = (int)(j % half);
        const int64_t p = (row % t) * half + i;
        const float c = cos[p], s = sign * sin[p];
        const float a = x[row * d + i], b = x[row * d + i + half];
        y[row * d + i] = a * c - b * s;
        y[row * d + i + half] = b * c + a * s;
    }
}

// Softmax over rows of n, one block per row.
extern "C" __global__ void softmax_fwd_f32(const float *x, float *y, int n) {
    const float *xr = x + (int64_t)blockIdx.x * n;
    float *yr = y + (int64_t)blockIdx.x * n;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < n; i += THREADS) m = fmaxf(m, xr[i]);
    m = block_max<THREADS>(m);
    float sum = 0.f;
    for (int i = threadIdx.x; i < n; i += THREADS) {
        const float e = expf(xr[i] - m);
        yr[i] = e;
        sum += e;
    }
    const float inv = 1.0f / block_sum<THREADS>(sum);
    for (int i = threadIdx.x; i < n; i += THREADS) yr[i] *= inv;
}

// dx = y (g - sum(g y)) over rows of n, one block per row.
extern "C" __global__ void softmax_bwd_f32(const float *y, const float *g, float *dx, int n) {
    const int64_t o = (int64_t)blockIdx.x * n;
    float s = 0.f;
    for (int i = threadIdx.x; i < n; i += THREADS) s += g[o + i] * y[o + i];
    s = block_sum<THREADS>(s);
    for (int i = threadIdx.x; i < n; i += THREADS) dx[o + i] = y[o + i] * (g[o + i] - s);
}
