// Runs every kernel of kernels/*.cu on the CPU through cuda_emu.h, with the
// launch geometry of src/backend/cuda/mod.rs, against plain double-precision
// loops (the math of src/backend/cpu/reference.rs). It checks indexing,
// tiling and control flow without a GPU; it says nothing about speed, and
// the GPU tests (tests/cuda.rs) remain the real check.
//
// The training kernels (issue 6) run for each storage type (fp32, fp16,
// bf16) against double-precision loops over the values as stored (already
// rounded to T). Tolerances: fp32 outputs a few fp32 ulps of the result's
// scale; fp16 / bf16 outputs a relative 1.01 * 2^-11 / 1.01 * 2^-8 (the
// final rounding into T is at most half an ulp) plus a small absolute term
// for subnormals and cancellation; fp32 reductions (norms, bias, gamma and
// beta gradients, losses) 1e-5 relative or absolute, whichever the test
// states. Exact checks: dropout against src/rng.rs's uniform_at (golden
// values shared with a Rust test), AdamW's fp32 path bit for bit against
// adamw_slice's operation order, skipped steps leave state untouched.
//
// The fp32 training attention, scatter and pointwise kernels are held to
// double-precision loops of their header formulas, at 1e-5 (1e-6 for the
// probabilities) of each output's largest magnitude; the attention cases
// also run with the blocks in reverse order (emu::reverse_blocks) and with
// poisoned memory past the batch, so a block that writes outside its own
// rows fails.
//
//   kernels/emu/run.sh     (g++ with AddressSanitizer: out-of-bounds reads
//                           and writes of the kernels fail the run)
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda_emu.h"

#include "../attention.cu"
#include "../attention_train.cu"
#include "../cross_entropy.cu"
#include "../dropout.cu"
#include "../embedding.cu"
#include "../epilogue.cu"
#include "../epilogue_train.cu"
#include "../layernorm.cu"
#include "../layernorm_train.cu"
#include "../optimizer.cu"
#include "../pointwise.cu"
#include "../pointwise_train.cu"
#include "../pooling.cu"
#include "../reduce.cu"
#include "../scatter_train.cu"
#include "../softmax.cu"

using Vec = std::vector<float>;
using VecD = std::vector<double>;

static std::mt19937 rng(42);
static int failures = 0;

static Vec random_vec(size_t n, float scale) {
    std::uniform_real_distribution<float> u(-scale, scale);
    Vec v(n);
    for (auto& x : v) x = u(rng);
    return v;
}

static void check(const std::string& what, const Vec& got, const VecD& want, double tol) {
    double worst = 0;
    size_t at = 0;
    if (got.size() != want.size()) {
        std::printf("FAIL %s: %zu values, want %zu\n", what.c_str(), got.size(), want.size());
        ++failures;
        return;
    }
    for (size_t i = 0; i < got.size(); ++i) {
        const double d = std::isnan(got[i]) ? INFINITY : std::fabs(got[i] - want[i]);
        if (!(d <= worst)) {
            worst = d;
            at = i;
        }
    }
    const bool ok = worst <= tol;
    std::printf("%s %s: max abs diff %.3g (at %zu)\n", ok ? "ok  " : "FAIL", what.c_str(), worst, at);
    if (!ok) ++failures;
}

// As row_threads() in src/backend/cuda/mod.rs.
static unsigned row_threads(int cols) {
    return (unsigned)std::clamp((cols + 31) / 32 * 32, 32, 256);
}

static const std::vector<int> OFFSETS = {0, 1, 8, 8, 41, 171, 471};  // lengths 1 7 0 33 130 300
static const int TOKENS = 471;

static void test_embedding() {
    for (int hidden : {19, 64}) {
        const int batch = (int)OFFSETS.size() - 1;
        Vec word = random_vec(50 * hidden, 1), pos = random_vec(300 * hidden, 1), type = random_vec(2 * hidden, 1);
        std::vector<unsigned> ids(TOKENS), types(TOKENS);
        for (int t = 0; t < TOKENS; ++t) ids[t] = t * 7 % 50, types[t] = t % 3 == 0;
        VecD want(TOKENS * hidden);
        for (int s = 0; s < batch; ++s)
            for (int t = OFFSETS[s]; t < OFFSETS[s + 1]; ++t)
                for (int c = 0; c < hidden; ++c)
                    want[t * hidden + c] = (double)(word[ids[t] * hidden + c] + pos[(t - OFFSETS[s]) * hidden + c] +
                                                    type[types[t] * hidden + c]);
        Vec out(TOKENS * hidden, NAN);
        emu::launch(embedding_f32, {(unsigned)TOKENS}, {row_threads(hidden)}, out.data(), ids.data(), types.data(),
                    OFFSETS.data(), batch, word.data(), pos.data(), type.data(), hidden);
        check("embedding hidden " + std::to_string(hidden), out, want, 0);
    }
}

static void test_layer_norm() {
    const int rows = 37;
    for (int cols : {1, 17, 384, 1000})
        for (bool use_res : {false, true}) {
            Vec x = random_vec(rows * cols, 3), res = random_vec(rows * cols, 1);
            Vec gamma = random_vec(cols, 1), beta = random_vec(cols, 1);
            VecD want(rows * cols);
            for (int r = 0; r < rows; ++r) {
                VecD v(cols);
                double mean = 0, var = 0;
                for (int c = 0; c < cols; ++c) v[c] = x[r * cols + c] + (use_res ? res[r * cols + c] : 0.0), mean += v[c];
                mean /= cols;
                for (int c = 0; c < cols; ++c) var += (v[c] - mean) * (v[c] - mean);
                var /= cols;
                for (int c = 0; c < cols; ++c)
                    want[r * cols + c] = (v[c] - mean) / std::sqrt(var + 1e-12) * gamma[c] + beta[c];
            }
            emu::launch(layer_norm_f32, {(unsigned)rows}, {row_threads(cols)}, x.data(),
                        use_res ? res.data() : nullptr, gamma.data(), beta.data(), 1e-12f, cols);
            check("layer_norm cols " + std::to_string(cols) + (use_res ? " +residual" : ""), x, want, 2e-5);
        }
}

static double gelu(double v) { return 0.5 * v * std::erfc(-v / std::sqrt(2.0)); }

static void test_bias_act() {
    const int rows = 37;
    for (int cols : {5, 300})
        for (int act : {0, 1})
            for (unsigned grid_rows : {(unsigned)rows, 7u}) {  // 7: rows grid-stride
                Vec y = random_vec(rows * cols, 3), bias = random_vec(cols, 1);
                VecD want(rows * cols);
                for (int r = 0; r < rows; ++r)
                    for (int c = 0; c < cols; ++c) {
                        const double v = (double)(y[r * cols + c] + bias[c]);
                        want[r * cols + c] = act ? gelu(v) : v;
                    }
                const unsigned threads = row_threads(cols);
                emu::launch(bias_act_f32, {(cols + threads - 1) / threads, grid_rows}, {threads}, y.data(),
                            bias.data(), rows, cols, act);
                check("bias_act cols " + std::to_string(cols) + " act " + std::to_string(act) + " grid.y " +
                          std::to_string(grid_rows),
                      y, want, 1e-6);
            }
}

