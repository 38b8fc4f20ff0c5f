// A CPU emulation of the small part of CUDA C++ that kernels/*.cu use, so
// that the kernels' indexing and control flow can be checked on a machine
// without a GPU (see check.cpp). Each block runs as blockDim.x std::threads
// (blocks one after another, on the same threads), __syncthreads is a block
// barrier, and warp
// shuffles exchange through a per-warp buffer between two warp barriers.
// `__shared__` variables become function statics: one copy, valid because
// only one block runs at a time. Not a model of performance or of the memory
// model; a kernel whose threads diverge around a barrier or a shuffle would
// deadlock here (ours never do: every early return is block-uniform or has
// no barrier after it).
//
// __half and __nv_bfloat16 are storage-only structs of their 16 bits with
// the conversions the kernels use (common.cuh's to_f32 / from_f32), done
// bit-exactly as the hardware does them: fp32 -> fp16 and fp32 -> bf16 round
// to nearest even (fp16 with subnormals, overflow to inf, NaN kept quiet),
// and the widening conversions are exact. check.cpp holds the fp16 ones to
// the compiler's _Float16 over every half and a sweep of floats.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

struct uint3 {
    unsigned x = 0, y = 0, z = 0;
};
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace emu {
struct Block {
    explicit Block(unsigned threads) : bar(threads), shfl(threads) {
        for (unsigned w = 0; w < (threads + 31) / 32; ++w)
            warp_bars.emplace_back(std::make_unique<std::barrier<>>(
                std::min<unsigned>(32, threads - 32 * w)));
    }
    std::barrier<> bar;
    std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
    std::vector<float> shfl;
};
inline thread_local Block* block = nullptr;
}  // namespace emu

inline thread_local uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

inline void __syncthreads() { emu::block->bar.arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int offset) {
    const unsigned t = threadIdx.x, w = t / 32;
    emu::block->shfl[t] = v;
    emu::block->warp_bars[w]->arrive_and_wait();
    const float r = emu::block->shfl[w * 32 + ((t % 32) ^ (unsigned)offset)];
    emu::block->warp_bars[w]->arrive_and_wait();
    return r;
}

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
using std::isfinite;

// Atomics: the emulated threads of a block are real threads.
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
// Returns the old value, as CUDA's. A real read-modify-write (not a plain +=)
// because two threads of a block may add to the same address.
inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }

struct __half {
    std::uint16_t bits;
};
struct __nv_bfloat16 {
    std::uint16_t bits;
};

namespace emu {
inline std::uint32_t f32_bits(float f) {
    std::uint32_t x;
    std::memcpy(&x, &f, 4);
    return x;
}
inline float bits_f32(std::uint32_t x) {
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}
}  // namespace emu

inline __half __float2half_rn(float f) {
    const std::uint32_t x = emu::f32_bits(f);
    const std::uint16_t sign = (std::uint16_t)((x >> 16) & 0x8000u);
    const std::uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return {(std::uint16_t)(sign | 0x7e00u)};  // NaN
    if (ax >= 0x477ff000u) return {(std::uint16_t)(sign | 0x7c00u)};  // >= 65520: inf
    if (ax >= 0x38800000u) {  // a normal half (>= 2^-14): rebias, round 23 -> 10 bits
        std::uint32_t r = ax - 0x38000000u;
        r += 0xfffu + ((r >> 13) & 1u);
        return {(std::uint16_t)(sign | (r >> 13))};
    }
    // Subnormal or zero: a multiple of 2^-24; the scaling is exact and
    // nearbyint rounds half to even (the default rounding mode).
    const float q = std::nearbyint(emu::bits_f32(ax) * 16777216.0f);
    return {(std::uint16_t)(sign | (std::uint16_t)q)};
}

inline float __half2float(__half h) {
    const std::uint32_t sign = (std::uint32_t)(h.bits & 0x8000u) << 16;
    const std::uint32_t exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
    if (exp == 0) {
        const float v = (float)man * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    if (exp == 31) return emu::bits_f32(sign | 0x7f800000u | (man << 13));
    return emu::bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    const std::uint32_t x = emu::f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return {(std::uint16_t)((x >> 16) | 0x40u)};  // quiet NaN
    return {(std::uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16)};
}

inline float __bfloat162float(__nv_bfloat16 b) { return emu::bits_f32((std::uint32_t)b.bits << 16); }

#define __global__
#define __device__
#define __forceinline__
#define __noinline__
#define __launch_bounds__(n)
#define __restrict__ __restrict
#define __shared__ static

namespace emu {
// When set, launch runs the blocks last to first. A GPU runs blocks in any
// order, so a kernel whose result depends on the order is wrong; in
// particular a stray write into a region that another block owns is
// overwritten (hidden) when the owner runs later, and shows when it runs
// earlier. Checks run a kernel both ways where that matters.
inline bool reverse_blocks = false;

// Runs kernel(args...) over grid x block, as a CUDA launch would.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 threads, Args... args) {
    gridDim = grid;
    blockDim = threads;
    // One std::thread per thread of a block, reused for every block of the
    // grid (thread creation dominates the run time under AddressSanitizer);
    // a barrier after each block keeps the blocks one after another.
    Block b(threads.x);
    const unsigned long long blocks = (unsigned long long)grid.x * grid.y * grid.z;
    const bool reverse = reverse_blocks;
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads.x; ++t)
        pool.emplace_back([&, t] {
            emu::block = &b;
            threadIdx = {t, 0, 0};
            for (unsigned long long n = 0; n < blocks; ++n) {
                const unsigned long long k = reverse ? blocks - 1 - n : n;  // x fastest, then y, then z
                blockIdx = {(unsigned)(k % grid.x), (unsigned)(k / grid.x % grid.y),
                            (unsigned)(k / grid.x / grid.y)};
                kernel(args...);
                b.bar.arrive_and_wait();
            }
        });
    for (auto& th : pool) th.join();
}
}  // namespace emu
