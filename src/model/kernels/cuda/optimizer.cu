// The optimiser step of adaptation as three launches, whatever the number of trained tensors:
// `sum_squares_*` (one partial sum per block of CHUNK elements), `norm_scale` (one block
// adds the partials in a fixed order: the same gradients give the same norm, run after run)
// and `adamw_*` (every tensor's update, moments in f32). Composed from candle's ops the same
// step costs several launches per tensor and a host round trip per tensor for the norm.
//
// A block finds its tensor by binary search over `meta`, four int64 per tensor:
// [moment offset, length, first block, unused]. `ptrs` holds two addresses per tensor:
// [weight, gradient]. The CPU reference is `FastAdamW`'s in-place loop (src/adapt/adamw.rs).
#include <cuda_bf16.h>
#include <stdint.h>

#define CHUNK 4096
#define THREADS 256

__device__ __forceinline__ float load(const float *p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16 *p, int64_t i) {
    return __bfloat162float(p[i]);
}
__device__ __forceinline__ void store(float *p, int64_t i, float x) { p[i] = x; }
__device__ __forceinline__ void store(__nv_bfloat16 *p, int64_t i, float x) {
    p[i] = __float2bfloat16(x);
}

// The tensor block `b` belongs to: the last one whose first block is at most `b`.
__device__ __forceinline__ int tensor_of(const int64_t *meta, int n, int64_t b) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (meta[4 * mid + 2] <= b) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// Sum of `s[0..THREADS)` into s[0], in a fixed order.
__device__ __forceinline__ void block_sum(double *s) {
    __syncthreads();
    for (int k = THREADS / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) s[threadIdx.x] += s[threadIdx.x + k];
        __syncthreads();
    }
}

template <typename T>
__device__ void sum_squares(const int64_t *ptrs, const int64_t *meta, int n, double *partial) {
    __shared__ double s[THREADS];
    const int t = tensor_of(meta, n, blockIdx.x);
    const T *g = (const T *)ptrs[2 * t + 1];
    const int64_t len = meta[4 * t + 1];
    const int64_t start = ((int64_t)blockIdx.x - meta[4 * t + 2]) * CHUNK;
    const int64_t end = min(start + (int64_t)CHUNK, len);
    double acc = 0.0;
    for (int64_t i = start + threadIdx.x; i < end; i += THREADS) {
        const double x = load(g, i);
        acc += x * x;
    }
    s[threadIdx.x] = acc;
    block_sum(s);
    if (threadIdx.x == 0) partial[blockIdx.x] = s[0];
}

extern "C" __global__ void sum_squares_f32(const int64_t *ptrs, const int64_t *meta, int n,
                                           double *partial) {
    sum_squares<float>(ptrs, meta, n, partial);
}
extern "C" __global__ void sum_squares_bf16(const int64_t *ptrs, const int64_t *meta, int n,
                                            double *partial) {
    sum_squares<__nv_bfloat16>(ptrs, meta, n, partial);
}

// out[0] = the global L2 norm; out[1] = the gradients' multiplier under clipping at `clip`
// (none when clip <= 0), as the CPU path computes it.
extern "C" __global__ void norm_scale(const double *partial, int64_t blocks, double clip,
                                      double *out) {
    __shared__ double s[THREADS];
    double acc = 0.0;
    for (int64_t i = threadIdx.x; i < blocks; i += THREADS) acc += partial[i];
    s[threadIdx.x] = acc;
    block_sum(s);
    if (threadIdx.x == 0) {
        const double norm = sqrt(s[0]);
        out[0] = norm;
        out[1] = (clip > 0.0 && norm > clip) ? clip / (norm + 1e-6) : 1.0;
    }
}

template <typename T>
__device__ void adamw(const int64_t *ptrs, const int64_t *meta, int n, float *m, float *v,
                      const double *scale_at, float scale, float lr, float b1, float b2,
                      float eps, float decay, float inv_c1, float inv_c2) {
    const int t = tensor_of(meta, n, blockIdx.x);
    T *w = (T *)ptrs[2 * t];
    const T *g = (const T *)ptrs[2 * t + 1];
    const int64_t off = meta[4 * t];
    const int64_t len = meta[4 * t + 1];
    const int64_t start = ((int64_t)blockIdx.x - meta[4 * t + 2]) * CHUNK;
    const int64_t end = min(start + (int64_t)CHUNK, len);
    if (scale_at != nullptr) scale = (float)scale_at[1];
    for (int64_t i = start + threadIdx.x; i < end; i += THREADS) {
        const float gi = load(g, i) * scale;
        const float mi = b1 * m[off + i] + (1.0f - b1) * gi;
        const float vi = b2 * v[off + i] + (1.0f - b2) * gi * gi;
        m[off + i] = mi;
        v[off + i] = vi;
        const float update = (mi * inv_c1) / (sqrtf(vi * inv_c2) + eps);
        store(w, i, load(w, i) * decay - lr * update);
    }
}

#define ADAMW(NAME, T)                                                                        \
    extern "C" __global__ void NAME(const int64_t *ptrs, const int64_t *meta, int n, float *m, \
                                    float *v, const double *scale_at, float scale, float lr,  \
                                    float b1, float b2, float eps, float decay, float inv_c1, \
                                    float inv_c2) {                                           \
        adamw<T>(ptrs, meta, n, m, v, scale_at, scale, lr, b1, b2, eps, decay, inv_c1,        \
                 inv_c2);                                                                     \
    }
ADAMW(adamw_f32, float)
ADAMW(adamw_bf16, __nv_bfloat16)
