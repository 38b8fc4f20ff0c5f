// Attention for training: the forward pass that keeps the probabilities for
// backward, and the backward pass in two kernels. fp32 throughout.
//
// Layout as kernels/attention.cu: packed sequences (offsets, cu_seqlens
// style), qkv [tokens, 3 * hidden] with a head's query, key and value at
// columns h * d, hidden + h * d and 2 * hidden + h * d. The probabilities
// (before dropout) go to `probs`: for each sequence, for each head, a
// len x len block at probs_base[s] + h * len * len, row i being query i.
// Dropout on the probabilities uses the element's index in `probs` as its
// counter (common.cuh's dropout_uniform), exactly as the CPU's
// attention_saving and attention_backward (src/backend/cpu), so a seed
// drops the same entries on both.
//
// Forward, one block per (query i, head h, sequence s), grid (max_len,
// heads, batch): the query row in shared memory, scores q.k * scale one key
// per thread, block max and sum for the softmax, the probabilities written
// out and their dropped-out values kept in shared memory, then
// out_i = sum_j dropped_j v_j with the threads split into groups over j
// (head_dim columns each) and the groups' partial sums added at the end.
//
// Backward, with P the saved probabilities, D the dropout mask scaled by
// 1 / (1 - p), and dO the output gradient:
//   query kernel, per (i, h, s):  dP_ij = (dO_i . v_j) D_ij,
//     dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik) * scale (to d_scores, probs'
//     layout), dq_i = sum_j dS_ij k_j;
//   key kernel, per (j, h, s) after it:  dk_j = sum_i dS_ij q_i,
//     dv_j = sum_i P_ij D_ij dO_i.
// Both overwrite their rows of d_qkv, so every element of d_qkv inside the
// batch is written. The S x S matrices are kept (the trait's contract, and
// what the CPU does); a flash-style backward that recomputes them from the
// log-sum-exp is the next step for long sequences.
//
// Limits the launcher checks: head_dim <= BERTRT_ATTN_TRAIN_MAX_DIM,
// sequence length <= BERTRT_ATTN_TRAIN_MAX_LEN (static shared memory, which
// BERT's 512 positions fit).
#include "common.cuh"

#define BERTRT_ATTN_TRAIN_THREADS 128
#define BERTRT_ATTN_TRAIN_MAX_DIM 128
#define BERTRT_ATTN_TRAIN_MAX_LEN 512

// sum over j < len of weight[j] * rows[j * stride + c] for c < head_dim,
// into out[c]: the block's threads split into groups of head_dim, group g
// taking j = g, g + groups, ..., then thread c < head_dim adds the groups.
// `partial` is BERTRT_ATTN_TRAIN_THREADS floats of shared memory.
__device__ __forceinline__ void weighted_row_sum(
    float* __restrict__ out,
    const float* __restrict__ weight,
    const float* __restrict__ rows,
    int len,
    size_t stride,
    int head_dim,
    float* __restrict__ partial)
{
    const int groups = max(1, (int)blockDim.x / head_dim);
    const int g = threadIdx.x / head_dim, c = threadIdx.x % head_dim;
    if (g < groups) {
        float acc = 0.f;
        for (int j = g; j < len; j += groups) acc = fmaf(weight[j], rows[(size_t)j * stride + c], acc);
        partial[g * head_dim + c] = acc;
    }
    __syncthreads();
    if (threadIdx.x < head_dim) {
        float sum = 0.f;
        for (int k = 0; k < groups; ++k) sum += partial[k * head_dim + threadIdx.x];
        out[threadIdx.x] = sum;
    }
    __syncthreads();
}

extern "C" __global__ void __launch_bounds__(BERTRT_ATTN_TRAIN_THREADS) attention_train_forward_f32(
    float* __restrict__ out,
    float* __restrict__ probs,
    const float* __restrict__ qkv,
    const int* __restrict__ offsets,
    const unsigned long long* __restrict__ probs_base,
    int heads,
    int head_dim,
    float scale,
    float dropout_p,
    unsigned long long seed)
{
    __shared__ float q[BERTRT_ATTN_TRAIN_MAX_DIM];
    __shared__ float weight[BERTRT_ATTN_TRAIN_MAX_LEN];
    __shared__ float partial[BERTRT_ATTN_TRAIN_THREADS];
    __shared__ float scratch[32];
    const int i = blockIdx.x, h = blockIdx.y, s = blockIdx.z;
    const int start = offsets[s], len = offsets[s + 1] - start;
    if (i >= len) return;  // block-uniform
    const int hidden = heads * head_dim;
    const size_t stride = 3 * (size_t)hidden;
    const float* q_row = qkv + (size_t)(start + i) * stride + h * head_dim;
    const float* keys = qkv + (size_t)start * stride + hidden + h * head_dim;
    const float* values = keys + hidden;
    for (int c = threadIdx.x; c < head_dim; c += blockDim.x) q[c] = q_row[c];
    __syncthreads();

    float m = -INFINITY;
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        const float* k = keys + (size_t)j * stride;
        float dot = 0.f;
        for (int c = 0; c < head_dim; ++c) dot = fmaf(q[c], k[c], dot);
        weight[j] = dot * scale;
        m = fmaxf(m, weight[j]);
    }
    m = block_max(m, scratch);
    float sum = 0.f;
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        weight[j] = expf(weight[j] - m);
        sum += weight[j];
    }
    sum = block_sum(sum, scratch);
    const float inv_sum = 1.f / sum;
    const size_t row = probs_base[s] + ((size_t)h * len + i) * len;
    const unsigned long long key = dropout_key(seed);
    const float keep_scale = 1.f / (1.f - dropout_p);
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        const float p = weight[j] * inv_sum;
        probs[row + j] = p;
        weight[j] = dropout_p > 0.f && dropout_uniform(key, row + j) < dropout_p ? 0.f
                    : dropout_p > 0.f                                          ? p * keep_scale
                                                                               : p;
    }
    __syncthreads();
    weighted_row_sum(out + (size_t)(start + i) * hidden + h * head_dim, weight, values, len, stride,
                     head_dim, partial);
}

