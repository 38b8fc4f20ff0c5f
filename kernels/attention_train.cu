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
// Each block takes a tile of ROWS query rows (or, in the key kernel, key
// rows) of one (sequence, head): grid (ceil(max_len / ROWS), heads, batch),
// BERTRT_ATTN_TRAIN_THREADS threads. The block walks the sequence's other
// side in tiles of TILE rows staged in shared memory (read from global once
// per block, coalesced), so K and V are read len / ROWS times per head, not
// len times.
//
// Forward: S = Q K^T * scale for the block's rows into shared memory, a
// softmax per row (one warp per row), the probabilities written out and
// their dropped-out values kept, then out = dropout(P) V.
// Backward, with P the saved probabilities, D the dropout mask scaled by
// 1 / (1 - p), and dO the output gradient:
//   query kernel, per query row i:  dP_ij = (dO_i . v_j) D_ij,
//     dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik) * scale (to d_scores, probs'
//     layout), dq_i = sum_j dS_ij k_j;
//   key kernel, per key row j, after it:  dk_j = sum_i dS_ij q_i,
//     dv_j = sum_i P_ij D_ij dO_i.
// Both overwrite their rows of d_qkv, so every element of d_qkv inside the
// batch is written. The S x S matrices are kept (the trait's contract, and
// what the CPU does); a flash-style backward that recomputes them from the
// log-sum-exp, on the tensor cores, is the next step.
//
// Limits the launcher checks: head_dim <= BERTRT_ATTN_TRAIN_MAX_DIM,
// sequence length <= BERTRT_ATTN_TRAIN_MAX_LEN (static shared memory, which
// BERT's 512 positions fit).
#include "common.cuh"

#define BERTRT_ATTN_TRAIN_THREADS 128
#define BERTRT_ATTN_TRAIN_MAX_DIM 128
#define BERTRT_ATTN_TRAIN_MAX_LEN 512
// Rows of a block, and rows of the other side staged per tile.
#define BERTRT_ATTN_TRAIN_ROWS 8
#define BERTRT_ATTN_TRAIN_TILE 32
// Outputs per thread: ROWS * MAX_DIM / THREADS.
#define BERTRT_ATTN_TRAIN_OUTS (BERTRT_ATTN_TRAIN_ROWS * BERTRT_ATTN_TRAIN_MAX_DIM / BERTRT_ATTN_TRAIN_THREADS)

// Loads rows [first, first + count) of a strided matrix (head_dim columns
// from `base`, `stride` apart) into tile[row][c], rows padded to MAX_DIM + 1
// floats so that threads reading one column of consecutive rows hit
// different banks.
__device__ __forceinline__ void load_tile(
    float (*tile)[BERTRT_ATTN_TRAIN_MAX_DIM + 1],
    const float* __restrict__ base,
    size_t stride,
    int first,
    int count,
    int head_dim)
{
    for (int e = threadIdx.x; e < count * head_dim; e += blockDim.x) {
        const int r = e / head_dim, c = e - r * head_dim;
        tile[r][c] = base[(size_t)(first + r) * stride + c];
    }
}

// scores[r][j] = scale * (rows[r] . other_j) for the block's `rows_here`
// rows (in `rows`) and every j < len of the other side (`other`, stride
// apart), staged TILE rows at a time through `tile`.
__device__ __forceinline__ void row_dots(
    float (*scores)[BERTRT_ATTN_TRAIN_MAX_LEN],
    float (*rows)[BERTRT_ATTN_TRAIN_MAX_DIM + 1],
    float (*tile)[BERTRT_ATTN_TRAIN_MAX_DIM + 1],
    const float* __restrict__ other,
    size_t stride,
    int rows_here,
    int len,
    int head_dim,
    float scale)
{
    for (int j0 = 0; j0 < len; j0 += BERTRT_ATTN_TRAIN_TILE) {
        const int count = min(BERTRT_ATTN_TRAIN_TILE, len - j0);
        __syncthreads();  // the previous tile is no longer read
        load_tile(tile, other, stride, j0, count, head_dim);
        __syncthreads();
        for (int e = threadIdx.x; e < rows_here * count; e += blockDim.x) {
            const int r = e / count, j = e - r * count;
            float dot = 0.f;
            for (int c = 0; c < head_dim; ++c) dot = fmaf(rows[r][c], tile[j][c], dot);
            scores[r][j0 + j] = dot * scale;
        }
    }
    __syncthreads();
}

