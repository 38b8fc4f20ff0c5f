// Element-wise ops of training, fp32, grid-stride loops over n elements:
//   gelu_forward_f32:  out = gelu(pre), the exact erf form (common.cuh);
//   tanh_backward_f32: d *= 1 - y^2, y the forward's tanh output;
//   add_f32:           out = a + b (out may be a: x += y);
//   scale_f32:         x *= factor.
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
