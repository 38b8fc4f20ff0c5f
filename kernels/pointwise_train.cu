// Element-wise ops of training, fp32, grid-stride loops over n elements:
//   gelu_forward_f32:  out = gelu(pre), the exact erf form (common.cuh);
//   tanh_backward_f32: d *= 1 - y^2, y the forward's tanh output;
//   add_f32:           out = a + b (out may be a: x += y);
//   scale_f32:         x *= factor;
//   round_to_bf16 / round_to_f16: GEMM operands in bf16 / fp16 (below).
// (GELU's backward is bias_gelu_backward_f32 in epilogue_train.cu without
// bias partials.)
#include "common.cuh"

#define BERTRT_GRID_STRIDE(i, n)                                                     \
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; \
         i < (n); i += (unsigned long long)gridDim.x * blockDim.x)

extern "C" __global__ void gelu_forward_f32(
    float* __restrict__ out, const float* __restrict__ pre, unsigned long long n)
{
    BERTRT_GRID_STRIDE(i, n) out[i] = gelu_erf(pre[i]);
}

extern "C" __global__ void tanh_backward_f32(
    float* __restrict__ d, const float* __restrict__ y, unsigned long long n)
{
    BERTRT_GRID_STRIDE(i, n) d[i] *= 1.f - y[i] * y[i];
}

// No __restrict__: out may alias a.
extern "C" __global__ void add_f32(float* out, const float* a, const float* b, unsigned long long n)
{
    BERTRT_GRID_STRIDE(i, n) out[i] = a[i] + b[i];
}

extern "C" __global__ void scale_f32(float* __restrict__ x, unsigned long long n, float factor)
{
    BERTRT_GRID_STRIDE(i, n) x[i] *= factor;
}

// fp32 -> bf16 / fp16, round to nearest even: the operands of a GEMM in
// bf16 or fp16 precision (cuBLAS then multiplies on the tensor cores with
// fp32 sums, as PyTorch's autocast matmuls do).
extern "C" __global__ void round_to_bf16(
    __nv_bfloat16* __restrict__ dst, const float* __restrict__ src, unsigned long long n)
{
    BERTRT_GRID_STRIDE(i, n) dst[i] = from_f32<__nv_bfloat16>(src[i]);
}

extern "C" __global__ void round_to_f16(
    __half* __restrict__ dst, const float* __restrict__ src, unsigned long long n)
{
    BERTRT_GRID_STRIDE(i, n) dst[i] = from_f32<__half>(src[i]);
}