// out[r][c] = sum over j < len of weight[r][j] * other_j[c], written to
// out + r * out_stride + c for the block's rows, `other` staged through
// `tile` as in row_dots.
__device__ __forceinline__ void weighted_rows(
    float* __restrict__ out,
    size_t out_stride,
    float (*weight)[BERTRT_ATTN_TRAIN_MAX_LEN],
    float (*tile)[BERTRT_ATTN_TRAIN_MAX_DIM + 1],
    const float* __restrict__ other,
    size_t stride,
    int rows_here,
    int len,
    int head_dim)
{
    float acc[BERTRT_ATTN_TRAIN_OUTS];
#pragma unroll
    for (int k = 0; k < BERTRT_ATTN_TRAIN_OUTS; ++k) acc[k] = 0.f;
    const int outputs = rows_here * head_dim;
    for (int j0 = 0; j0 < len; j0 += BERTRT_ATTN_TRAIN_TILE) {
        const int count = min(BERTRT_ATTN_TRAIN_TILE, len - j0);
        __syncthreads();
        load_tile(tile, other, stride, j0, count, head_dim);
        __syncthreads();
#pragma unroll
        for (int k = 0; k < BERTRT_ATTN_TRAIN_OUTS; ++k) {
            const int e = threadIdx.x + k * BERTRT_ATTN_TRAIN_THREADS;
            if (e < outputs) {
                const int r = e / head_dim, c = e - r * head_dim;
                for (int j = 0; j < count; ++j) acc[k] = fmaf(weight[r][j0 + j], tile[j][c], acc[k]);
            }
        }
    }
#pragma unroll
    for (int k = 0; k < BERTRT_ATTN_TRAIN_OUTS; ++k) {
        const int e = threadIdx.x + k * BERTRT_ATTN_TRAIN_THREADS;
        if (e < outputs) {
            const int r = e / head_dim, c = e - r * head_dim;
            out[(size_t)r * out_stride + c] = acc[k];
        }
    }
}

