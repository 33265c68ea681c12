// Helpers the project's kernels share: bf16/f32 loads and stores through f32, and sums and
// maxima over a block of N threads in a fixed order (so a launch gives the same bits every
// time), every thread getting the result.
#pragma once
#include <cuda_bf16.h>
#include <math.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void put(float *p, int64_t i, float x) { p[i] = x; }
__device__ __forceinline__ void put(__nv_bfloat16 *p, int64_t i, float x) {
    p[i] = __float2bfloat16(x);
}
// `x` as a store to T and a load back would leave it.
template <typename T>
__device__ __forceinline__ float rounded(float x);
template <>
__device__ __forceinline__ float rounded<float>(float x) { return x; }
template <>
__device__ __forceinline__ float rounded<__nv_bfloat16>(float x) {
    return __bfloat162float(__float2bfloat16(x));
}

template <int N>
__device__ float block_sum(float v) {
    __shared__ float s[N];
    __syncthreads();
    s[threadIdx.x] = v;
    __syncthreads();
    for (int k = N / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) s[threadIdx.x] += s[threadIdx.x + k];
        __syncthreads();
    }
    return s[0];
}

template <int N>
__device__ float block_max(float v) {
    __shared__ float s[N];
    __syncthreads();
    s[threadIdx.x] = v;
    __syncthreads();
    for (int k = N / 2; k > 0; k >>= 1) {
        if (threadIdx.x < k) s[threadIdx.x] = fmaxf(s[threadIdx.x], s[threadIdx.x + k]);
        __syncthreads();
    }
    return s[0];
}
