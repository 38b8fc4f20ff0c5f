// A CPU emulation of the small part of CUDA C++ that kernels/*.cu use, so
// that the kernels' indexing and control flow can be checked on a machine
// without a GPU (see check.cpp). Each block runs as blockDim.x std::threads
// (blocks one after another), __syncthreads is a block barrier, and warp
// shuffles exchange through a per-warp buffer between two warp barriers.
// `__shared__` variables become function statics: one copy, valid because
// only one block runs at a time. Not a model of performance or of the memory
// model; a kernel whose threads diverge around a barrier or a shuffle would
// deadlock here (ours never do: every early return is block-uniform or has
// no barrier after it).
#pragma once

#include <barrier>
#include <cmath>
#include <cstddef>
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

#define __global__
#define __device__
#define __forceinline__
#define __noinline__
#define __launch_bounds__(n)
#define __restrict__ __restrict
#define __shared__ static

namespace emu {
// Runs kernel(args...) over grid x block, as a CUDA launch would.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 threads, Args... args) {
    gridDim = grid;
    blockDim = threads;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                Block b(threads.x);
                std::vector<std::thread> pool;
                for (unsigned t = 0; t < threads.x; ++t)
                    pool.emplace_back([&, t] {
                        emu::block = &b;
                        threadIdx = {t, 0, 0};
                        blockIdx = {bx, by, bz};
                        kernel(args...);
                    });
                for (auto& th : pool) th.join();
            }
}
}  // namespace emu
