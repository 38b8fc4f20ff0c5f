// Attention for training: the row-wise halves. The products (S = Q K^T,
// out = dropout(P) V and the four of backward) are batched cuBLAS GEMMs
// over (sequence, head) blocks, launched by src/backend/cuda/train.rs;
// these kernels do what sits between them, one warp per row of a block.
//
// Layout: packed sequences (offsets, cu_seqlens style); for sequence s of
// length len and head h, a len x len block at probs_base[s] + h * len * len,
// row i being query i. Dropout on the probabilities uses the element's index
// in that buffer as its counter (common.cuh's dropout_uniform), exactly as
// the CPU's attention (src/backend/cpu), so a seed drops the same entries on
// both.
//
// attention_softmax_train_f32: the GEMM left scale * q.k in `probs`; each
//   row becomes its softmax P (kept for backward) and, when `dropped` is not
//   null, dropout(P) goes to `dropped` for the P V product.
// attention_softmax_backward_f32: the GEMM left dO v_j (the gradient of
//   dropout(P)) in `d_scores`; each row becomes
//   dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik) * scale with dP = dropout of
//   that gradient (same mask, same 1 / (1 - p)), in place.
//
// Grid (ceil(max_len / ROWS), heads, batch), ROWS warps per block; a warp
// whose row is past its sequence's end returns (no block barriers here).
#include "common.cuh"

#define BERTRT_ATTN_SOFTMAX_ROWS 4

// p, or its dropped-out value: 0 with probability dropout_p, else p / (1 - p).
__device__ __forceinline__ float dropped_value(
    float p, unsigned long long key, unsigned long long index, float dropout_p, float keep_scale)
{
    if (dropout_p == 0.f) return p;
    return dropout_uniform(key, index) < dropout_p ? 0.f : p * keep_scale;
}

// The start of this warp's row in the probabilities' layout and the row's
// length, or len 0 when the warp has no row.
__device__ __forceinline__ size_t attention_row(
    const int* __restrict__ offsets,
    const unsigned long long* __restrict__ probs_base,
    int* len_out)
{
    const int h = blockIdx.y, s = blockIdx.z;
    const int len = offsets[s + 1] - offsets[s];
    const int i = blockIdx.x * BERTRT_ATTN_SOFTMAX_ROWS + (threadIdx.x >> 5);
    *len_out = i < len ? len : 0;
    return probs_base[s] + ((size_t)h * len + i) * len;
}

extern "C" __global__ void __launch_bounds__(32 * BERTRT_ATTN_SOFTMAX_ROWS) attention_softmax_train_f32(
    float* __restrict__ probs,
    float* __restrict__ dropped,
    const int* __restrict__ offsets,
    const unsigned long long* __restrict__ probs_base,
    float dropout_p,
    unsigned long long seed)
{
    int len;
    const size_t row = attention_row(offsets, probs_base, &len);
    if (len == 0) return;  // warp-uniform
    const int lane = threadIdx.x & 31;
    float* x = probs + row;
    float m = -INFINITY;
    for (int j = lane; j < len; j += 32) m = fmaxf(m, x[j]);
    m = warp_max(m);
    float sum = 0.f;
    for (int j = lane; j < len; j += 32) sum += expf(x[j] - m);
    const float inv_sum = 1.f / warp_sum(sum);
    const unsigned long long key = dropout_key(seed);
    const float keep_scale = 1.f / (1.f - dropout_p);
    for (int j = lane; j < len; j += 32) {
        const float p = expf(x[j] - m) * inv_sum;
        x[j] = p;
        if (dropped != nullptr) dropped[row + j] = dropped_value(p, key, row + j, dropout_p, keep_scale);
    }
}

extern "C" __global__ void __launch_bounds__(32 * BERTRT_ATTN_SOFTMAX_ROWS) attention_softmax_backward_f32(
    float* __restrict__ d_scores,
    const float* __restrict__ probs,
    const int* __restrict__ offsets,
    const unsigned long long* __restrict__ probs_base,
    float scale,
    float dropout_p,
    unsigned long long seed)
{
    int len;
    const size_t row = attention_row(offsets, probs_base, &len);
    if (len == 0) return;  // warp-uniform
    const int lane = threadIdx.x & 31;
    float* d = d_scores + row;
    const float* p = probs + row;
    const unsigned long long key = dropout_key(seed);
    const float keep_scale = 1.f / (1.f - dropout_p);
    float dot = 0.f;
    for (int j = lane; j < len; j += 32) {
        const float d_p = dropped_value(d[j], key, row + j, dropout_p, keep_scale);
        d[j] = d_p;
        dot = fmaf(p[j], d_p, dot);
    }
    dot = warp_sum(dot);
    for (int j = lane; j < len; j += 32) d[j] = p[j] * (d[j] - dot) * scale;
}
