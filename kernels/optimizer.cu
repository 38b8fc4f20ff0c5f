// The optimizer step of mixed-precision training: loss-scale unscaling with
// an inf/NaN check, the global gradient norm with its clip factor, and AdamW
// over fp32 master weights.
//
// A step without a host round trip (the host only reads `found_inf` and the
// norm afterwards, for the loss scaler and the log):
//   1. grad_sumsq_<G> once per gradient tensor, each launch writing its own
//      slice of `partials` (one float per block: the block's sum of
//      (g / loss_scale)^2) and raising *found_inf when that sum is not finite
//      (a NaN or inf gradient, or a square that overflows fp32);
//   2. grad_norm_finish, one block: norm = sqrt of the sum of every partial,
//      added in a fixed order in double (deterministic: the same gradients
//      give the same bits however the tensors were launched), and the factor
//      AdamW applies to the raw gradients, inv_scale * min(1, max_norm/norm)
//      (src/train/run.rs clips at norm > max_norm to max_norm / norm);
//   3. adamw_<G>_<W> once per parameter tensor, reading that factor from
//      device memory and returning at once when *found_inf is set: the step
//      is skipped, master weights and moments untouched.
// unscale_<G> is the in-place alternative to the fused factor (g *= 1/scale,
// same inf/NaN flag), for callers that want unscaled gradients stored.
//
// AdamW is PyTorch's (decoupled decay) and src/backend/cpu/train.rs's
// adamw_slice operation for operation: m = b1 m + (1 - b1) g, v = b2 v +
// (1 - b2) g g, p = p (1 - lr wd) - lr (m / c1) / (sqrt(v / c2) + eps), with
// the bias corrections c1 = 1 - b1^t, c2 = 1 - b2^t computed by the host in
// f32 exactly as the CPU does. Weight decay is per tensor: the host passes
// weight_decay = 0 for tensors exempt from decay (biases, LayerNorm), as
// ParamStore::adamw_step does. The master weight, m and v are fp32; the
// gradient is G (float, __half or __nv_bfloat16); when `copy` is not null the updated
// weight is also written to it in W, the compute copy the forward pass
// reads. Grid-stride loops over 256-thread blocks; memory bound.
#include "common.cuh"

#define BERTRT_OPT_THREADS 256

template <typename G>
__device__ __noinline__ void grad_sumsq_impl(
    float* __restrict__ partials,
    const G* __restrict__ grad,
    unsigned long long n,
    float inv_scale,
    int* __restrict__ found_inf)
{
    __shared__ float scratch[32];
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    float sum = 0.f;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float g = to_f32(grad[i]) * inv_scale;
        sum = fmaf(g, g, sum);
    }
    sum = block_sum(sum, scratch);
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = sum;
        if (!isfinite(sum)) atomicExch(found_inf, 1);
    }
}

template <typename G>
__device__ __noinline__ void unscale_impl(
    G* __restrict__ grad,
    unsigned long long n,
    float inv_scale,
    int* __restrict__ found_inf)
{
    __shared__ float scratch[32];
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    float bad = 0.f;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float g = to_f32(grad[i]) * inv_scale;
        if (!isfinite(g)) bad = 1.f;
        grad[i] = from_f32<G>(g);
    }
    bad = block_sum(bad, scratch);
    if (threadIdx.x == 0 && bad > 0.f) atomicExch(found_inf, 1);
}

// out[0] = the global norm (inf or NaN when a gradient was), out[1] = the
// factor for AdamW (0 when the step is skipped). max_norm <= 0: no clipping.
extern "C" __global__ void __launch_bounds__(BERTRT_OPT_THREADS) grad_norm_finish(
    float* __restrict__ out,
    const float* __restrict__ partials,
    int count,
    float max_norm,
    float inv_scale,
    const int* __restrict__ found_inf)
{
    __shared__ double sums[BERTRT_OPT_THREADS];
    double sum = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) sum += (double)partials[i];
    sums[threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (int i = 0; i < (int)blockDim.x; ++i) total += sums[i];
        const double norm = sqrt(total);
        float factor = inv_scale;
        if (max_norm > 0.f && norm > (double)max_norm) factor *= (float)((double)max_norm / norm);
        const bool skip = (found_inf != nullptr && *found_inf != 0) || !isfinite(norm);
        out[0] = (float)norm;
        out[1] = skip ? 0.f : factor;
    }
}

