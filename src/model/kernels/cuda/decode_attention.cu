// Attention of one new position per sequence over that sequence's own KV cache, every row and
// query head of a decode step in one launch (block (head, row)): scores, softmax and the
// weighted sum of values, reading keys and values where they lie in each cache's buffer.
// Composed from candle's ops the same attention is about five launches per layer for one
// sequence, and that again per row of a batch. The CPU body, and the reference, is
// `model/kernels/decode_attention.rs`.
//
// `table` holds eight int64 per row: key address, value address, key head stride, key
// position stride, value head stride, value position stride, length, 0 (strides in elements).
// Dynamic shared memory: the scaled query (`d` floats), then the row's scores (`len` floats).
#include "common.cuh"

#define THREADS 128

template <typename T>
__device__ void decode_attention(const T *q, const int64_t *table, T *out, int heads,
                                 int group, int d, float scale) {
    extern __shared__ float sh[];
    const int h = blockIdx.x, r = blockIdx.y;
    const int64_t *t = table + 8 * r;
    const T *k = (const T *)t[0] + (h / group) * t[2];
    const T *v = (const T *)t[1] + (h / group) * t[4];
    const int64_t kps = t[3], vps = t[5];
    const int len = (int)t[6];
    float *qs = sh, *sc = sh + d;
    const int64_t row = (int64_t)r * heads + h;
    for (int i = threadIdx.x; i < d; i += THREADS) qs[i] = to_f(q[row * d + i]) * scale;
    __syncthreads();
    float m = -INFINITY;
    for (int p = threadIdx.x; p < len; p += THREADS) {
        const T *kp = k + p * kps;
        float s = 0.f;
        for (int i = 0; i < d; i++) s += qs[i] * to_f(kp[i]);
        sc[p] = s;
        m = fmaxf(m, s);
    }
    m = block_max<THREADS>(m);
    float sum = 0.f;
    for (int p = threadIdx.x; p < len; p += THREADS) {
        const float e = expf(sc[p] - m);
        sc[p] = e;
        sum += e;
    }
    sum = block_sum<THREADS>(sum);  // its barriers also publish every score
    const float inv = 1.0f / sum;
    for (int i = threadIdx.x; i < d; i += THREADS) {
        float acc = 0.f;
        for (int p = 0; p < len; p++) acc += sc[p] * to_f(v[p * vps + i]);
        put(out, row * d + i, acc * inv);
    }
}

extern "C" __global__ void decode_attention_f32(const float *q, const int64_t *table, float *out,
                                                int heads, int group, int d, float scale) {
    decode_attention<float>(q, table, out, heads, group, d, scale);
}
extern "C" __global__ void decode_attention_bf16(const __nv_bfloat16 *q, const int64_t *table,
                                                 __nv_bfloat16 *out, int heads, int group, int d,
                                                 float scale) {
    decode_attention<__nv_bfloat16>(q, table, out, heads, group, d, scale);
}