static void test_softmax() {
    for (auto [rows, cols] : std::vector<std::pair<int, int>>{{13, 31}, {1, 1}, {3, 1000}}) {
        Vec x = random_vec(rows * cols, 20);
        VecD want(rows * cols);
        for (int r = 0; r < rows; ++r) {
            double m = -INFINITY, sum = 0;
            for (int c = 0; c < cols; ++c) m = std::max(m, (double)x[r * cols + c]);
            for (int c = 0; c < cols; ++c) sum += std::exp(x[r * cols + c] - m);
            for (int c = 0; c < cols; ++c) want[r * cols + c] = std::exp(x[r * cols + c] - m) / sum;
        }
        emu::launch(softmax_rows_f32, {(unsigned)rows}, {row_threads(cols)}, x.data(), cols);
        check("softmax " + std::to_string(rows) + "x" + std::to_string(cols), x, want, 1e-6);
    }
}

static void test_pooling_and_tanh() {
    const std::vector<int> offsets = {0, 1, 8, 41, 171, 471};
    const int batch = (int)offsets.size() - 1;
    for (int cols : {1, 19, 300}) {
        Vec in = random_vec(TOKENS * cols, 1);
        VecD want(batch * cols);
        for (int s = 0; s < batch; ++s)
            for (int c = 0; c < cols; ++c) {
                double sum = 0;
                for (int t = offsets[s]; t < offsets[s + 1]; ++t) sum += in[t * cols + c];
                want[s * cols + c] = sum / (offsets[s + 1] - offsets[s]);
            }
        Vec out(batch * cols, NAN);
        emu::launch(mean_pool_f32, {(unsigned)(cols + 127) / 128, (unsigned)batch}, {128}, out.data(), in.data(),
                    offsets.data(), cols);
        check("mean_pool cols " + std::to_string(cols), out, want, 1e-5);

        const std::vector<unsigned long long> rows = {0, 1, 8, 41, 470, 8};
        VecD want_rows(rows.size() * cols);
        for (size_t i = 0; i < rows.size(); ++i)
            for (int c = 0; c < cols; ++c) want_rows[i * cols + c] = in[rows[i] * cols + c];
        Vec got(rows.size() * cols, NAN);
        emu::launch(gather_rows_f32, {(unsigned)rows.size()}, {row_threads(cols)}, got.data(), in.data(), rows.data(),
                    cols);
        check("gather_rows cols " + std::to_string(cols), got, want_rows, 0);
    }
    Vec x = random_vec(1000, 4);
    VecD want(x.size());
    for (size_t i = 0; i < x.size(); ++i) want[i] = std::tanh((double)x[i]);
    emu::launch(tanh_f32, {2}, {256}, x.data(), (unsigned long long)x.size());  // grid-stride
    check("tanh 1000", x, want, 1e-6);
}

static void test_attention() {
    const int batch = (int)OFFSETS.size() - 1;
    int max_len = 0;
    for (int s = 0; s < batch; ++s) max_len = std::max(max_len, OFFSETS[s + 1] - OFFSETS[s]);
    for (auto [heads, head_dim] : std::vector<std::pair<int, int>>{{2, 32}, {2, 64}, {3, 5}, {2, 48}, {1, 100}, {1, 128}}) {
        const int hidden = heads * head_dim;
        Vec qkv = random_vec((size_t)TOKENS * 3 * hidden, 2);
        const double scale = 1.0 / std::sqrt((double)head_dim);
        VecD want((size_t)TOKENS * hidden, 0);
        for (int s = 0; s < batch; ++s)
            for (int h = 0; h < heads; ++h)
                for (int i = OFFSETS[s]; i < OFFSETS[s + 1]; ++i) {
                    VecD p;
                    double m = -INFINITY, sum = 0;
                    for (int j = OFFSETS[s]; j < OFFSETS[s + 1]; ++j) {
                        double dot = 0;
                        for (int d = 0; d < head_dim; ++d)
                            dot += (double)qkv[(size_t)i * 3 * hidden + h * head_dim + d] *
                                   qkv[(size_t)j * 3 * hidden + hidden + h * head_dim + d];
                        p.push_back(dot * scale);
                        m = std::max(m, dot * scale);
                    }
                    for (auto& v : p) sum += (v = std::exp(v - m));
                    for (int d = 0; d < head_dim; ++d) {
                        double acc = 0;
                        for (int j = OFFSETS[s]; j < OFFSETS[s + 1]; ++j)
                            acc += p[j - OFFSETS[s]] * qkv[(size_t)j * 3 * hidden + 2 * hidden + h * head_dim + d];
                        want[(size_t)i * hidden + h * head_dim + d] = acc / sum;
                    }
                }
        // As CudaBackend::attention: the instance and queries per block.
        auto kernel = head_dim <= 32 ? attention_d32_f32 : head_dim <= 64 ? attention_d64_f32 : attention_d128_f32;
        const int queries_per_block = head_dim <= 32 ? 128 : head_dim <= 64 ? 64 : 32;
        const int query_blocks = (max_len + queries_per_block - 1) / queries_per_block;
        Vec out((size_t)TOKENS * hidden, NAN);
        emu::launch(kernel, {(unsigned)(batch * query_blocks), (unsigned)heads}, {128}, out.data(), qkv.data(),
                    OFFSETS.data(), query_blocks, heads, head_dim, (float)(1.0 / std::sqrt((float)head_dim)));
        check("attention " + std::to_string(heads) + "x" + std::to_string(head_dim), out, want, 2e-5);
    }
}

// ---- Training kernels (issue 6) ----

template <typename T> struct Storage;
template <> struct Storage<float> {
    static constexpr const char* name = "f32";
    static constexpr double rtol = 0;
};
template <> struct Storage<__half> {
    static constexpr const char* name = "f16";
    static constexpr double rtol = 1.01 / 2048;  // half an ulp, 10 mantissa bits
};
template <> struct Storage<__nv_bfloat16> {
    static constexpr const char* name = "bf16";
    static constexpr double rtol = 1.01 / 256;  // half an ulp, 7 mantissa bits
};

template <typename T> static std::vector<T> store(const Vec& v) {
    std::vector<T> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = from_f32<T>(v[i]);
    return out;
}
template <typename T> static Vec load(const std::vector<T>& v) {
    Vec out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = to_f32(v[i]);
    return out;
}

// Passes when every |got - want| <= atol + rtol * |want|; prints the worst
// ratio of the difference to that bound (<= 1 passes).
static void check_rel(const std::string& what, const Vec& got, const VecD& want, double atol, double rtol) {
    if (got.size() != want.size()) {
        std::printf("FAIL %s: %zu values, want %zu\n", what.c_str(), got.size(), want.size());
        ++failures;
        return;
    }
    double worst = 0;
    size_t at = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        const double bound = atol + rtol * std::fabs(want[i]);
        const double diff = std::isnan(got[i]) ? INFINITY : std::fabs(got[i] - want[i]);
        const double r = diff == 0 ? 0 : diff / bound;
        if (!(r <= worst)) worst = r, at = i;
    }
    const bool ok = worst <= 1;
    std::printf("%s %s: worst diff / (%.2g + %.2g |want|) = %.3g (at %zu)\n", ok ? "ok  " : "FAIL", what.c_str(), atol,
                rtol, worst, at);
    if (!ok) ++failures;
}

static void expect(const std::string& what, bool ok) {
    std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
    if (!ok) ++failures;
}

static unsigned grid_for(size_t n, unsigned cap) {
    return (unsigned)std::min<size_t>((n + 255) / 256, cap);
}

