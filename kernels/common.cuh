// Helpers shared by bertrt's kernels: warp and block reductions, and the
// lookup of a token's sequence in a packed batch.
//
// Every kernel is fp32 in, fp32 out, fp32 arithmetic, built WITHOUT
// --use_fast_math (see build.rs): expf, erfcf, tanhf, sqrtf and divisions are
// the IEEE / full-accuracy versions, so results stay within a few ulps of the
// CPU reference backend.
#pragma once

#define BERTRT_FULL_MASK 0xffffffffu

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(BERTRT_FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(BERTRT_FULL_MASK, v, o));
    return v;
}

// Sum over the whole block, returned to every thread. blockDim.x must be a
// multiple of 32 (at most 1024); `scratch` is 32 floats of shared memory that
// may be reused by the next call (the leading barrier protects it).
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0.f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : -INFINITY;
    return warp_max(v);
}

// The sequence holding token `t`: the largest s < batch with offsets[s] <= t
// (empty sequences before it have smaller indices, so they are skipped).
__device__ __forceinline__ int find_sequence(const int* __restrict__ offsets, int batch, int t) {
    int lo = 0, hi = batch - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (offsets[mid] <= t) lo = mid; else hi = mid - 1;
    }
    return lo;
}
