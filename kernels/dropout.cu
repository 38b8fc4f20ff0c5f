// Dropout with a counter-based mask, in place: element i of the tensor is
// dropped when uniform_at(seed, first + i) < p and kept ones are scaled by
// 1 / (1 - p). The same launch on the gradient is the backward pass.
//
// The mask is src/rng.rs's uniform_at bit for bit (so a seed gives the same
// mask on the CPU and the GPU, and ops::dropout_slice is the reference):
// SplitMix64's mixer applied as mix(mix(seed * GOLDEN) ^ (index * GOLDEN)),
// its top 24 bits scaled by 2^-24 (exact in fp32), compared with p; the keep
// scale is the IEEE fp32 quotient 1 / (1 - p) and the kept value x * scale,
// one fp32 rounding as on the CPU (then one more into T for fp16 / bf16).
// `first` is the index of x[0] in the masked tensor, so a tensor may be
// masked in pieces. Grid-stride loop; the hash is ~10 integer ops per
// element, so this stays memory bound.
#include "common.cuh"

#define BERTRT_DROPOUT_THREADS 256

template <typename T>
__device__ __noinline__ void dropout_impl(
    T* __restrict__ x,
    unsigned long long n,
    float p,
    unsigned long long seed,
    unsigned long long first)
{
    if (p == 0.f) return;
    const unsigned long long key = dropout_key(seed);
    const float keep_scale = 1.f / (1.f - p);
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        x[i] = dropout_uniform(key, first + i) < p ? from_f32<T>(0.f)
                                                   : from_f32<T>(to_f32(x[i]) * keep_scale);
    }
}

#define BERTRT_DROPOUT_INSTANCE(NAME, T)                                                  \
    extern "C" __global__ void __launch_bounds__(BERTRT_DROPOUT_THREADS) NAME(            \
        T* __restrict__ x, unsigned long long n, float p, unsigned long long seed,        \
        unsigned long long first)                                                         \
    {                                                                                     \
        dropout_impl<T>(x, n, p, seed, first);                                            \
    }

BERTRT_DROPOUT_INSTANCE(dropout_f32, float)
BERTRT_DROPOUT_INSTANCE(dropout_f16, __half)
BERTRT_DROPOUT_INSTANCE(dropout_bf16, __nv_bfloat16)