// p, or its dropped-out value: 0 with probability dropout_p, else p / (1 - p).
__device__ __forceinline__ float dropped(
    float p, unsigned long long key, unsigned long long index, float dropout_p, float keep_scale)
{
    if (dropout_p == 0.f) return p;
    return dropout_uniform(key, index) < dropout_p ? 0.f : p * keep_scale;
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
    __shared__ float rows[BERTRT_ATTN_TRAIN_ROWS][BERTRT_ATTN_TRAIN_MAX_DIM + 1];
    __shared__ float tile[BERTRT_ATTN_TRAIN_TILE][BERTRT_ATTN_TRAIN_MAX_DIM + 1];
    __shared__ float weight[BERTRT_ATTN_TRAIN_ROWS][BERTRT_ATTN_TRAIN_MAX_LEN];
    const int h = blockIdx.y, s = blockIdx.z;
    const int start = offsets[s], len = offsets[s + 1] - start;
    const int i0 = blockIdx.x * BERTRT_ATTN_TRAIN_ROWS;
    if (i0 >= len) return;  // block-uniform
    const int rows_here = min(BERTRT_ATTN_TRAIN_ROWS, len - i0);
    const int hidden = heads * head_dim;
    const size_t stride = 3 * (size_t)hidden;
    const float* q = qkv + (size_t)start * stride + h * head_dim;
    load_tile(rows, q, stride, i0, rows_here, head_dim);
    row_dots(weight, rows, tile, q + hidden, stride, rows_here, len, head_dim, scale);

    // Softmax, one warp per row.
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const unsigned long long key = dropout_key(seed);
    const float keep_scale = 1.f / (1.f - dropout_p);
    for (int r = warp; r < rows_here; r += warps) {
        float m = -INFINITY;
        for (int j = lane; j < len; j += 32) m = fmaxf(m, weight[r][j]);
        m = warp_max(m);
        float sum = 0.f;
        for (int j = lane; j < len; j += 32) {
            weight[r][j] = expf(weight[r][j] - m);
            sum += weight[r][j];
        }
        const float inv_sum = 1.f / warp_sum(sum);
        const size_t row = probs_base[s] + ((size_t)h * len + i0 + r) * len;
        for (int j = lane; j < len; j += 32) {
            const float p = weight[r][j] * inv_sum;
            probs[row + j] = p;
            weight[r][j] = dropped(p, key, row + j, dropout_p, keep_scale);
        }
    }
    weighted_rows(out + (size_t)(start + i0) * hidden + h * head_dim, hidden, weight, tile,
                  q + 2 * hidden, stride, rows_here, len, head_dim);
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
    __shared__ float rows[BERTRT_ATTN_TRAIN_ROWS][BERTRT_ATTN_TRAIN_MAX_DIM + 1];
    __shared__ float tile[BERTRT_ATTN_TRAIN_TILE][BERTRT_ATTN_TRAIN_MAX_DIM + 1];
    __shared__ float weight[BERTRT_ATTN_TRAIN_ROWS][BERTRT_ATTN_TRAIN_MAX_LEN];
    const int h = blockIdx.y, s = blockIdx.z;
    const int start = offsets[s], len = offsets[s + 1] - start;
    const int i0 = blockIdx.x * BERTRT_ATTN_TRAIN_ROWS;
    if (i0 >= len) return;  // block-uniform
    const int rows_here = min(BERTRT_ATTN_TRAIN_ROWS, len - i0);
    const int hidden = heads * head_dim;
    const size_t stride = 3 * (size_t)hidden;
    const float* keys = qkv + (size_t)start * stride + hidden + h * head_dim;
    load_tile(rows, d_out + (size_t)start * hidden + h * head_dim, hidden, i0, rows_here, head_dim);
    // dP before dropout's mask: dO_i . v_j.
    row_dots(weight, rows, tile, keys + hidden, stride, rows_here, len, head_dim, 1.f);

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const unsigned long long key = dropout_key(seed);
    const float keep_scale = 1.f / (1.f - dropout_p);
    for (int r = warp; r < rows_here; r += warps) {
        const size_t row = probs_base[s] + ((size_t)h * len + i0 + r) * len;
        float dot = 0.f;
        for (int j = lane; j < len; j += 32) {
            const float d_p = dropped(weight[r][j], key, row + j, dropout_p, keep_scale);
            weight[r][j] = d_p;
            dot = fmaf(probs[row + j], d_p, dot);
        }
        dot = warp_sum(dot);
        for (int j = lane; j < len; j += 32) {
            const float d_s = probs[row + j] * (weight[r][j] - dot) * scale;
            d_scores[row + j] = d_s;
            weight[r][j] = d_s;
        }
    }
    weighted_rows(d_qkv + (size_t)(start + i0) * stride + h * head_dim, stride, weight, tile, keys,
                  stride, rows_here, len, head_dim);
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
    __shared__ float tile[BERTRT_ATTN_TRAIN_TILE][BERTRT_ATTN_TRAIN_MAX_DIM + 1];
    // Columns j0.. of dS, then of dropout(P), transposed: [key row][query].
    __shared__ float column[BERTRT_ATTN_TRAIN_ROWS][BERTRT_ATTN_TRAIN_MAX_LEN];
    const int h = blockIdx.y, s = blockIdx.z;
    const int start = offsets[s], len = offsets[s + 1] - start;
    const int j0 = blockIdx.x * BERTRT_ATTN_TRAIN_ROWS;
    if (j0 >= len) return;  // block-uniform
    const int rows_here = min(BERTRT_ATTN_TRAIN_ROWS, len - j0);
    const int hidden = heads * head_dim;
    const size_t stride = 3 * (size_t)hidden;
    const unsigned long long key = dropout_key(seed);
    const float keep_scale = 1.f / (1.f - dropout_p);
    float* d_rows = d_qkv + (size_t)(start + j0) * stride + h * head_dim;
    // Query i's entries for this block's keys are contiguous: a warp reads
    // 32 / ROWS queries' runs at once.
    for (int e = threadIdx.x; e < len * rows_here; e += blockDim.x) {
        const int i = e / rows_here, j = e - i * rows_here;
        column[j][i] = d_scores[probs_base[s] + ((size_t)h * len + i) * len + j0 + j];
    }
    weighted_rows(d_rows + hidden, stride, column, tile, qkv + (size_t)start * stride + h * head_dim,
                  stride, rows_here, len, head_dim);
    __syncthreads();  // every thread is done reading dS
    for (int e = threadIdx.x; e < len * rows_here; e += blockDim.x) {
        const int i = e / rows_here, j = e - i * rows_here;
        const size_t at = probs_base[s] + ((size_t)h * len + i) * len + j0 + j;
        column[j][i] = dropped(probs[at], key, at, dropout_p, keep_scale);
    }
    weighted_rows(d_rows + 2 * hidden, stride, column, tile,
                  d_out + (size_t)start * hidden + h * head_dim, hidden, rows_here, len, head_dim);
}
