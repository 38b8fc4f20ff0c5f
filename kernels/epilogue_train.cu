// The training epilogue of the feed-forward up-projection: bias + exact GELU
// forward saving the pre-activation, and its backward with the bias gradient.
//
// Forward: pre = x W^T + b (in place over the GEMM output, rounded to T and
// kept for backward) and out = gelu(pre), GELU the erf form (gelu_erf in
// common.cuh) of the rounded pre. Backward: d = d_out * gelu'(pre) with
// gelu'(x) = Phi(x) + x phi(x) = 0.5 erfc(-x / sqrt 2) + x exp(-x^2 / 2) /
// sqrt(2 pi), written over d_out, and the bias gradient's per-block partial
// sums (fp32, of the unrounded d) to dbias_partials[blockIdx.y][cols] for
// column_sum_f32 (kernels/reduce.cu) to add into d_bias: deterministic, no
// atomics.
//
// Both: a 2-D grid as bias_act_f32, x over blocks of columns (one column per
// thread, so a warp reads a contiguous piece of a row), y over row blocks
// that stride the rows by gridDim.y; backward's gridDim.y is the number of
// partial rows. T is the storage type; arithmetic is fp32.
#include "common.cuh"

template <typename T>
__device__ __noinline__ void bias_gelu_forward_impl(
    T* __restrict__ out,
    T* __restrict__ pre,
    const T* __restrict__ bias,
    int rows,
    int cols)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    const float b = to_f32(bias[c]);
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        const size_t i = (size_t)r * cols + c;
        const T v = from_f32<T>(to_f32(pre[i]) + b);
        pre[i] = v;
        out[i] = from_f32<T>(gelu_erf(to_f32(v)));
    }
}

__device__ __forceinline__ float gelu_erf_grad(float x) {
    const float cdf = 0.5f * erfcf(-x * 0.70710678118654752440f);
    const float pdf = 0.39894228040143267794f * expf(-0.5f * x * x);
    return cdf + x * pdf;
}

template <typename T>
__device__ __noinline__ void bias_gelu_backward_impl(
    T* __restrict__ d,
    float* __restrict__ dbias_partials,
    const T* __restrict__ pre,
    int rows,
    int cols)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float sum = 0.f;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        const size_t i = (size_t)r * cols + c;
        const float g = to_f32(d[i]) * gelu_erf_grad(to_f32(pre[i]));
        d[i] = from_f32<T>(g);
        sum += g;
    }
    if (dbias_partials != nullptr) dbias_partials[(size_t)blockIdx.y * cols + c] = sum;
}

#define BERTRT_BIAS_GELU_INSTANCES(SUFFIX, T)                                                   \
    extern "C" __global__ void bias_gelu_forward_##SUFFIX(                                      \
        T* __restrict__ out, T* __restrict__ pre, const T* __restrict__ bias, int rows, int cols) \
    {                                                                                           \
        bias_gelu_forward_impl<T>(out, pre, bias, rows, cols);                                  \
    }                                                                                           \
    extern "C" __global__ void bias_gelu_backward_##SUFFIX(                                     \
        T* __restrict__ d, float* __restrict__ dbias_partials, const T* __restrict__ pre,       \
        int rows, int cols)                                                                     \
    {                                                                                           \
        bias_gelu_backward_impl<T>(d, dbias_partials, pre, rows, cols);                         \
    }

BERTRT_BIAS_GELU_INSTANCES(f32, float)
BERTRT_BIAS_GELU_INSTANCES(f16, __half)
BERTRT_BIAS_GELU_INSTANCES(bf16, __nv_bfloat16)