// The fp16 / bf16 conversions of cuda_emu.h against the compiler's
// _Float16 (every half, and floats around every rounding boundary) and a
// nearest-even bf16 rounding written another way.
static void test_conversions() {
    bool ok = true;
#ifdef __FLT16_MAX__
    for (unsigned h = 0; h < 65536; ++h) {
        _Float16 ref;
        const std::uint16_t bits = (std::uint16_t)h;
        std::memcpy(&ref, &bits, 2);
        const float want = (float)ref, got = __half2float(__half{bits});
        if (!(emu::f32_bits(want) == emu::f32_bits(got) || (std::isnan(want) && std::isnan(got)))) ok = false;
        // Floats just around this half and the midpoints to its neighbours.
        if (std::isnan(want)) continue;
        for (int d = -2; d <= 2; ++d)
            for (float f : {want, emu::bits_f32(emu::f32_bits(want) + 0x1000u + d),
                            emu::bits_f32(emu::f32_bits(want) + 0x2000u * 0 + d)}) {
                if (std::isnan(f)) continue;
                const _Float16 r = (_Float16)f;
                std::uint16_t rb;
                std::memcpy(&rb, &r, 2);
                if (__float2half_rn(f).bits != rb) ok = false;
            }
    }
    std::uniform_real_distribution<float> e(-30, 20);
    for (int i = 0; i < 200000; ++i) {
        const float f = std::ldexp(std::uniform_real_distribution<float>(-1, 1)(rng), (int)e(rng));
        const _Float16 r = (_Float16)f;
        std::uint16_t rb;
        std::memcpy(&rb, &r, 2);
        if (__float2half_rn(f).bits != rb) ok = false;
    }
    expect("fp16 conversions match _Float16 (all 65536 halves, boundaries, 200k floats)", ok);
#else
    std::printf("skip fp16 conversions: this compiler has no _Float16\n");
#endif
    ok = true;
    for (int i = 0; i < 200000; ++i) {
        const float f = i < 8 ? std::vector<float>{1.f, 1.00390625f, 1.01171875f, -0.f, 3.3895314e38f, 3.39e38f,
                                                   1e-40f, -2.5f}[i]
                              : std::ldexp(std::uniform_real_distribution<float>(-1, 1)(rng),
                                           std::uniform_int_distribution<int>(-140, 127)(rng));
        const std::uint32_t x = emu::f32_bits(f), lo = x & 0xffff0000u, hi = lo + 0x10000u;
        const double dlo = std::fabs((double)emu::bits_f32(lo) - f);
        const double dhi = (hi & 0x7fffffffu) >= 0x7f800000u ? INFINITY : std::fabs((double)emu::bits_f32(hi) - f);
        // Past the largest finite bf16, halfway to the next power of two rounds to inf.
        std::uint32_t want = dlo < dhi ? lo : dhi < dlo ? hi : ((lo >> 16) & 1u) ? hi : lo;
        if ((hi & 0x7fffffffu) == 0x7f800000u && (x & 0xffffu) >= 0x8000u) want = hi;
        if (((std::uint32_t)__float2bfloat16_rn(f).bits << 16) != want) ok = false;
        if (emu::f32_bits(__bfloat162float(__float2bfloat16_rn(f))) != want) ok = false;
    }
    ok = ok && std::isnan(__bfloat162float(__float2bfloat16_rn(NAN))) && std::isnan(__half2float(__float2half_rn(NAN)));
    expect("bf16 conversions round to nearest even (200k floats, ties, overflow, NaN)", ok);
}

// AdamW as src/backend/cpu/train.rs's adamw_slice, in f32, operation for
// operation (the emulator is built without FMA contraction).
static void adamw_slice_f32(Vec& param, const Vec& grad, Vec& m, Vec& v, float lr, float b1, float b2, float eps,
                            float wd, int step) {
    const float c1 = 1.f - std::pow(b1, (float)step), c2 = 1.f - std::pow(b2, (float)step);
    const float decay = 1.f - lr * wd;
    for (size_t i = 0; i < param.size(); ++i) {
        const float g = grad[i];
        m[i] = b1 * m[i] + (1.f - b1) * g;
        v[i] = b2 * v[i] + (1.f - b2) * g * g;
        const float mh = m[i] / c1, vh = v[i] / c2;
        param[i] = param[i] * decay - lr * mh / (std::sqrt(vh) + eps);
    }
}

template <typename G, typename W>
static void adamw_case(void (*kernel)(float*, W*, const G*, float*, float*, unsigned long long, float, float, float,
                                      float, float, float, float, const float*, const int*),
                       const char* name, bool with_copy) {
    const size_t n = 10007;  // odd, and more than the grid: grid-stride
    const float lr = 1e-3f, b1 = 0.9f, b2 = 0.999f, eps = 1e-6f;
    for (float wd : {0.01f, 0.f})
        for (bool factor_on : {false, true}) {
            Vec param = random_vec(n, 1), m = random_vec(n, 0.01f), v = random_vec(n, 1e-4f);
            for (auto& x : v) x = std::fabs(x);
            const std::vector<G> grad = store<G>(random_vec(n, 0.1f));
            const Vec g_stored = load(grad);
            const int step = 3;
            const float c1 = 1.f - std::pow(b1, (float)step), c2 = 1.f - std::pow(b2, (float)step);
            const float factor = 0.37f;
            VecD want_p(n), want_m(n), want_v(n);
            for (size_t i = 0; i < n; ++i) {
                const double g = (double)g_stored[i] * (factor_on ? factor : 1.0);
                want_m[i] = b1 * (double)m[i] + (1.0 - b1) * g;
                want_v[i] = b2 * (double)v[i] + (1.0 - b2) * g * g;
                want_p[i] = param[i] * (1.0 - (double)lr * wd) -
                            lr * (want_m[i] / c1) / (std::sqrt(want_v[i] / c2) + eps);
            }
            Vec p0 = param, m0 = m, v0 = v;
            std::vector<W> copy(n, from_f32<W>(NAN));
            const int no_inf = 0;
            emu::launch(kernel, {grid_for(n, 13)}, {256}, param.data(), with_copy ? copy.data() : nullptr, grad.data(),
                        m.data(), v.data(), (unsigned long long)n, lr, b1, b2, eps, wd, c1, c2,
                        factor_on ? &factor : nullptr, &no_inf);
            const std::string what = std::string(name) + " wd " + std::to_string(wd).substr(0, 4) +
                                     (factor_on ? " grad factor" : "");
            check_rel(what + " param", param, want_p, 1e-7, 1e-6);
            // m = b1 m + (1 - b1) g cancels: an absolute term at m's scale (0.01).
            check_rel(what + " m", m, want_m, 1e-9, 1e-6);
            check_rel(what + " v", v, want_v, 1e-15, 1e-6);
            if (with_copy) {
                bool exact = true;
                for (size_t i = 0; i < n; ++i)
                    if (std::memcmp(&copy[i], &(const W&)from_f32<W>(param[i]), sizeof(W)) != 0) exact = false;
                expect(what + " compute copy == rounded master weight", exact);
            }
            if constexpr (std::is_same_v<G, float> && std::is_same_v<W, float>) {
                if (!factor_on) {
                    Vec rp = p0, rm = m0, rv = v0;
                    adamw_slice_f32(rp, g_stored, rm, rv, lr, b1, b2, eps, wd, step);
                    expect(what + " bit-identical to adamw_slice's f32 order",
                           std::memcmp(rp.data(), param.data(), n * 4) == 0 && std::memcmp(rm.data(), m.data(), n * 4) == 0 &&
                               std::memcmp(rv.data(), v.data(), n * 4) == 0);
                }
            }
            // A step with the inf flag raised changes nothing.
            const Vec p1 = param, m1 = m, v1 = v;
            const std::vector<W> c1_copy = copy;
            const int inf = 1;
            emu::launch(kernel, {grid_for(n, 13)}, {256}, param.data(), with_copy ? copy.data() : nullptr, grad.data(),
                        m.data(), v.data(), (unsigned long long)n, lr, b1, b2, eps, wd, c1, c2,
                        factor_on ? &factor : nullptr, &inf);
            expect(what + " skipped when found_inf is set",
                   std::memcmp(p1.data(), param.data(), n * 4) == 0 && std::memcmp(m1.data(), m.data(), n * 4) == 0 &&
                       std::memcmp(v1.data(), v.data(), n * 4) == 0 &&
                       std::memcmp(c1_copy.data(), copy.data(), n * sizeof(W)) == 0);
        }
}

