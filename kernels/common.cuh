// Helpers shared by bertrt's kernels: warp and block reductions, the lookup
// of a token's sequence in a packed batch, the exact GELU, and the storage
// conversions of the mixed-precision training kernels.
//
// The inference kernels are fp32 in, fp32 out. The training kernels are
// templates over a storage type T (float, __half or __nv_bfloat16): every
// load goes through to_f32(), every store through from_f32<T>() (round to
// nearest even), and all arithmetic and accumulation is fp32. Built WITHOUT
// --use_fast_math (see build.rs): expf, erfcf, tanhf, sqrtf and divisions are
// the IEEE / full-accuracy versions, so results stay within a few ulps of the
// CPU reference backend.
#pragma once

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#define BERTRT_FULL_MASK 0xffffffffu

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// Template bodies shared by several extern "C" instances are __noinline__
// (one call per thread, no stack frame): ptxas 11.8 segfaults on the sm_90
// -lineinfo build of a file whose entries inline the same template body (as
// in kernels/attention.cu).

// The exact (erf) GELU, written with erfc, 0.5 * v * erfc(-v / sqrt 2), which
// keeps relative accuracy in the negative tail (the CPU reference uses the
// same form in f64).
__device__ __forceinline__ float gelu_erf(float v) {
    return 0.5f * v * erfcf(-v * 0.70710678118654752440f);
}

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

// Dropout's counter-based mask, src/rng.rs's uniform_at bit for bit:
// SplitMix64's mixer as mix(mix(seed * GOLDEN) ^ (index * GOLDEN)), its top
// 24 bits scaled by 2^-24 (exact in fp32). An element is dropped when the
// uniform is < p. dropout_key(seed) is the first mix, hoisted out of loops.
#define BERTRT_GOLDEN 0x9E3779B97F4A7C15ull

__device__ __forceinline__ unsigned long long splitmix64_mix(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ unsigned long long dropout_key(unsigned long long seed) {
    return splitmix64_mix(seed * BERTRT_GOLDEN);
}

__device__ __forceinline__ float dropout_uniform(unsigned long long key, unsigned long long index) {
    return (float)(splitmix64_mix(key ^ (index * BERTRT_GOLDEN)) >> 40) * (1.f / 16777216.f);
}
