// Deterministic column sums: out[c] += sum over p of partials[p * cols + c],
// added in the order p = 0, 1, ... (fp32).
//
// The second pass of the training kernels that reduce over rows: bias
// gradients (bias_gelu_backward_*) and LayerNorm's gamma / beta gradients
// (layer_norm_backward_*) write one row of per-block partial sums each, and
// this adds them into the accumulated gradient. A fixed number of partials
// summed in a fixed order gives the same bits on every run, which atomics
// would not. One thread per column, 256-thread blocks over the columns; reads
// are coalesced across a warp's columns.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(256) column_sum_f32(
    float* __restrict__ out,
    const float* __restrict__ partials,
    int parts,
    int cols)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float sum = 0.f;
    for (int p = 0; p < parts; ++p) sum += partials[(size_t)p * cols + c];
    out[c] += sum;
}