static void test_adamw() {
    adamw_case<float, float>(adamw_f32_f32, "adamw_f32_f32", false);
    adamw_case<float, __half>(adamw_f32_f16, "adamw_f32_f16", true);
    adamw_case<float, __nv_bfloat16>(adamw_f32_bf16, "adamw_f32_bf16", true);
    adamw_case<__half, __half>(adamw_f16_f16, "adamw_f16_f16", true);
    adamw_case<__nv_bfloat16, __nv_bfloat16>(adamw_bf16_bf16, "adamw_bf16_bf16", true);
}

template <typename G>
static void grad_norm_case(void (*sumsq)(float*, const G*, unsigned long long, float, int*),
                           void (*unscale)(G*, unsigned long long, float, int*)) {
    const std::string name = Storage<G>::name;
    const float loss_scale = 1024.f, inv_scale = 1.f / loss_scale;
    const std::vector<size_t> sizes = {1, 255, 10007, 300};
    std::vector<std::vector<G>> grads;
    for (size_t n : sizes) {
        Vec g = random_vec(n, 0.05f);
        for (auto& x : g) x *= loss_scale;
        grads.push_back(store<G>(g));
    }
    auto run = [&](float max_norm, int& found_inf, Vec& out) {
        std::vector<unsigned> grids;
        size_t count = 0;
        for (size_t n : sizes) grids.push_back(grid_for(n, 8)), count += grids.back();
        Vec partials(count, NAN);
        found_inf = 0;
        size_t at = 0;
        for (size_t k = 0; k < sizes.size(); ++k) {
            emu::launch(sumsq, {grids[k]}, {256}, partials.data() + at, grads[k].data(), (unsigned long long)sizes[k],
                        inv_scale, &found_inf);
            at += grids[k];
        }
        out.assign(2, NAN);
        emu::launch(grad_norm_finish, {1}, {256}, out.data(), (const float*)partials.data(), (int)count, max_norm,
                    inv_scale, (const int*)&found_inf);
    };
    double total = 0;
    for (auto& g : grads)
        for (float x : load(g)) total += ((double)x * inv_scale) * ((double)x * inv_scale);
    const double norm = std::sqrt(total);
    for (float max_norm : {1e9f, (float)(norm / 3), 0.f}) {
        int found_inf;
        Vec out;
        run(max_norm, found_inf, out);
        const double factor = inv_scale * (max_norm > 0 && norm > max_norm ? max_norm / norm : 1.0);
        char label[32];
        std::snprintf(label, sizeof label, "%g", max_norm);
        check_rel("grad_norm " + name + " max_norm " + label + " [norm, factor]", out,
                  {norm, factor}, 0, 1e-5);
        expect("grad_norm " + name + " finite: found_inf stays 0", found_inf == 0);
    }
    // A NaN, then an inf, in one tensor: flagged, and the factor is 0.
    for (float bad : {(float)NAN, (float)INFINITY}) {
        auto& g = grads[2];
        const G saved = g[4321];
        g[4321] = from_f32<G>(bad);
        int found_inf;
        Vec out;
        run(1.f, found_inf, out);
        expect("grad_norm " + name + " with " + (std::isnan(bad) ? "NaN" : "inf") + ": found_inf set, factor 0",
               found_inf == 1 && out[1] == 0.f && !std::isfinite(out[0]));
        g[4321] = saved;
    }
    // unscale: g *= 1 / scale in place, flag on a non-finite value.
    for (bool inject : {false, true}) {
        std::vector<G> g = grads[2];
        if (inject) g.back() = from_f32<G>(INFINITY);
        const Vec before = load(g);
        VecD want(g.size());
        for (size_t i = 0; i < g.size(); ++i) want[i] = (double)before[i] * inv_scale;
        int found_inf = 0;
        emu::launch(unscale, {grid_for(g.size(), 5)}, {256}, g.data(), (unsigned long long)g.size(), inv_scale, &found_inf);
        Vec got = load(g);
        if (inject) got.back() = want.back() = 0;  // inf * inv_scale is inf: compare the rest
        // fp16: small unscaled values land in the subnormals (half an ulp 2^-25 absolute).
        check_rel("unscale_" + name + (inject ? " with inf" : ""), got, want, std::is_same_v<G, __half> ? 3.0e-8 : 0,
                  std::max(Storage<G>::rtol, 1e-7));
        expect("unscale_" + name + (inject ? " with inf: found_inf set" : ": found_inf stays 0"), found_inf == inject);
    }
}

static void test_grad_norm_and_unscale() {
    grad_norm_case<float>(grad_sumsq_f32, unscale_f32);
    grad_norm_case<__half>(grad_sumsq_f16, unscale_f16);
    grad_norm_case<__nv_bfloat16>(grad_sumsq_bf16, unscale_bf16);
}

// src/rng.rs's uniform_at, for the reference mask.
static float uniform_at(std::uint64_t seed, std::uint64_t index) {
    auto mix = [](std::uint64_t z) {
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    };
    const std::uint64_t g = 0x9E3779B97F4A7C15ull;
    return (float)(mix(mix(seed * g) ^ (index * g)) >> 40) * (1.f / 16777216.f);
}

template <typename T> static void dropout_case(void (*kernel)(T*, unsigned long long, float, unsigned long long,
                                                              unsigned long long)) {
    const std::string name = std::string("dropout_") + Storage<T>::name;
    const size_t n = 10007;
    const float p = 0.1f;
    const std::uint64_t seed = 42, first = 123;
    Vec input(n);
    for (size_t i = 0; i < n; ++i) input[i] = (float)i * 0.5f + 1.f;  // as ops.rs's test
    const std::vector<T> x0 = store<T>(input);
    std::vector<T> x = x0;
    emu::launch(kernel, {grid_for(n, 11)}, {256}, x.data(), (unsigned long long)n, p, (unsigned long long)seed,
                (unsigned long long)first);
    // ops::dropout_slice, exactly: the same zeros, kept x * (1 / (1 - p))
    // in fp32, rounded into T.
    const float keep_scale = 1.f / (1.f - p);
    bool exact = true;
    size_t dropped = 0;
    for (size_t i = 0; i < n; ++i) {
        const float u = uniform_at(seed, first + i);
        const T want = u < p ? from_f32<T>(0.f) : from_f32<T>(to_f32(x0[i]) * keep_scale);
        if (std::memcmp(&want, &x[i], sizeof(T)) != 0) exact = false;
        dropped += u < p;
    }
    expect(name + " equals ops::dropout_slice's mask and scaling bit for bit", exact);
    expect(name + " drops about p", std::fabs((double)dropped / n - p) < 0.01);
    // Masked in two pieces (first = 123 and 123 + 5000): the same result.
    std::vector<T> y = x0;
    emu::launch(kernel, {3}, {256}, y.data(), (unsigned long long)5000, p, (unsigned long long)seed,
                (unsigned long long)first);
    emu::launch(kernel, {2}, {256}, y.data() + 5000, (unsigned long long)(n - 5000), p, (unsigned long long)seed,
                (unsigned long long)(first + 5000));
    expect(name + " in two pieces == in one", std::memcmp(x.data(), y.data(), n * sizeof(T)) == 0);
    // p = 0 is a no-op.
    std::vector<T> z = x0;
    emu::launch(kernel, {1}, {256}, z.data(), (unsigned long long)n, 0.f, (unsigned long long)seed, (unsigned long long)0);
    expect(name + " p = 0 leaves x alone", std::memcmp(x0.data(), z.data(), n * sizeof(T)) == 0);
}

