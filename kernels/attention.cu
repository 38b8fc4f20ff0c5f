// Multi-head self-attention over packed sequences, fp32, flash style.
//
// qkv is [tokens, 3 * hidden] (Q | K | V, each head's head_dim columns side by
// side), out is [tokens, hidden]; sequence s owns tokens offsets[s] ..
// offsets[s+1] and attends only to itself, so no padding mask is needed and
// no work is spent on padding. Scores are scaled by 1/sqrt(head_dim).
//
// Algorithm: one thread block of 128 threads per (sequence, head, block of
// BQ queries); the grid's x flattens (sequence, query block) and blocks past
// a sequence's end exit at once. T threads share one query: each owns
// D_MAX / T = 32 of its dimensions (interleaved, d = sub + T * i) and keeps
// its slice of q and of the output accumulator in registers; a score is the
// sum of the T partial dot products (log2 T shuffles). Keys and values stream
// through shared memory in tiles of BK rows (32 KiB for K and V together);
// each tile is consumed in chunks of 16 keys with the online softmax
// (running max m and denominator l per query, the accumulator rescaled once
// per chunk), so the S x S score matrix never exists. All threads of a warp
// read the same K/V row, or adjacent words of it, so shared-memory reads are
// broadcasts without bank conflicts.
//
// Instances: D_MAX 32 (T = 1, BQ = 128), 64 (T = 2, BQ = 64) and 128 (T = 4,
// BQ = 32); any head_dim <= D_MAX runs on the instance above it, the unused
// dimensions being zero. Masked and not-yet-seen scores use a large finite
// negative (-1e30), never -inf, so no inf - inf or 0 * inf can arise.
#include "common.cuh"

#define BERTRT_ATTN_THREADS 128
#define BERTRT_ATTN_CHUNK 16
#define BERTRT_MASK_VALUE -1e30f

// __noinline__: ptxas 11.8 (Debian's nvidia-cuda-toolkit) segfaults on the
// sm_90 build of this body inlined into the kernels with -lineinfo; as a
// separate function it assembles (one call per thread, no stack frame).
template <int D_MAX, int T>
__device__ __noinline__ void attention_impl(
    float* __restrict__ out,
    const float* __restrict__ qkv,
    const int* __restrict__ offsets,
    int query_blocks,
    int heads,
    int head_dim,
    float scale)
{
    constexpr int BQ = BERTRT_ATTN_THREADS / T;
    constexpr int DPT = D_MAX / T;
    constexpr int BK = 4096 / D_MAX;
    constexpr int CH = BERTRT_ATTN_CHUNK;
    static_assert(BK % CH == 0, "a tile holds whole chunks");
    static_assert(32 % T == 0, "a query's threads sit in one warp");
    __shared__ float ks[BK][D_MAX];
    __shared__ float vs[BK][D_MAX];

    const int seq = blockIdx.x / query_blocks;
    const int q0 = (blockIdx.x % query_blocks) * BQ;
    const int h = blockIdx.y;
    const int start = offsets[seq];
    const int len = offsets[seq + 1] - start;
    if (q0 >= len) return;  // uniform across the block: before any barrier

    const int hidden = heads * head_dim;
    const size_t stride = 3 * (size_t)hidden;
    const int qi = q0 + (int)threadIdx.x / T;
    const int sub = (int)threadIdx.x % T;
    const bool valid = qi < len;

    float q[DPT], acc[DPT];
    {
        const float* qrow = qkv + (size_t)(start + (valid ? qi : 0)) * stride + (size_t)h * head_dim;
#pragma unroll
        for (int i = 0; i < DPT; ++i) {
            const int d = sub + T * i;
            q[i] = (valid && d < head_dim) ? qrow[d] : 0.f;
            acc[i] = 0.f;
        }
    }
    float m = BERTRT_MASK_VALUE, l = 0.f;

    for (int k0 = 0; k0 < len; k0 += BK) {
        const int n = min(BK, len - k0);
        __syncthreads();  // the previous tile has been consumed
        for (int idx = threadIdx.x; idx < BK * D_MAX; idx += BERTRT_ATTN_THREADS) {
            const int j = idx / D_MAX, d = idx % D_MAX;
            float kv = 0.f, vv = 0.f;
            if (j < n && d < head_dim) {
                const float* r = qkv + (size_t)(start + k0 + j) * stride + (size_t)h * head_dim + d;
                kv = r[hidden];
                vv = r[2 * hidden];
            }
            ks[j][d] = kv;
            vs[j][d] = vv;
        }
        __syncthreads();

        for (int c0 = 0; c0 < n; c0 += CH) {
            float s[CH];
            float cmax = BERTRT_MASK_VALUE;
#pragma unroll
            for (int jj = 0; jj < CH; ++jj) {
                const int j = c0 + jj;  // < BK: c0 < n <= BK and BK % CH == 0
                float dot = 0.f;
#pragma unroll
                for (int i = 0; i < DPT; ++i) dot = fmaf(q[i], ks[j][sub + T * i], dot);
#pragma unroll
                for (int o = T / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(BERTRT_FULL_MASK, dot, o);
                s[jj] = j < n ? dot * scale : BERTRT_MASK_VALUE;
                cmax = fmaxf(cmax, s[jj]);
            }
            // c0 < n, so s[0] is a real score and m_new is finite.
            const float m_new = fmaxf(m, cmax);
            const float corr = expf(m - m_new);
            l *= corr;
#pragma unroll
            for (int i = 0; i < DPT; ++i) acc[i] *= corr;
#pragma unroll
            for (int jj = 0; jj < CH; ++jj) {
                const int j = c0 + jj;
                const float p = j < n ? expf(s[jj] - m_new) : 0.f;
                l += p;
#pragma unroll
                for (int i = 0; i < DPT; ++i) acc[i] = fmaf(p, vs[j][sub + T * i], acc[i]);
            }
            m = m_new;
        }
    }

    if (valid) {
        const float inv = 1.f / l;
        float* orow = out + (size_t)(start + qi) * hidden + (size_t)h * head_dim;
#pragma unroll
        for (int i = 0; i < DPT; ++i) {
            const int d = sub + T * i;
            if (d < head_dim) orow[d] = acc[i] * inv;
        }
    }
}

#define BERTRT_ATTENTION_INSTANCE(NAME, D_MAX, T)                                     \
    extern "C" __global__ void __launch_bounds__(BERTRT_ATTN_THREADS) NAME(           \
        float* __restrict__ out, const float* __restrict__ qkv,                       \
        const int* __restrict__ offsets, int query_blocks, int heads, int head_dim,   \
        float scale)                                                                  \
    {                                                                                 \
        attention_impl<D_MAX, T>(out, qkv, offsets, query_blocks, heads, head_dim,    \
                                 scale);                                              \
    }

BERTRT_ATTENTION_INSTANCE(attention_d32_f32, 32, 1)
BERTRT_ATTENTION_INSTANCE(attention_d64_f32, 64, 2)
BERTRT_ATTENTION_INSTANCE(attention_d128_f32, 128, 4)
