// LayerNorm with optional residual: x = LayerNorm(x + residual) * gamma + beta,
// in place, over rows of `cols`.
//
// Algorithm: one thread block per row. Pass 1 adds the residual (writing the
// sum back into x) and block-reduces the sum -> mean; pass 2 re-reads the row
// (from L1/L2) and block-reduces sum((v - mean)^2) -> variance, the same
// two-pass formula as the reference (no E[x^2] - E[x]^2 cancellation);
// pass 3 normalises. Each thread only re-reads the elements it wrote, so no
// barrier is needed between passes beyond those inside the reductions. No
// limit on `cols` (no shared-memory row buffer).
#include "common.cuh"

extern "C" __global__ void layer_norm_f32(
    float* __restrict__ x,
    const float* __restrict__ residual,  // may be null
    const float* __restrict__ gamma,
    const float* __restrict__ beta,
    float eps,
    int cols)
{
    __shared__ float scratch[32];
    float* row = x + (size_t)blockIdx.x * cols;
    float sum = 0.f;
    if (residual != nullptr) {
        const float* res = residual + (size_t)blockIdx.x * cols;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const float v = row[c] + res[c];
            row[c] = v;
            sum += v;
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) sum += row[c];
    }
    const float mean = block_sum(sum, scratch) / (float)cols;
    float sq = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float d = row[c] - mean;
        sq += d * d;
    }
    const float var = block_sum(sq, scratch) / (float)cols;
    const float inv_std = 1.f / sqrtf(var + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        row[c] = (row[c] - mean) * inv_std * gamma[c] + beta[c];
}
