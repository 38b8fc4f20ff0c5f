// Pooling over packed sequences.
//
// mean_pool_f32: out[s] = mean of input rows offsets[s]..offsets[s+1]. Grid
// x over column blocks, y over sequences; each thread walks its column down
// the sequence's rows (coalesced across the warp), summing in the reference's
// order, then divides by the count (an empty sequence gives 0/0 = NaN, as the
// reference does).
//
// gather_rows_f32: out[i] = input[rows[i]], one block per output row.
#include "common.cuh"

extern "C" __global__ void mean_pool_f32(
    float* __restrict__ out,
    const float* __restrict__ input,
    const int* __restrict__ offsets,
    int cols)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int s = blockIdx.y;
    if (c >= cols) return;
    const int start = offsets[s], end = offsets[s + 1];
    float sum = 0.f;
    for (int t = start; t < end; ++t) sum += input[(size_t)t * cols + c];
    out[(size_t)s * cols + c] = sum / (float)(end - start);
}

extern "C" __global__ void gather_rows_f32(
    float* __restrict__ out,
    const float* __restrict__ input,
    const unsigned long long* __restrict__ rows,
    int cols)
{
    const float* src = input + (size_t)rows[blockIdx.x] * cols;
    float* dst = out + (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c];
}
