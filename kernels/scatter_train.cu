// The backward passes of the gather-shaped forward ops: each scatters a
// gradient back to the rows its forward read. fp32.
//
// embedding_backward_f32: token t's gradient row is added into its word,
//   position (t minus its sequence's start) and token-type rows. Rows repeat
//   across tokens (the [CLS] word, position 0, type 0), so the adds are
//   atomic: one block per token, one column per thread (grid-stride). The
//   sum's order, and so its last bits, can vary run to run.
// scatter_rows_f32: d_input[rows[r]] = d_out[r] (the [CLS] rows of the
//   pooler); the caller zeroes d_input first. One block per row.
// mean_pool_backward_f32: every token of sequence s gets d_out[s] / len(s).
//   grid (column blocks of 128, batch), a thread per column walking the
//   sequence's rows.
#include "common.cuh"

extern "C" __global__ void embedding_backward_f32(
    float* __restrict__ d_word,
    float* __restrict__ d_position,
    float* __restrict__ d_token_type,
    const float* __restrict__ d_out,
    const unsigned* __restrict__ ids,
    const unsigned* __restrict__ type_ids,
    const unsigned* __restrict__ positions,
    int hidden)
{
    const size_t t = blockIdx.x;
    const float* g = d_out + t * hidden;
    float* word = d_word + (size_t)ids[t] * hidden;
    float* position = d_position + (size_t)positions[t] * hidden;
    float* token_type = d_token_type + (size_t)type_ids[t] * hidden;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
        const float v = g[c];
        atomicAdd(word + c, v);
        atomicAdd(position + c, v);
        atomicAdd(token_type + c, v);
    }
}

extern "C" __global__ void scatter_rows_f32(
    float* __restrict__ d_input,
    const float* __restrict__ d_out,
    const unsigned long long* __restrict__ rows,
    int cols)
{
    const size_t r = blockIdx.x;
    float* dst = d_input + (size_t)rows[r] * cols;
    const float* src = d_out + r * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c];
}

extern "C" __global__ void mean_pool_backward_f32(
    float* __restrict__ d_input,
    const float* __restrict__ d_out,
    const int* __restrict__ offsets,
    int cols)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int s = blockIdx.y;
    if (c >= cols) return;
    const int start = offsets[s], end = offsets[s + 1];
    const float g = d_out[(size_t)s * cols + c] / (float)(end - start);
    for (int t = start; t < end; ++t) d_input[(size_t)t * cols + c] = g;
}
