// Attention of one new position per sequence over that sequence's own KV cache, every row and
// query head of a decode step in one launch (block (head, row)): scores, softmax and the
// weighted sum of values, reading keys and values where they lie in each cache's buffer.
// Composed from candle's ops the same attention is about five launches per layer for one
// sequence, and that again per row of a batch. The CPU body, and the reference, is
// `model/kernels/decode_attention.rs`.
//
// `table` holds eight int64 per row: key address, value address, key head stride, key
// position stride, value head stride, value position stride (strides in elements), length,
// and the address of the row's position (a uint32) or 0. With a position address the buffers
// are the cache's whole buffers, the length their capacity, and the row holds position + 1
// entries, read when the kernel runs: a decode step captured as a graph replays with each
// token's positions written in place. `kv_write` writes a step's new keys and values there.
// Dynamic shared memory: the scaled query (`d` floats), then the row's scores (`len` floats).
#include "common.cuh"

#define THREADS 128

// Positions row `t` holds: its length, or its position + 1 within its capacity.
__device__ __forceinline__ int row_len(const int64_t *t) {
    if (t[7] == 0) return (int)t[6];
    const int64_t p = *(const unsigned int *)t[7];
    return (int)(p < t[6] ? p + 1 : t[6]);
}

template <typename T>
__device__ void decode_attention(const T *q, const int64_t *table, T *out, int heads,
                                 int group, int d, float scale) {
    extern __shared__ float sh[];
    const int h = blockIdx.x, r = blockIdx.y;
    const int64_t *t = table + 8 * r;
    const T *k = (const T *)t[0] + (h / group) * t[2];
    const T *v = (const T *)t[1] + (h / group) * t[4];
    const int64_t kps = t[3], vps = t[5];
    const int len = row_len(t);
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

// Block (KV head, row): copies the row's new key and value for that head (`src_*` contiguous
// `(rows, kv_heads, 1, d)`) into its cache buffers at its position; a position past the
// capacity writes nothing (the host checks it before every step).
template <typename T>
__device__ void kv_write(const T *src_k, const T *src_v, const int64_t *table, int kv_heads,
                         int d) {
    const int h = blockIdx.x, r = blockIdx.y;
    const int64_t *t = table + 8 * r;
    const int64_t p = *(const unsigned int *)t[7];
    if (p >= t[6]) return;
    T *k = (T *)t[0] + h * t[2] + p * t[3];
    T *v = (T *)t[1] + h * t[4] + p * t[5];
    const int64_t s = ((int64_t)r * kv_heads + h) * d;
    for (int i = threadIdx.x; i < d; i += THREADS) {
        k[i] = src_k[s + i];
        v[i] = src_v[s + i];
    }
}

extern "C" __global__ void kv_write_f32(const float *src_k, const float *src_v,
                                        const int64_t *table, int kv_heads, int d) {
    kv_write<float>(src_k, src_v, table, kv_heads, d);
}
extern "C" __global__ void kv_write_bf16(const __nv_bfloat16 *src_k, const __nv_bfloat16 *src_v,
                                         const int64_t *table, int kv_heads, int d) {
    kv_write<__nv_bfloat16>(src_k, src_v, table, kv_heads, d);
}