extern "C" __global__ void __launch_bounds__(BERTRT_ATTN_TRAIN_THREADS) attention_train_backward_query_f32(
    float* __restrict__ d_qkv,
    float* __restrict__ d_scores,
    const float* __restrict__ d_out,
    const float* __restrict__ qkv,
    const float* __restrict__ probs,
    const int* __restrict__ offsets,
    const unsigned long long* __restrict__ probs_base,
    int heads,
    int head_dim,
    float scale,
    float dropout_p,
    unsigned long long seed)
{
    __shared__ float d_o[BERTRT_ATTN_TRAIN_MAX_DIM];
    __shared__ float weight[BERTRT_ATTN_TRAIN_MAX_LEN];
    __shared__ float partial[BERTRT_ATTN_TRAIN_THREADS];
    __shared__ float scratch[32];
    const int i = blockIdx.x, h = blockIdx.y, s = blockIdx.z;
    const int start = offsets[s], len = offsets[s + 1] - start;
    if (i >= len) return;  // block-uniform
    const int hidden = heads * head_dim;
    const size_t stride = 3 * (size_t)hidden;
    const float* keys = qkv + (size_t)start * stride + hidden + h * head_dim;
    const float* values = keys + hidden;
    const float* d_o_row = d_out + (size_t)(start + i) * hidden + h * head_dim;
    for (int c = threadIdx.x; c < head_dim; c += blockDim.x) d_o[c] = d_o_row[c];
    __syncthreads();

    const size_t row = probs_base[s] + ((size_t)h * len + i) * len;
    const unsigned long long key = dropout_key(seed);
    const float keep_scale = 1.f / (1.f - dropout_p);
    float dot = 0.f;
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        const float* v = values + (size_t)j * stride;
        float d_p = 0.f;
        for (int c = 0; c < head_dim; ++c) d_p = fmaf(d_o[c], v[c], d_p);
        if (dropout_p > 0.f) d_p = dropout_uniform(key, row + j) < dropout_p ? 0.f : d_p * keep_scale;
        weight[j] = d_p;
        dot = fmaf(probs[row + j], d_p, dot);
    }
    dot = block_sum(dot, scratch);
    for (int j = threadIdx.x; j < len; j += blockDim.x) {
        const float d_s = probs[row + j] * (weight[j] - dot) * scale;
        d_scores[row + j] = d_s;
        weight[j] = d_s;
    }
    __syncthreads();
    weighted_row_sum(d_qkv + (size_t)(start + i) * stride + h * head_dim, weight, keys, len, stride,
                     head_dim, partial);
}

extern "C" __global__ void __launch_bounds__(BERTRT_ATTN_TRAIN_THREADS) attention_train_backward_key_f32(
    float* __restrict__ d_qkv,
    const float* __restrict__ d_scores,
    const float* __restrict__ d_out,
    const float* __restrict__ qkv,
    const float* __restrict__ probs,
    const int* __restrict__ offsets,
    const unsigned long long* __restrict__ probs_base,
    int heads,
    int head_dim,
    float dropout_p,
    unsigned long long seed)
{
    __shared__ float d_s[BERTRT_ATTN_TRAIN_MAX_LEN];
    __shared__ float dropped[BERTRT_ATTN_TRAIN_MAX_LEN];
    __shared__ float partial[BERTRT_ATTN_TRAIN_THREADS];
    const int j = blockIdx.x, h = blockIdx.y, s = blockIdx.z;
    const int start = offsets[s], len = offsets[s + 1] - start;
    if (j >= len) return;  // block-uniform
    const int hidden = heads * head_dim;
    const size_t stride = 3 * (size_t)hidden;
    const unsigned long long key = dropout_key(seed);
    const float keep_scale = 1.f / (1.f - dropout_p);
    // Column j of this head's dS and of its dropped-out probabilities.
    for (int i = threadIdx.x; i < len; i += blockDim.x) {
        const size_t at = probs_base[s] + ((size_t)h * len + i) * len + j;
        d_s[i] = d_scores[at];
        const float p = probs[at];
        dropped[i] = dropout_p > 0.f && dropout_uniform(key, at) < dropout_p ? 0.f
                     : dropout_p > 0.f                                       ? p * keep_scale
                                                                             : p;
    }
    __syncthreads();
    float* d_row = d_qkv + (size_t)(start + j) * stride + h * head_dim;
    const float* queries = qkv + (size_t)start * stride + h * head_dim;
    weighted_row_sum(d_row + hidden, d_s, queries, len, stride, head_dim, partial);
    weighted_row_sum(d_row + 2 * hidden, dropped, d_out + (size_t)start * hidden + h * head_dim, len,
                     hidden, head_dim, partial);
}
