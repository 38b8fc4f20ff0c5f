// Runs every kernel of kernels/*.cu on the CPU through cuda_emu.h, with the
// launch geometry of src/backend/cuda/mod.rs, against plain double-precision
// loops (the math of src/backend/cpu/reference.rs). It checks indexing,
// tiling and control flow without a GPU; it says nothing about speed, and
// the GPU tests (tests/cuda.rs) remain the real check.
//
//   kernels/emu/run.sh     (g++ with AddressSanitizer: out-of-bounds reads
//                           and writes of the kernels fail the run)
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "cuda_emu.h"

#include "../attention.cu"
#include "../embedding.cu"
#include "../epilogue.cu"
#include "../layernorm.cu"
#include "../pointwise.cu"
#include "../pooling.cu"
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

int main() {
    test_embedding();
    test_layer_norm();
    test_bias_act();
    test_softmax();
    test_pooling_and_tanh();
    test_attention();
    std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "all kernels ok", failures);
    return failures ? 1 : 0;
}