template <typename G, typename W>
__device__ __noinline__ void adamw_impl(
    float* __restrict__ param,
    W* __restrict__ copy,
    const G* __restrict__ grad,
    float* __restrict__ m,
    float* __restrict__ v,
    unsigned long long n,
    float lr,
    float beta1,
    float beta2,
    float eps,
    float weight_decay,
    float correction1,
    float correction2,
    const float* __restrict__ grad_factor,
    const int* __restrict__ found_inf)
{
    if (found_inf != nullptr && *found_inf != 0) return;  // skipped step
    const float factor = grad_factor != nullptr ? *grad_factor : 1.f;
    const float decay = 1.f - lr * weight_decay;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float g = to_f32(grad[i]) * factor;
        const float mi = beta1 * m[i] + (1.f - beta1) * g;
        const float vi = beta2 * v[i] + (1.f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        const float m_hat = mi / correction1;
        const float v_hat = vi / correction2;
        const float p = param[i] * decay - lr * m_hat / (sqrtf(v_hat) + eps);
        param[i] = p;
        if (copy != nullptr) copy[i] = from_f32<W>(p);
    }
}

#define BERTRT_GRAD_INSTANCES(SUFFIX, G)                                                       \
    extern "C" __global__ void __launch_bounds__(BERTRT_OPT_THREADS) grad_sumsq_##SUFFIX(      \
        float* __restrict__ partials, const G* __restrict__ grad, unsigned long long n,        \
        float inv_scale, int* __restrict__ found_inf)                                          \
    {                                                                                          \
        grad_sumsq_impl<G>(partials, grad, n, inv_scale, found_inf);                           \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(BERTRT_OPT_THREADS) unscale_##SUFFIX(         \
        G* __restrict__ grad, unsigned long long n, float inv_scale, int* __restrict__ found_inf) \
    {                                                                                          \
        unscale_impl<G>(grad, n, inv_scale, found_inf);                                        \
    }

BERTRT_GRAD_INSTANCES(f32, float)
BERTRT_GRAD_INSTANCES(f16, __half)
BERTRT_GRAD_INSTANCES(bf16, __nv_bfloat16)

#define BERTRT_ADAMW_INSTANCE(NAME, G, W)                                                      \
    extern "C" __global__ void __launch_bounds__(BERTRT_OPT_THREADS) NAME(                     \
        float* __restrict__ param, W* __restrict__ copy, const G* __restrict__ grad,           \
        float* __restrict__ m, float* __restrict__ v, unsigned long long n, float lr,           \
        float beta1, float beta2, float eps, float weight_decay, float correction1,            \
        float correction2, const float* __restrict__ grad_factor,                              \
        const int* __restrict__ found_inf)                                                     \
    {                                                                                          \
        adamw_impl<G, W>(param, copy, grad, m, v, n, lr, beta1, beta2, eps, weight_decay,      \
                         correction1, correction2, grad_factor, found_inf);                    \
    }

// adamw_<gradient type>_<compute copy type>
BERTRT_ADAMW_INSTANCE(adamw_f32_f32, float, float)
BERTRT_ADAMW_INSTANCE(adamw_f32_f16, float, __half)
BERTRT_ADAMW_INSTANCE(adamw_f32_bf16, float, __nv_bfloat16)
BERTRT_ADAMW_INSTANCE(adamw_f16_f16, __half, __half)
BERTRT_ADAMW_INSTANCE(adamw_bf16_bf16, __nv_bfloat16, __nv_bfloat16)
