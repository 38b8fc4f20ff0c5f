// Softmax cross-entropy over rows of `classes` logits: per-row loss and the
// gradient with respect to the logits, in one kernel.
//
// Row r with label y = labels[r] >= 0 and weight w (weights null: 1):
//   loss_r = w * (logsumexp(x) - x_y) * inv_total       (to losses[r])
//   d_r    = (softmax(x) - onehot(y)) * w * inv_total * grad_scale
// A negative label (the -100 ignore_index convention) marks a row that does
// not count: its loss is 0 and its gradient row is zeroed. inv_total is
// 1 / (sum of the counted rows' weights), which the host knows from the
// labels before the launch, so the mean needs no second pass; the host adds
// the per-row losses (a fixed order, deterministic) for the step's loss.
// grad_scale is the loss scale of fp16 training (1 otherwise): the backward
// pass starts from the scaled loss. The loss is computed as logsumexp - x_y
// (no log of a rounded probability) and capped at -ln(FLT_MIN) = 87.34, the
// largest value src/backend/cpu/train.rs's cross_entropy can return (it
// clamps the probability at f32::MIN_POSITIVE).
//
// One block per row (row_threads(classes) threads): a block max, a block sum
// of exp(x - max), then the gradient written with exp recomputed (not stored
// in T and re-read, which would round it in fp16 / bf16). fp32 arithmetic.
#include "common.cuh"

#define BERTRT_CE_MAX_LOSS 87.33654475f

template <typename T>
__device__ __noinline__ void cross_entropy_impl(
    float* __restrict__ losses,
    T* __restrict__ d_logits,
    const T* __restrict__ logits,
    const int* __restrict__ labels,
    const float* __restrict__ weights,
    float inv_total,
    float grad_scale,
    int classes)
{
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    const int label = labels[r];
    const T* x = logits + (size_t)r * classes;
    T* d = d_logits + (size_t)r * classes;
    if (label < 0) {  // block-uniform, before any barrier
        for (int c = threadIdx.x; c < classes; c += blockDim.x) d[c] = from_f32<T>(0.f);
        if (threadIdx.x == 0) losses[r] = 0.f;
        return;
    }
    const float w = weights != nullptr ? weights[r] : 1.f;
    float m = -INFINITY;
    for (int c = threadIdx.x; c < classes; c += blockDim.x) m = fmaxf(m, to_f32(x[c]));
    m = block_max(m, scratch);
    float sum = 0.f;
    for (int c = threadIdx.x; c < classes; c += blockDim.x) sum += expf(to_f32(x[c]) - m);
    sum = block_sum(sum, scratch);
    if (threadIdx.x == 0) {
        const float loss = fminf(m + logf(sum) - to_f32(x[label]), BERTRT_CE_MAX_LOSS);
        losses[r] = w * loss * inv_total;
    }
    const float coef = w * inv_total * grad_scale;
    const float inv_sum = 1.f / sum;
    for (int c = threadIdx.x; c < classes; c += blockDim.x) {
        const float p = expf(to_f32(x[c]) - m) * inv_sum;
        d[c] = from_f32<T>((p - (c == label ? 1.f : 0.f)) * coef);
    }
}

#define BERTRT_CE_INSTANCE(NAME, T)                                                           \
    extern "C" __global__ void __launch_bounds__(256) NAME(                                   \
        float* __restrict__ losses, T* __restrict__ d_logits, const T* __restrict__ logits,   \
        const int* __restrict__ labels, const float* __restrict__ weights, float inv_total,   \
        float grad_scale, int classes)                                                        \
    {                                                                                         \
        cross_entropy_impl<T>(losses, d_logits, logits, labels, weights, inv_total,           \
                              grad_scale, classes);                                           \
    }

BERTRT_CE_INSTANCE(cross_entropy_f32, float)
BERTRT_CE_INSTANCE(cross_entropy_f16, __half)
BERTRT_CE_INSTANCE(cross_entropy_bf16, __nv_bfloat16)