static void test_dropout() {
    // The golden values of src/rng.rs's test uniform_at_golden_values.
    expect("uniform_at golden values (shared with src/rng.rs)",
           uniform_at(42, 0) == 9347955.f / 16777216.f && uniform_at(42, 1) == 13985947.f / 16777216.f &&
               uniform_at(42, 123) == 3132898.f / 16777216.f && uniform_at(42, 10000) == 7069606.f / 16777216.f &&
               uniform_at(7, 1ull << 40) == 14449501.f / 16777216.f &&
               uniform_at(0xdeadbeef, 3) == 9242326.f / 16777216.f);
    dropout_case<float>(dropout_f32);
    dropout_case<__half>(dropout_f16);
    dropout_case<__nv_bfloat16>(dropout_bf16);
}

static double gelu_grad(double x) {
    return 0.5 * std::erfc(-x / std::sqrt(2.0)) + x * std::exp(-0.5 * x * x) / std::sqrt(2 * M_PI);
}

template <typename T>
static void bias_gelu_case(void (*fwd)(T*, T*, const T*, int, int), void (*bwd)(T*, float*, const T*, int, int)) {
    const std::string name = Storage<T>::name;
    const double rtol = Storage<T>::rtol;
    const int rows = 37;
    for (int cols : {5, 300, 1000})
        for (unsigned grid_rows : {(unsigned)rows, 7u}) {
            const std::string what = " " + name + " cols " + std::to_string(cols) + " grid.y " + std::to_string(grid_rows);
            const unsigned threads = row_threads(cols), col_blocks = (cols + threads - 1) / threads;
            std::vector<T> pre = store<T>(random_vec(rows * cols, 3)), bias = store<T>(random_vec(cols, 1));
            const Vec pre0 = load(pre), b = load(bias);
            std::vector<T> out(rows * cols, from_f32<T>(NAN));
            emu::launch(fwd, {col_blocks, grid_rows}, {threads}, out.data(), pre.data(), (const T*)bias.data(), rows, cols);
            VecD want_pre(rows * cols), want_out(rows * cols);
            const Vec pre_stored = load(pre);
            for (int r = 0; r < rows; ++r)
                for (int c = 0; c < cols; ++c) {
                    want_pre[r * cols + c] = (double)pre0[r * cols + c] + b[c];
                    want_out[r * cols + c] = gelu(pre_stored[r * cols + c]);
                }
            check_rel("bias_gelu_forward" + what + " pre", pre_stored, want_pre, 1e-7, std::max(rtol, 1e-7));
            check_rel("bias_gelu_forward" + what + " out", load(out), want_out, 1e-6, rtol);

            std::vector<T> d = store<T>(random_vec(rows * cols, 1));
            const Vec d0 = load(d);
            Vec partials(grid_rows * cols, NAN), d_bias = random_vec(cols, 1);
            VecD want_d(rows * cols), want_bias(cols);
            for (int c = 0; c < cols; ++c) want_bias[c] = d_bias[c];
            for (int r = 0; r < rows; ++r)
                for (int c = 0; c < cols; ++c) {
                    want_d[r * cols + c] = d0[r * cols + c] * gelu_grad(pre_stored[r * cols + c]);
                    want_bias[c] += want_d[r * cols + c];
                }
            emu::launch(bwd, {col_blocks, grid_rows}, {threads}, d.data(), partials.data(), (const T*)pre.data(), rows,
                        cols);
            emu::launch(column_sum_f32, {(unsigned)(cols + 255) / 256}, {256}, d_bias.data(), (const float*)partials.data(),
                        (int)grid_rows, cols);
            check_rel("bias_gelu_backward" + what + " d_pre", load(d), want_d, 1e-6, rtol);
            check_rel("bias_gelu_backward" + what + " d_bias (+= column_sum)", d_bias, want_bias, 1e-5, 0);
        }
}

static void test_bias_gelu() {
    bias_gelu_case<float>(bias_gelu_forward_f32, bias_gelu_backward_f32);
    bias_gelu_case<__half>(bias_gelu_forward_f16, bias_gelu_backward_f16);
    bias_gelu_case<__nv_bfloat16>(bias_gelu_forward_bf16, bias_gelu_backward_bf16);
}

