// The backward of a LoRA delta `s B (A x)` in adaptation, for the rows of a training pass
// (its forward is `lora.cu`'s kernel with no `y`): the gradients of x, A and B in two
// launches. Composed from candle's ops the same is about a dozen launches per projection
// (two products' gradients, the broadcast factors' sums, the scale, and each gradient's
// zero-fill and add).
//
// x is (rows, in), A (rank, in), B (outs, rank), g the delta's gradient (rows, outs). With
// h = A x and dh = s B^T g per row: dx = A^T dh, dA = sum over rows of dh x^T, dB = s times
// the sum over rows of g h^T. Sums in f32, in a fixed order (no atomics: the same pass gives
// the same bits every run).
#include "common.cuh"

#define THREADS 256
#define MAX_RANK 64

// Block per row: h and dh (f32, (rows, rank), for the columns pass) and the row's dx. A warp
// per rank component, lanes over the input (h, reduced as `lora.cu` reduces it, so h is the
// forward's) and over the outputs (dh).
template <typename T>
__device__ void lora_bwd_rows(const T *x, const T *a, const T *b, const T *g, float scale,
                              float *h, float *dh, T *dx, int in, int outs, int rank) {
    __shared__ float dhs[MAX_RANK];
    const int64_t r = blockIdx.x;
    const T *xr = x + r * in, *gr = g + r * outs;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int k = warp; k < rank; k += THREADS / 32) {
        float acc = 0.f, dacc = 0.f;
        for (int i = lane; i < in; i += 32) acc += to_f(a[(int64_t)k * in + i]) * to_f(xr[i]);
        for (int j = lane; j < outs; j += 32) dacc += to_f(b[(int64_t)j * rank + k]) * to_f(gr[j]);
        for (int o = 16; o > 0; o >>= 1) {
            acc += __shfl_down_sync(0xffffffff, acc, o);
            dacc += __shfl_down_sync(0xffffffff, dacc, o);
        }
        if (lane == 0) {
            h[r * rank + k] = acc;
            dh[r * rank + k] = scale * dacc;
            dhs[k] = scale * dacc;
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < in; i += THREADS) {
        float acc = 0.f;
        for (int k = 0; k < rank; k++) acc += to_f(a[(int64_t)k * in + i]) * dhs[k];
        put(dx, r * in + i, acc);
    }
}

// A thread per element of dA (rank, in), then of dB (outs, rank), each summing over the rows
// in order.
template <typename T>
__device__ void lora_bwd_cols(const T *x, const T *g, const float *h, const float *dh,
                              float scale, T *da, T *db, int64_t rows, int in, int outs,
                              int rank) {
    const int64_t e = (int64_t)blockIdx.x * THREADS + threadIdx.x;
    const int64_t na = (int64_t)rank * in, nb = (int64_t)outs * rank;
    if (e < na) {
        const int64_t k = e / in, i = e - k * in;
        float acc = 0.f;
        for (int64_t r = 0; r < rows; r++) acc += dh[r * rank + k] * to_f(x[r * in + i]);
        put(da, e, acc);
    } else if (e < na + nb) {
        const int64_t f = e - na, j = f / rank, k = f - j * rank;
        float acc = 0.f;
        for (int64_t r = 0; r < rows; r++) acc += to_f(g[r * outs + j]) * h[r * rank + k];
        put(db, f, scale * acc);
    }
}

#define LORA_BWD(SUFFIX, T)                                                                    \
    extern "C" __global__ void lora_bwd_rows_##SUFFIX(const T *x, const T *a, const T *b,      \
                                                      const T *g, float scale, float *h,       \
                                                      float *dh, T *dx, int in, int outs,      \
                                                      int rank) {                              \
        lora_bwd_rows<T>(x, a, b, g, scale, h, dh, dx, in, outs, rank);                        \
    }                                                                                          \
    extern "C" __global__ void lora_bwd_cols_##SUFFIX(const T *x, const T *g, const float *h,  \
                                                      const float *dh, float scale, T *da,     \
                                                      T *db, int64_t rows, int in, int outs,   \
                                                      int rank) {                              \
        lora_bwd_cols<T>(x, g, h, dh, scale, da, db, rows, in, outs, rank);                    \
    }
LORA_BWD(f32, float)
LORA_BWD(bf16, __nv_bfloat16)
