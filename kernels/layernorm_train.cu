// LayerNorm for training: the fused residual + LayerNorm forward that saves
// each row's mean and 1/std, and the backward (d_x, and d_gamma / d_beta as
// deterministic per-block partial sums).
//
// Forward (one block per row, as layer_norm_f32): x = x + residual (rounded
// to T and written back: it is the LayerNorm input backward needs, and the
// residual stream's next value), then the two-pass mean and variance over the
// stored row (no E[x^2] - E[x]^2 cancellation), out = (x - mean) * rstd *
// gamma + beta, and mean / rstd (fp32) saved per row. No limit on cols.
//
// Backward, with xhat = (x - mean) * rstd and dxhat = dy * gamma:
//   d_x = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),
//   d_gamma += sum over rows of dy * xhat,   d_beta += sum over rows of dy,
// as layer_norm_backward_rows in src/backend/cpu/train.rs. A block walks the
// rows blockIdx.x, blockIdx.x + gridDim.x, ...; each thread holds the
// BERTRT_LN_VPT columns c = threadIdx.x + i * blockDim.x of a row in
// registers (one read of dy and x per element; cols <= VPT * blockDim.x =
// 2048 at 256 threads, which the launcher must check), two block reductions give the row means, and the thread's
// d_gamma / d_beta partials for its columns stay in registers across rows.
// At the end each block writes its partial row to dgamma_partials /
// dbeta_partials [gridDim.x][cols]; column_sum_f32 (kernels/reduce.cu) adds
// them into the gradients in a fixed order. fp32 accumulation throughout.
#include "common.cuh"

#define BERTRT_LN_VPT 8

template <typename T>
__device__ __noinline__ void layer_norm_forward_impl(
    T* __restrict__ out,
    T* __restrict__ x,
    const T* __restrict__ residual,
    const T* __restrict__ gamma,
    const T* __restrict__ beta,
    float* __restrict__ mean_out,
    float* __restrict__ rstd_out,
    float eps,
    int cols)
{
    __shared__ float scratch[32];
    T* row = x + (size_t)blockIdx.x * cols;
    float sum = 0.f;
    if (residual != nullptr) {
        const T* res = residual + (size_t)blockIdx.x * cols;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) {
            const T v = from_f32<T>(to_f32(row[c]) + to_f32(res[c]));
            row[c] = v;
            sum += to_f32(v);
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x) sum += to_f32(row[c]);
    }
    const float mean = block_sum(sum, scratch) / (float)cols;
    float sq = 0.f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float d = to_f32(row[c]) - mean;
        sq += d * d;
    }
    const float var = block_sum(sq, scratch) / (float)cols;
    const float rstd = 1.f / sqrtf(var + eps);
    T* o = out + (size_t)blockIdx.x * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        o[c] = from_f32<T>((to_f32(row[c]) - mean) * rstd * to_f32(gamma[c]) + to_f32(beta[c]));
    if (threadIdx.x == 0) {
        mean_out[blockIdx.x] = mean;
        rstd_out[blockIdx.x] = rstd;
    }
}

template <typename T>
__device__ __noinline__ void layer_norm_backward_impl(
    T* __restrict__ d_x,
    float* __restrict__ dgamma_partials,
    float* __restrict__ dbeta_partials,
    const T* __restrict__ d_out,
    const T* __restrict__ x,
    const T* __restrict__ gamma,
    const float* __restrict__ mean,
    const float* __restrict__ rstd,
    int rows,
    int cols)
{
    constexpr int VPT = BERTRT_LN_VPT;
    __shared__ float scratch[32];
    float g[VPT], dg[VPT], db[VPT];
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
        const int c = threadIdx.x + i * blockDim.x;
        g[i] = c < cols ? to_f32(gamma[c]) : 0.f;
        dg[i] = 0.f;
        db[i] = 0.f;
    }
    const float inv_cols = 1.f / (float)cols;
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const float mu = mean[r], rs = rstd[r];
        const T* dy_row = d_out + (size_t)r * cols;
        const T* x_row = x + (size_t)r * cols;
        float dxhat[VPT], xhat[VPT];
        float sum_d = 0.f, sum_dx = 0.f;
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
            const int c = threadIdx.x + i * blockDim.x;
            float dy = 0.f, xh = 0.f;
            if (c < cols) {
                dy = to_f32(dy_row[c]);
                xh = (to_f32(x_row[c]) - mu) * rs;
            }
            xhat[i] = xh;
            dxhat[i] = dy * g[i];
            sum_d += dxhat[i];
            sum_dx += dxhat[i] * xh;
            dg[i] += dy * xh;
            db[i] += dy;
        }
        const float mean_d = block_sum(sum_d, scratch) * inv_cols;
        const float mean_dx = block_sum(sum_dx, scratch) * inv_cols;
        T* dx_row = d_x + (size_t)r * cols;
#pragma unroll
        for (int i = 0; i < VPT; ++i) {
            const int c = threadIdx.x + i * blockDim.x;
            if (c < cols) dx_row[c] = from_f32<T>(rs * (dxhat[i] - mean_d - xhat[i] * mean_dx));
        }
    }
    if (dgamma_partials == nullptr) return;  // frozen: d_x only
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
        const int c = threadIdx.x + i * blockDim.x;
        if (c < cols) {
            dgamma_partials[(size_t)blockIdx.x * cols + c] = dg[i];
            dbeta_partials[(size_t)blockIdx.x * cols + c] = db[i];
        }
    }
}

#define BERTRT_LN_TRAIN_INSTANCES(SUFFIX, T)                                                     \
    extern "C" __global__ void __launch_bounds__(256) layer_norm_forward_##SUFFIX(              \
        T* __restrict__ out, T* __restrict__ x, const T* __restrict__ residual,                  \
        const T* __restrict__ gamma, const T* __restrict__ beta, float* __restrict__ mean,       \
        float* __restrict__ rstd, float eps, int cols)                                           \
    {                                                                                            \
        layer_norm_forward_impl<T>(out, x, residual, gamma, beta, mean, rstd, eps, cols);        \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(256) layer_norm_backward_##SUFFIX(             \
        T* __restrict__ d_x, float* __restrict__ dgamma_partials,                                \
        float* __restrict__ dbeta_partials, const T* __restrict__ d_out,                         \
        const T* __restrict__ x, const T* __restrict__ gamma, const float* __restrict__ mean,    \
        const float* __restrict__ rstd, int rows, int cols)                                      \
    {                                                                                            \
        layer_norm_backward_impl<T>(d_x, dgamma_partials, dbeta_partials, d_out, x, gamma, mean, \
                                    rstd, rows, cols);                                           \
    }

BERTRT_LN_TRAIN_INSTANCES(f32, float)
BERTRT_LN_TRAIN_INSTANCES(f16, __half)
BERTRT_LN_TRAIN_INSTANCES(bf16, __nv_bfloat16)