template <typename T>
static void layer_norm_train_case(void (*fwd)(T*, T*, const T*, const T*, const T*, float*, float*, float, int),
                                  void (*bwd)(T*, float*, float*, const T*, const T*, const T*, const float*,
                                              const float*, int, int)) {
    const std::string name = Storage<T>::name;
    const double rtol = Storage<T>::rtol;
    const int rows = 37;
    const float eps = 1e-12f;
    for (int cols : {1, 17, 384, 1000, 2048})
        for (bool use_res : {false, true}) {
            const std::string what = " " + name + " cols " + std::to_string(cols) + (use_res ? " +residual" : "");
            std::vector<T> x = store<T>(random_vec(rows * cols, 3)), res = store<T>(random_vec(rows * cols, 1));
            std::vector<T> gamma = store<T>(random_vec(cols, 1)), beta = store<T>(random_vec(cols, 1));
            const Vec x0 = load(x), r0 = load(res), g = load(gamma), b = load(beta);
            std::vector<T> out(rows * cols, from_f32<T>(NAN));
            Vec mean(rows, NAN), rstd(rows, NAN);
            emu::launch(fwd, {(unsigned)rows}, {row_threads(cols)}, out.data(), x.data(),
                        use_res ? (const T*)res.data() : nullptr, (const T*)gamma.data(), (const T*)beta.data(),
                        mean.data(), rstd.data(), eps, cols);
            const Vec xs = load(x);  // the stored sum: backward's input
            VecD want_x(rows * cols), want_out(rows * cols), want_mean(rows), want_rstd(rows);
            for (int r = 0; r < rows; ++r) {
                double mu = 0, var = 0;
                for (int c = 0; c < cols; ++c) {
                    want_x[r * cols + c] = (double)x0[r * cols + c] + (use_res ? r0[r * cols + c] : 0.0);
                    mu += xs[r * cols + c];
                }
                mu /= cols;
                for (int c = 0; c < cols; ++c) var += (xs[r * cols + c] - mu) * (xs[r * cols + c] - mu);
                var /= cols;
                want_mean[r] = mu;
                want_rstd[r] = 1 / std::sqrt(var + eps);
                for (int c = 0; c < cols; ++c)
                    want_out[r * cols + c] = (xs[r * cols + c] - mu) * want_rstd[r] * g[c] + b[c];
            }
            check_rel("layer_norm_forward" + what + " x + residual", xs, want_x, 0, std::max(rtol, 1e-7));
            check_rel("layer_norm_forward" + what + " out", load(out), want_out, 2e-5, rtol);
            check_rel("layer_norm_forward" + what + " mean", mean, want_mean, 1e-6, 0);
            check_rel("layer_norm_forward" + what + " rstd", rstd, want_rstd, 0, 1e-5);
            if (use_res) continue;

            // Backward from the saved mean / rstd (as the CPU backend does).
            std::vector<T> dy = store<T>(random_vec(rows * cols, 1));
            const Vec dy0 = load(dy);
            VecD want_dx(rows * cols), want_dg(cols), want_db(cols);
            Vec d_gamma = random_vec(cols, 1), d_beta = random_vec(cols, 1);
            for (int c = 0; c < cols; ++c) want_dg[c] = d_gamma[c], want_db[c] = d_beta[c];
            for (int r = 0; r < rows; ++r) {
                double sd = 0, sdx = 0;
                for (int c = 0; c < cols; ++c) {
                    const double xh = (xs[r * cols + c] - (double)mean[r]) * rstd[r], dxh = dy0[r * cols + c] * (double)g[c];
                    sd += dxh, sdx += dxh * xh;
                    want_dg[c] += dy0[r * cols + c] * xh;
                    want_db[c] += dy0[r * cols + c];
                }
                for (int c = 0; c < cols; ++c) {
                    const double xh = (xs[r * cols + c] - (double)mean[r]) * rstd[r], dxh = dy0[r * cols + c] * (double)g[c];
                    want_dx[r * cols + c] = rstd[r] * (dxh - sd / cols - xh * sdx / cols);
                }
            }
            const unsigned blocks = 5;  // rows stride by gridDim.x; 5 partial rows
            Vec pg(blocks * cols, NAN), pb(blocks * cols, NAN);
            std::vector<T> dx(rows * cols, from_f32<T>(NAN));
            emu::launch(bwd, {blocks}, {row_threads(cols)}, dx.data(), pg.data(), pb.data(), (const T*)dy.data(),
                        (const T*)x.data(), (const T*)gamma.data(), (const float*)mean.data(), (const float*)rstd.data(),
                        rows, cols);
            const unsigned sum_blocks = (unsigned)(cols + 255) / 256;
            emu::launch(column_sum_f32, {sum_blocks}, {256}, d_gamma.data(), (const float*)pg.data(), (int)blocks, cols);
            emu::launch(column_sum_f32, {sum_blocks}, {256}, d_beta.data(), (const float*)pb.data(), (int)blocks, cols);
            // cols = 1: var 0, rstd 1e6 and d_x is 0 up to rstd * rounding.
            check_rel("layer_norm_backward" + what + " d_x", load(dx), want_dx, cols == 1 ? 1e-6 : 2e-5, rtol);
            check_rel("layer_norm_backward" + what + " d_gamma (+= column_sum)", d_gamma, want_dg, 1e-4, 1e-5);
            check_rel("layer_norm_backward" + what + " d_beta (+= column_sum)", d_beta, want_db, 1e-4, 1e-5);
            // Frozen (no partials): the same d_x.
            std::vector<T> dx2(rows * cols, from_f32<T>(NAN));
            emu::launch(bwd, {(unsigned)rows + 3}, {row_threads(cols)}, dx2.data(), (float*)nullptr, (float*)nullptr,
                        (const T*)dy.data(), (const T*)x.data(), (const T*)gamma.data(), (const float*)mean.data(),
                        (const float*)rstd.data(), rows, cols);
            expect("layer_norm_backward" + what + " frozen (no partials, more blocks than rows): same d_x",
                   std::memcmp(dx.data(), dx2.data(), dx.size() * sizeof(T)) == 0);
        }
}

static void test_layer_norm_train() {
    layer_norm_train_case<float>(layer_norm_forward_f32, layer_norm_backward_f32);
    layer_norm_train_case<__half>(layer_norm_forward_f16, layer_norm_backward_f16);
    layer_norm_train_case<__nv_bfloat16>(layer_norm_forward_bf16, layer_norm_backward_bf16);
}

template <typename T>
static void cross_entropy_case(void (*kernel)(float*, T*, const T*, const int*, const float*, float, float, int)) {
    const std::string name = std::string("cross_entropy_") + Storage<T>::name;
    const double rtol = Storage<T>::rtol;
    const int rows = 13;
    for (int classes : {1, 2, 31, 1000, 30522})
        for (bool weighted : {false, true})
            for (bool all_ignored : {false, true}) {
                if (all_ignored && (weighted || classes != 31)) continue;
                const float grad_scale = std::is_same_v<T, __half> ? 1024.f : 1.f;
                Vec logits_f = random_vec((size_t)rows * classes, 20);
                // Row 1: one logit far above the rest, the label elsewhere: the loss caps.
                for (int c = 0; c < classes; ++c) logits_f[classes + c] = c == 0 ? 1000.f : -1000.f;
                const std::vector<T> logits = store<T>(logits_f);
                const Vec x = load(logits);
                std::vector<int> labels(rows);
                for (int r = 0; r < rows; ++r) labels[r] = all_ignored || r % 4 == 2 ? -100 : (r * 7 + 3) % classes;
                if (!all_ignored && classes > 1) labels[1] = classes - 1;
                Vec weights = random_vec(rows, 1);
                for (auto& w : weights) w = std::fabs(w) + 0.1f;
                double total = 0;
                for (int r = 0; r < rows; ++r)
                    if (labels[r] >= 0) total += weighted ? weights[r] : 1.0;
                const float inv_total = total > 0 ? (float)(1 / total) : 0.f;
                VecD want_loss(rows, 0), want_d((size_t)rows * classes, 0);
                double want_mean = 0;
                for (int r = 0; r < rows; ++r) {
                    if (labels[r] < 0) continue;
                    const double w = weighted ? weights[r] : 1.0;
                    double m = -INFINITY, s = 0;
                    for (int c = 0; c < classes; ++c) m = std::max(m, (double)x[(size_t)r * classes + c]);
                    for (int c = 0; c < classes; ++c) s += std::exp(x[(size_t)r * classes + c] - m);
                    const double loss = std::min(m + std::log(s) - x[(size_t)r * classes + labels[r]], 87.33654475);
                    want_loss[r] = w * loss * inv_total;
                    want_mean += want_loss[r];
                    for (int c = 0; c < classes; ++c)
                        want_d[(size_t)r * classes + c] = (std::exp(x[(size_t)r * classes + c] - m) / s -
                                                           (c == labels[r])) * w * inv_total * grad_scale;
                }
                Vec losses(rows, NAN);
                std::vector<T> d((size_t)rows * classes, from_f32<T>(NAN));
                emu::launch(kernel, {(unsigned)rows}, {row_threads(classes)}, losses.data(), d.data(), logits.data(),
                            (const int*)labels.data(), weighted ? (const float*)weights.data() : nullptr, inv_total,
                            grad_scale, classes);
                const std::string what = name + " classes " + std::to_string(classes) + (weighted ? " weighted" : "") +
                                         (all_ignored ? " all rows ignored" : "");
                check_rel(what + " row losses", losses, want_loss, 1e-6, 1e-5);
                double mean = 0;
                for (float l : losses) mean += l;
                check_rel(what + " mean loss", {(float)mean}, {want_mean}, 1e-6, 1e-5);
                check_rel(what + " d_logits", load(d), want_d, 1e-6 * grad_scale * inv_total + 1e-30,
                          std::max(rtol, 1e-5));
            }
}

