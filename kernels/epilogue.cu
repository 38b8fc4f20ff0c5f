// GEMM epilogue: y = act(y + bias) over rows of `cols`, in place, after the
// cuBLAS sgemm that computed y = x . W^T. act 0 = identity, 1 = exact GELU.
//
// Algorithm: a 2-D grid, x over column blocks and y over rows (grid-striding
// rows past 65535), so the bias index needs no division. GELU is the erf form
// (gelu_erf in common.cuh).
// Memory bound: one read and one write of y.
#include "common.cuh"

extern "C" __global__ void bias_act_f32(
    float* __restrict__ y,
    const float* __restrict__ bias,
    int rows,
    int cols,
    int act)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    const float b = bias[c];
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        float* p = y + (size_t)r * cols + c;
        const float v = *p + b;
        *p = act == 1 ? gelu_erf(v) : v;
    }
}
