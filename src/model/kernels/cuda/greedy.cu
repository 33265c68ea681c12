// A decode step's greedy pick (`greedy.rs`): for each row of logits, the most likely token
// (the lowest index among equal maxima; a NaN never wins) and its log-probability,
// `x[id] - max - log(sum exp(x - max))` with the sum in f64, written as two f64 per row.
// One block per row, reduced in a fixed order, so the same logits give the same bits.
#include "common.cuh"

#define THREADS 256

template <typename T>
__device__ void greedy_row(const T *logits, int64_t vocab, double *out) {
    __shared__ float best[THREADS];
    __shared__ int64_t best_at[THREADS];
    __shared__ double sums[THREADS];
    const int tid = threadIdx.x;
    const T *x = logits + (int64_t)blockIdx.x * vocab;
    // Each thread's best over its stride (ascending indices: the first of equals stays).
    float v = -INFINITY;
    int64_t at = vocab;
    for (int64_t i = tid; i < vocab; i += THREADS) {
        const float xi = to_f(x[i]);
        if (xi > v || (xi == v && i < at)) {
            v = xi;
            at = i;
        }
    }
    best[tid] = v;
    best_at[tid] = at;
    __syncthreads();
    for (int k = THREADS / 2; k > 0; k >>= 1) {
        if (tid < k) {
            const float o = best[tid + k];
            const int64_t oi = best_at[tid + k];
            if (o > best[tid] || (o == best[tid] && oi < best_at[tid])) {
                best[tid] = o;
                best_at[tid] = oi;
            }
        }
        __syncthreads();
    }
    const double top = best[0];
    double s = 0.0;
    for (int64_t i = tid; i < vocab; i += THREADS) s += exp((double)to_f(x[i]) - top);
    sums[tid] = s;
    __syncthreads();
    for (int k = THREADS / 2; k > 0; k >>= 1) {
        if (tid < k) sums[tid] += sums[tid + k];
        __syncthreads();
    }
    if (tid == 0) {
        // Every logit NaN: token 0, whose log-probability is then NaN.
        const int64_t id = best_at[0] < vocab ? best_at[0] : 0;
        out[2 * (int64_t)blockIdx.x] = (double)id;
        out[2 * (int64_t)blockIdx.x + 1] = (double)to_f(x[id]) - top - log(sums[0]);
    }
}

extern "C" __global__ void greedy_pick_f32(const float *logits, int64_t vocab, double *out) {
    greedy_row(logits, vocab, out);
}

extern "C" __global__ void greedy_pick_bf16(const __nv_bfloat16 *logits, int64_t vocab,
                                            double *out) {
    greedy_row(logits, vocab, out);
}