static void test_cross_entropy() {
    cross_entropy_case<float>(cross_entropy_f32);
    cross_entropy_case<__half>(cross_entropy_f16);
    cross_entropy_case<__nv_bfloat16>(cross_entropy_bf16);
}

// ---- Training attention, scatters and pointwise ops (issue 6, fp32) ----

// Passes when every |got - want| <= rel * max |want| (the output's scale):
// fp32 sums of products are accurate to a few ulps of their terms, not of a
// result that cancels.
static void check_scaled(const std::string& what, const Vec& got, const VecD& want, double rel) {
    double scale = 0;
    for (double w : want) scale = std::max(scale, std::fabs(w));
    check_rel(what, got, want, rel * std::max(scale, 1e-30), 0);
}

// True when v is still the poison bit pattern (a NaN no kernel computes).
static const std::uint32_t POISON = 0x7fbadbadu;
static bool untouched(const float* v, size_t n) {
    for (size_t i = 0; i < n; ++i)
        if (emu::f32_bits(v[i]) != POISON) return false;
    return true;
}
static Vec poisoned(size_t n) { return Vec(n, emu::bits_f32(POISON)); }

static VecD to_double(const Vec& v) { return VecD(v.begin(), v.end()); }

// Training attention's layout (attention_train.cu, src/backend/cpu/attention.rs):
// probs_base[s] = sum over earlier sequences of heads * len^2.
static std::vector<unsigned long long> attention_probs_base(const std::vector<int>& offsets, int heads,
                                                            size_t& total) {
    std::vector<unsigned long long> base;
    total = 0;
    for (size_t s = 0; s + 1 < offsets.size(); ++s) {
        base.push_back(total);
        const size_t len = offsets[s + 1] - offsets[s];
        total += heads * len * len;
    }
    return base;
}

// Dropout's factor for element `index` of probs: 0 when dropped, else the
// fp32 keep scale 1 / (1 - p) (ops::dropped in src/backend/cpu/ops.rs).
static double attention_mask(float p, std::uint64_t seed, size_t index) {
    if (p == 0.f) return 1.0;
    return uniform_at(seed, index) < p ? 0.0 : (double)(1.f / (1.f - p));
}

// The row kernels of training attention (the products around them are
// cuBLAS GEMMs) against double references on random rows in probs' layout:
// forward, softmax of the scores and dropout(P); backward, from a random
// gradient G of dropout(P) and the probabilities P,
// dS_j = P_j (D_j G_j - sum_k P_k D_k G_k) * scale. Memory past the batch is
// poisoned and must stay so (a warp whose row is past its sequence writes
// nothing).
static void attention_rows_case(const std::vector<int>& offsets, int heads, float p, std::uint64_t seed,
                                bool reversed) {
    size_t total = 0;
    const auto base = attention_probs_base(offsets, heads, total);
    const int batch = (int)offsets.size() - 1;
    int max_len = 0;
    for (int s = 0; s < batch; ++s) max_len = std::max(max_len, offsets[s + 1] - offsets[s]);
    emu::reverse_blocks = reversed;
    char label[96];
    std::snprintf(label, sizeof label, "attention rows heads %d max_len %d p %g%s", heads, max_len, p,
                  reversed ? " (blocks reversed)" : "");
    const std::string what = label;
    const dim3 grid{(unsigned)((max_len + BERTRT_ATTN_SOFTMAX_ROWS - 1) / BERTRT_ATTN_SOFTMAX_ROWS),
                    (unsigned)heads, (unsigned)batch};
    const dim3 threads{32 * BERTRT_ATTN_SOFTMAX_ROWS};
    const size_t tail = 64;

    Vec probs = random_vec(total, 4.f), dropped = poisoned(total + tail);
    VecD want_probs(total), want_dropped(total);
    for (int s = 0; s < batch; ++s) {
        const int len = offsets[s + 1] - offsets[s];
        for (int r = 0; r < heads * len; ++r) {
            const size_t row = base[s] + (size_t)r * len;
            double m = -INFINITY, sum = 0;
            for (int j = 0; j < len; ++j) m = std::max(m, (double)probs[row + j]);
            for (int j = 0; j < len; ++j) sum += std::exp(probs[row + j] - m);
            for (int j = 0; j < len; ++j) {
                want_probs[row + j] = std::exp(probs[row + j] - m) / sum;
                want_dropped[row + j] = want_probs[row + j] * attention_mask(p, seed, row + j);
            }
        }
    }
    const Vec poison_tail = poisoned(tail);
    probs.insert(probs.end(), poison_tail.begin(), poison_tail.end());
    emu::launch(attention_softmax_train_f32, grid, threads, probs.data(), p > 0 ? dropped.data() : nullptr,
                offsets.data(), (const unsigned long long*)base.data(), p, (unsigned long long)seed);
    check_scaled(what + " softmax", Vec(probs.begin(), probs.begin() + total), want_probs, 1e-6);
    expect(what + " softmax writes nothing past the batch", untouched(probs.data() + total, tail));
    if (p > 0) {
        check_scaled(what + " dropout(P)", Vec(dropped.begin(), dropped.begin() + total), want_dropped, 1e-6);
        expect(what + " dropout(P) writes nothing past the batch", untouched(dropped.data() + total, tail));
    } else {
        expect(what + " no dropout(P) without dropout", untouched(dropped.data(), total + tail));
    }

    const float scale = 0.125f;
    const Vec p_rows(probs.begin(), probs.begin() + total);
    Vec d = random_vec(total, 1.f);
    VecD want_d(total);
    for (int s = 0; s < batch; ++s) {
        const int len = offsets[s + 1] - offsets[s];
        for (int r = 0; r < heads * len; ++r) {
            const size_t row = base[s] + (size_t)r * len;
            double dot = 0;
            for (int j = 0; j < len; ++j) dot += p_rows[row + j] * d[row + j] * attention_mask(p, seed, row + j);
            for (int j = 0; j < len; ++j)
                want_d[row + j] = p_rows[row + j] * (d[row + j] * attention_mask(p, seed, row + j) - dot) * scale;
        }
    }
    d.insert(d.end(), poison_tail.begin(), poison_tail.end());
    emu::launch(attention_softmax_backward_f32, grid, threads, d.data(), p_rows.data(), offsets.data(),
                (const unsigned long long*)base.data(), scale, p, (unsigned long long)seed);
    check_scaled(what + " softmax backward", Vec(d.begin(), d.begin() + total), want_d, 1e-5);
    expect(what + " softmax backward writes nothing past the batch", untouched(d.data() + total, tail));
    emu::reverse_blocks = false;
}

static void test_attention_train() {
    // Lengths with a 1 and a 0, the longest not last (its spare warps then
    // aim at the next sequence's rows, which only the reversed block order
    // exposes), and one longer than a warp's 32 lanes.
    const std::vector<int> b0 = {0, 5, 6, 6, 15, 20}, b1 = {0, 0, 9, 10, 14}, b2 = {0, 130, 132};
    attention_rows_case(b0, 2, 0.f, 1234, false);
    attention_rows_case(b0, 2, 0.1f, 1235, true);
    attention_rows_case(b1, 3, 0.1f, 1236, false);
    attention_rows_case(b1, 3, 0.f, 1237, true);
    attention_rows_case(b2, 1, 0.1f, 1238, true);
}

