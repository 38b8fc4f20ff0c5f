// Element-wise ops. tanh_f32: x = tanh(x) in place (the pooler's
// activation), a grid-stride loop over n elements with the full-accuracy
// tanhf.
#include "common.cuh"

extern "C" __global__ void tanh_f32(float* __restrict__ x, unsigned long long n)
{
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        x[i] = tanhf(x[i]);
}
