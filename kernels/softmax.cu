// Softmax over each row of `cols`, in place.
//
// Algorithm: one thread block per row: block max, then exp(v - max) written
// back and block-summed, then a division by the sum (as the reference does,
// not a multiplication by its reciprocal). Rows here are short (class logits),
// so the three passes over the row hit L1.
#include "common.cuh"

extern "C" __global__ void softmax_rows_f32(float* __restrict__ x, int cols)
{
    __shared__ float scratch[32];
    float* row = x + (size_t)blockIdx.x * cols;
    float m = -INFINITY;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, row[c]);
    m = block_max(m, scratch);
    float sum = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float e = expf(row[c] - m);
        row[c] = e;
        sum += e;
    }
    sum = block_sum(sum, scratch);
    for (int c = threadIdx.x; c < cols; c += blockDim.x) row[c] = row[c] / sum;
}