// The emulator's atomicAdd is a real read-modify-write: every thread of a
// block adds to one address at once (a plain += would lose updates).
__global__ void atomic_add_all(float* sum, int times) {
    for (int k = 0; k < times; ++k) atomicAdd(sum, 1.f);
}

static void test_scatter_train() {
    float sum = 0;
    emu::launch(atomic_add_all, {2}, {256}, &sum, 100);
    expect("emulator atomicAdd: 2 x 256 threads x 100 adds to one float = 51200", sum == 51200.f);

    // Lengths 1 7 0 13 9: a length-1 and an empty sequence.
    const std::vector<int> offsets = {0, 1, 8, 8, 21, 30};
    const int batch = (int)offsets.size() - 1, tokens = offsets.back();
    for (int hidden : {19, 300}) {  // 300: more columns than the 256 threads
        const std::string h = " hidden " + std::to_string(hidden);
        // A 5-word vocabulary, so rows repeat across tokens (and within a
        // sequence); the tables start from nonzero gradients, which the
        // kernel adds to.
        const int vocab = 5, types = 2;
        std::vector<unsigned> ids(tokens), type_ids(tokens), positions(tokens);
        for (int s = 0; s < batch; ++s)
            for (int t = offsets[s]; t < offsets[s + 1]; ++t)
                ids[t] = (t * 3) % vocab, type_ids[t] = t % 3 == 0, positions[t] = t - offsets[s];
        const Vec d_out = random_vec((size_t)tokens * hidden, 1);
        Vec d_word = random_vec(vocab * hidden, 1), d_pos = random_vec(13 * hidden, 1),
            d_type = random_vec(types * hidden, 1);
        VecD want_word = to_double(d_word), want_pos = to_double(d_pos), want_type = to_double(d_type);
        for (int t = 0; t < tokens; ++t)
            for (int c = 0; c < hidden; ++c) {
                want_word[ids[t] * hidden + c] += d_out[(size_t)t * hidden + c];
                want_pos[positions[t] * hidden + c] += d_out[(size_t)t * hidden + c];
                want_type[type_ids[t] * hidden + c] += d_out[(size_t)t * hidden + c];
            }
        emu::launch(embedding_backward_f32, {(unsigned)tokens}, {row_threads(hidden)}, d_word.data(), d_pos.data(),
                    d_type.data(), d_out.data(), (const unsigned*)ids.data(), (const unsigned*)type_ids.data(),
                    (const unsigned*)positions.data(), hidden);
        // Up to ~15 fp32 adds into a row: 1e-6 of the sums' scale.
        check_scaled("embedding_backward" + h + " d_word (+=, repeated rows)", d_word, want_word, 1e-6);
        check_scaled("embedding_backward" + h + " d_position (+=)", d_pos, want_pos, 1e-6);
        check_scaled("embedding_backward" + h + " d_token_type (+=)", d_type, want_type, 1e-6);

        // scatter_rows: the [CLS] rows (the empty sequence points at the
        // next start, as the pooler's rows do not: keep them distinct).
        const std::vector<unsigned long long> rows = {0, 1, 8, 21, 29};
        const Vec d_rows = random_vec(rows.size() * hidden, 1);
        Vec d_input((size_t)tokens * hidden, 0.f);
        VecD want_input((size_t)tokens * hidden, 0);
        for (size_t r = 0; r < rows.size(); ++r)
            for (int c = 0; c < hidden; ++c) want_input[rows[r] * hidden + c] = d_rows[r * hidden + c];
        emu::launch(scatter_rows_f32, {(unsigned)rows.size()}, {row_threads(hidden)}, d_input.data(), d_rows.data(),
                    rows.data(), hidden);
        check("scatter_rows" + h, d_input, want_input, 0);

        // mean_pool_backward: every token of s gets d_out[s] / len(s); the
        // empty sequence writes nothing (and NaN-poisoned input shows any
        // token left out).
        const Vec d_pool = random_vec((size_t)batch * hidden, 1);
        Vec d_tokens = poisoned((size_t)tokens * hidden);
        VecD want_tokens((size_t)tokens * hidden);
        for (int s = 0; s < batch; ++s)
            for (int t = offsets[s]; t < offsets[s + 1]; ++t)
                for (int c = 0; c < hidden; ++c)
                    want_tokens[(size_t)t * hidden + c] =
                        (double)d_pool[(size_t)s * hidden + c] / (offsets[s + 1] - offsets[s]);
        emu::launch(mean_pool_backward_f32, {(unsigned)(hidden + 127) / 128, (unsigned)batch}, {128}, d_tokens.data(),
                    d_pool.data(), offsets.data(), hidden);
        check_rel("mean_pool_backward" + h, d_tokens, want_tokens, 0, 1e-7);  // one fp32 division
    }
}

static void test_pointwise_train() {
    const unsigned long long n = 1001;  // odd, more than the 2 x 256 threads: grid-stride
    const Vec pre = random_vec(n, 5);
    Vec out = poisoned(n + 1);
    VecD want(n);
    for (size_t i = 0; i < n; ++i) want[i] = gelu(pre[i]);
    emu::launch(gelu_forward_f32, {2}, {256}, out.data(), pre.data(), n);
    check_rel("gelu_forward 1001", Vec(out.begin(), out.begin() + n), want, 1e-7, 2e-6);
    expect("gelu_forward writes only n", untouched(out.data() + n, 1));

    Vec y = random_vec(n, 1), d = random_vec(n, 1);
    for (auto& v : y) v = std::tanh(3 * v);  // near +-1 too
    for (size_t i = 0; i < n; ++i) want[i] = d[i] * (1 - (double)y[i] * y[i]);
    emu::launch(tanh_backward_f32, {2}, {256}, d.data(), (const float*)y.data(), n);
    check_rel("tanh_backward 1001", d, want, 1e-7, 1e-6);

    // add and scale are single IEEE operations: bit-exact.
    const Vec a = random_vec(n, 3), b = random_vec(n, 3);
    Vec sum = poisoned(n), x = a;
    emu::launch(add_f32, {2}, {256}, sum.data(), a.data(), b.data(), n);
    emu::launch(add_f32, {2}, {256}, x.data(), (const float*)x.data(), b.data(), n);  // x += b
    bool exact = true, exact_alias = true;
    for (size_t i = 0; i < n; ++i) {
        exact = exact && sum[i] == a[i] + b[i];
        exact_alias = exact_alias && x[i] == a[i] + b[i];
    }
    expect("add_f32 out = a + b, bit-exact", exact);
    expect("add_f32 out == a (x += b), bit-exact", exact_alias);

    Vec s = a;
    emu::launch(scale_f32, {2}, {256}, s.data(), n, 0.37f);
    exact = true;
    for (size_t i = 0; i < n; ++i) exact = exact && s[i] == a[i] * 0.37f;
    expect("scale_f32 x *= factor, bit-exact", exact);
}

int main() {
    test_conversions();
    test_embedding();
    test_layer_norm();
    test_bias_act();
    test_softmax();
    test_pooling_and_tanh();
    test_attention();
    test_adamw();
    test_grad_norm_and_unscale();
    test_dropout();
    test_bias_gelu();
    test_layer_norm_train();
    test_cross_entropy();
    test_attention_train();
    test_scatter_train();
    test_pointwise_train();
    std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "all kernels ok", failures);
    return failures ? 1 : 0;
}
