// A LoRA delta added to a projection's output in one launch, for the rows of a decode step
// or every position of a prefill chunk: y' = y + s_i B_i (A_i x) for row i, each row with its
// own adapter (as Punica's BGMV and S-LoRA's gathered kernels do) or all rows with one. Composed from candle's ops that is
// two products, a scale and an add per projection. One block per row: the rank-r "shrink"
// A x into shared memory, then the "expand" B h added to y. Sums in f32, in a fixed order.
//
// A is (rank, in) per adapter, B (out, rank); `a_stride`/`b_stride` step from one row's
// adapter to the next (0: every row shares one); `scales` holds a scale per row, or is null
// and `scale` serves every row. `y_stride` steps from one row of `y` to the next, so `y` may
// be a part of a joint product read where it lies; `out` is contiguous. A null `y` adds to
// zero: the delta alone (adaptation's forward, `lora_training.cu`).
#include "common.cuh"

#define THREADS 256
#define MAX_RANK 64

template <typename T>
__device__ void lora_add(const T *y, const T *x, const T *a, const T *b, const float *scales,
                         float scale, T *out, int in, int outs, int rank, int64_t a_stride,
                         int64_t b_stride, int64_t y_stride) {
    __shared__ float h[MAX_RANK];
    const int64_t r = blockIdx.x;
    const T *xr = x + r * in;
    const T *ar = a + r * a_stride;
    const T *br = b + r * b_stride;
    const float s = scales != nullptr ? scales[r] : scale;
    // Shrink: one warp per rank component at a time, lanes over the input.
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int k = warp; k < rank; k += THREADS / 32) {
        float acc = 0.f;
        for (int i = lane; i < in; i += 32) acc += to_f(ar[(int64_t)k * in + i]) * to_f(xr[i]);
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffff, acc, o);
        if (lane == 0) h[k] = acc;
    }
    __syncthreads();
    // Expand and add.
    for (int j = threadIdx.x; j < outs; j += THREADS) {
        float acc = 0.f;
        for (int k = 0; k < rank; k++) acc += to_f(br[(int64_t)j * rank + k]) * h[k];
        const float base = y != nullptr ? to_f(y[r * y_stride + j]) : 0.f;
        put(out, r * outs + j, base + s * acc);
    }
}

#define LORA_ADD(NAME, T)                                                                      \
    extern "C" __global__ void NAME(const T *y, const T *x, const T *a, const T *b,            \
                                    const float *scales, float scale, T *out, int in, int outs, \
                                    int rank, int64_t a_stride, int64_t b_stride,              \
                                    int64_t y_stride) {                                        \
        lora_add<T>(y, x, a, b, scales, scale, out, in, outs, rank, a_stride, b_stride,        \
                    y_stride);                                                                 \
    }
LORA_ADD(lora_add_f32, float)
LORA_ADD(lora_add_bf16, __nv_bfloat16)

// Block i copies span i of `spans` (three int64 each: source address, destination address,
// bytes): a joining row's factors and a batch's new scales written into a step graph's stacks,
// every projection's in one launch instead of a copy each (`Gathered::restack`).
extern "C" __global__ void lora_restack(const int64_t *spans, int n) {
    if ((int)blockIdx.x >= n) return;
    const int64_t *s = spans + 3 * (int64_t)blockIdx.x;
    const unsigned char *src = (const unsigned char *)s[0];
    unsigned char *dst = (unsigned char *)s[1];
    for (int64_t i = threadIdx.x; i < s[2]; i += THREADS) dst[i] = src[i];
}
