// Embedding: out[t] = word[ids[t]] + position[t - start(seq(t))] + token_type[type_ids[t]].
//
// Algorithm: one thread block per token; thread 0 finds the token's sequence
// by binary search over the packed `offsets` (batch + 1 entries, cached in
// L1), then the block streams the three table rows and writes the sum,
// coalesced along the hidden dimension. The additions are done in the
// reference's order, so the result is bit-identical to the CPU reference.
// Memory bound: 16 bytes moved per output element.
#include "common.cuh"

extern "C" __global__ void embedding_f32(
    float* __restrict__ out,
    const unsigned* __restrict__ ids,
    const unsigned* __restrict__ type_ids,
    const int* __restrict__ offsets,
    int batch,
    const float* __restrict__ word,
    const float* __restrict__ position,
    const float* __restrict__ token_type,
    int hidden)
{
    __shared__ int pos;
    const int t = offsets[0] + (int)blockIdx.x;
    if (threadIdx.x == 0) pos = t - offsets[find_sequence(offsets, batch, t)];
    __syncthreads();
    const float* w = word + (size_t)ids[t] * hidden;
    const float* p = position + (size_t)pos * hidden;
    const float* y = token_type + (size_t)type_ids[t] * hidden;
    float* o = out + (size_t)t * hidden;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) o[c] = w[c] + p[c] + y[c];
}
