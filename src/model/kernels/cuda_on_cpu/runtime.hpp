// The CUDA features the project's kernels use, on the CPU, so tests run the kernels' own
// source (not a translation of it) without a GPU. Compiled as C++20 with this file included
// first (`-include`), one shared library per `.cu` file.
//
// A launch runs its blocks one after another; a block's threads are OS threads, so every
// thread of a block runs at once and `__syncthreads` is a real barrier over them. A warp is
// 32 consecutive threads with a barrier of its own: `__syncwarp` waits on it and a shuffle
// publishes each lane's value, waits, reads its source lane's and waits again. A thread that
// returns leaves both barriers (as an exited thread no longer holds up a CUDA barrier).
// `__shared__` variables are statics (blocks never overlap); dynamic shared memory is a
// per-block buffer filled with 0xff bytes (NaN as floats), so a read before any write shows.
// bf16 is stored as its 16 bits and rounded to nearest even, as `__float2bfloat16` does.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
};

namespace emu {
struct Block {
    std::unique_ptr<std::barrier<>> all;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<uint64_t> lanes;
    std::vector<unsigned char> shared;
};
inline thread_local uint3 tid{0, 0, 0};
inline thread_local uint3 bid{0, 0, 0};
inline thread_local Block *block = nullptr;
inline dim3 bdim{1, 1, 1};
inline dim3 gdim{1, 1, 1};

inline unsigned linear() { return tid.x + bdim.x * (tid.y + bdim.y * tid.z); }
inline std::barrier<> &warp() { return *block->warps[linear() / 32]; }

template <class T>
T shuffle(T v, unsigned src) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "a shuffle moves at most 8 bytes");
    const unsigned l = linear(), base = l / 32 * 32;
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    block->lanes[l] = bits;
    warp().arrive_and_wait();
    const uint64_t got = block->lanes[base + src];
    warp().arrive_and_wait();
    T r;
    std::memcpy(&r, &got, sizeof(T));
    return r;
}
}  // namespace emu

#define threadIdx (::emu::tid)
#define blockIdx (::emu::bid)
#define blockDim (::emu::bdim)
#define gridDim (::emu::gdim)
#define __global__ __attribute__((visibility("default")))
#define __device__
#define __forceinline__ inline
#define __shared__ static

inline void __syncthreads() { emu::block->all->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp().arrive_and_wait(); }
template <class T>
inline T __shfl_xor_sync(unsigned, T v, int mask) {
    return emu::shuffle(v, (emu::linear() % 32) ^ unsigned(mask));
}
template <class T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta) {
    const unsigned lane = emu::linear() % 32;
    return emu::shuffle(v, lane + delta < 32 ? lane + delta : lane);
}
/// What `extern __shared__ float sh[];` names (the build rewrites that line to call this).
inline float *emu_dynamic_shared() { return reinterpret_cast<float *>(emu::block->shared.data()); }

template <class T>
inline T min(T a, T b) {
    return b < a ? b : a;
}
template <class T>
inline T max(T a, T b) {
    return a < b ? b : a;
}

struct __nv_bfloat16 {
    uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 b) {
    const uint32_t u = uint32_t(b.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1);
    return {uint16_t(u >> 16)};
}

/// Runs `body(ctx)` as every thread of every block of the grid; returns when all have ended.
/// A block's threads are started once per launch and step through the blocks together: one
/// thread makes each block's barriers and shared memory, `gate` holds the others until it is
/// made and every thread until all have finished it.
extern "C" __attribute__((visibility("default"))) void emu_launch(unsigned gx, unsigned gy,
                                                                  unsigned gz, unsigned bx,
                                                                  unsigned by, unsigned bz,
                                                                  size_t shared,
                                                                  void (*body)(void *),
                                                                  void *ctx) {
    emu::gdim = {gx, gy, gz};
    emu::bdim = {bx, by, bz};
    const unsigned n = bx * by * bz, warps = (n + 31) / 32;
    std::barrier<> gate(n);
    std::unique_ptr<emu::Block> current;
    auto make = [&] {
        auto b = std::make_unique<emu::Block>();
        b->all = std::make_unique<std::barrier<>>(n);
        for (unsigned w = 0; w < warps; w++)
            b->warps.push_back(std::make_unique<std::barrier<>>(std::min(32u, n - 32 * w)));
        b->lanes.assign(warps * 32, 0);
        b->shared.assign(shared, 0xff);
        return b;
    };
    std::vector<std::thread> threads;
    for (unsigned i = 0; i < n; i++)
        threads.emplace_back([&, i] {
            emu::tid = {i % bx, i / bx % by, i / (bx * by)};
            for (unsigned z = 0; z < gz; z++)
                for (unsigned y = 0; y < gy; y++)
                    for (unsigned x = 0; x < gx; x++) {
                        if (i == 0) current = make();
                        gate.arrive_and_wait();
                        emu::block = current.get();
                        emu::bid = {x, y, z};
                        body(ctx);
                        emu::warp().arrive_and_drop();
                        emu::block->all->arrive_and_drop();
                        gate.arrive_and_wait();
                    }
        });
    for (auto &t : threads) t.join();
}
