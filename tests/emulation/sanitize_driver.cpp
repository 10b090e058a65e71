// Stand-alone workload for the sanitizer builds of the emulated kernels (tests only; see
// build.py, compile_emulation(executable=True)): every kernel on odd shapes, every dtype, the
// split paths and the empty cases, with exactly-sized heap buffers so that AddressSanitizer
// sees any read or write past them, and the block's threads running concurrently so that
// ThreadSanitizer sees any missing barrier. Correctness against the float64 references is
// tested by tests/test_kernel_emulation.py on the same kinds of shapes; here the checks are
// what a memory or ordering error would break: finite outputs, exact symmetry of the factors,
// S <- beta S for an empty sum. Exit status 0 when every check passed.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

extern "C" {
long long emu_precondition_workspace(int d_out, int d_in);
int emu_precondition(const void* grad, int grad_is_bf16, const float* qg, const float* qa, const float* scale,
                     const float* eig_g, const float* eig_a, float damping, float* out, float* dot, float* ws,
                     int d_out, int d_in);
long long emu_scale_workspace(int d_out, int d_in, int splits);
int emu_scale(const float* gt, const float* at, float* S, float* ws, int n, int shared, int at_broadcast, int positions,
              int d_out, int d_in, int splits, int tensor_cores, float beta, float alpha);
long long emu_conv_workspace(int d, int splits);
int emu_conv(const void* x, int x_type, const float* w, float* A, float* ws, const int* geometry, int bias,
             int splits, int tensor_cores, long long chunk_elements, float beta, float alpha);
long long emu_factor_workspace(int D, int splits);
int emu_factor(float* A, const void* a, int a_type, const float* w, float* ws, int n, int d, int bias,
               int tensor_cores, int splits, float beta, float alpha);
}

namespace {

int failures = 0;
bool quick = false;  // --quick (ThreadSanitizer, ~10x slower): one shape per kernel path, each with a split

void check(bool ok, const char* what, int line) {
    if (!ok) {
        std::fprintf(stderr, "sanitize_driver: FAILED %s (line %d)\n", what, line);
        ++failures;
    }
}
#define CHECK(cond) check((cond), #cond, __LINE__)

uint32_t state = 12345u;
float uniform() {  // deterministic, in [-1, 1)
    state = state * 1664525u + 1013904223u;
    return static_cast<float>(state >> 8) / static_cast<float>(1u << 23) - 1.f;
}

std::vector<float> random_floats(size_t count) {
    std::vector<float> v(count);
    for (float& x : v) x = uniform();
    return v;
}

// 16-bit storage of the inputs (type 1 = bf16 by truncation, 2 = fp16 of small integers/64:
// exact, no rounding code needed); the kernels only read them.
std::vector<uint16_t> to_16bit(const std::vector<float>& v, int type) {
    std::vector<uint16_t> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
        if (type == 1) {
            uint32_t u;
            std::memcpy(&u, &v[i], 4);
            out[i] = static_cast<uint16_t>(u >> 16);
        } else {
            const int q = static_cast<int>(std::lround(v[i] * 64.f));  // |q| <= 64: q/64 exact in fp16
            const float f = std::fabs(q / 64.f);
            uint16_t bits = 0;
            if (f != 0.f) {
                int e;
                const float m = std::frexp(f, &e);  // f = m 2^e, m in [0.5, 1)
                bits = static_cast<uint16_t>(((e - 1 + 15) << 10) | (static_cast<int>(m * 2048.f) - 1024));
            }
            out[i] = static_cast<uint16_t>(bits | (q < 0 ? 0x8000 : 0));
        }
    }
    return out;
}

// Heap buffer of exactly `count` floats (ASan catches any access past it); nullptr if empty.
struct Buffer {
    std::vector<float> v;
    explicit Buffer(long long count, float fill = NAN) : v(static_cast<size_t>(count), fill) {}
    float* get() { return v.empty() ? nullptr : v.data(); }
};

bool all_finite(const std::vector<float>& v) {
    for (float x : v)
        if (!std::isfinite(x)) return false;
    return true;
}

bool symmetric(const std::vector<float>& A, int D) {
    for (int i = 0; i < D; ++i)
        for (int j = 0; j < i; ++j)
            if (A[size_t(i) * D + j] != A[size_t(j) * D + i]) return false;
    return true;
}

void precondition_cases() {
    const int shapes[][2] = {{1, 1}, {7, 33}, {70, 5}, {65, 130}, {130, 5}};  // splits of K = d_in, K = d_out
    for (auto& s : shapes)
        for (int bf16 = 0; bf16 < 2; ++bf16)
            for (int stored = 0; stored < 2; ++stored) {
                const int m = s[0], n = s[1];
                if (quick && (m != 65 || bf16 != stored)) continue;
                auto V = random_floats(size_t(m) * n);
                auto V16 = to_16bit(V, 1);
                auto QG = random_floats(size_t(m) * m), QA = random_floats(size_t(n) * n);
                auto S = random_floats(size_t(m) * n), eg = random_floats(m), ea = random_floats(n);
                for (auto* v : {&S, &eg, &ea})
                    for (float& x : *v) x = std::fabs(x) + 0.5f;
                Buffer out(size_t(m) * n), dot(1), ws(emu_precondition_workspace(m, n));
                const void* grad = bf16 ? static_cast<const void*>(V16.data()) : V.data();
                CHECK(emu_precondition(grad, bf16, QG.data(), QA.data(), stored ? S.data() : nullptr,
                                       stored ? nullptr : eg.data(), stored ? nullptr : ea.data(), 0.1f, out.get(),
                                       dot.get(), ws.get(), m, n) == 0);
                CHECK(all_finite(out.v) && all_finite(dot.v));
            }
}

void scale_cases() {
    // n, T (-1: per-row form), d_out, d_in, splits, at broadcast (one K x d_in matrix, rotate order)
    const int cases[][6] = {{37, -1, 70, 5, 1, 0}, {300, -1, 9, 66, 3, 0}, {5, 7, 66, 65, 2, 0},
                            {6, 17, 3, 8, 6, 0},   {4, 0, 8, 5, 1, 0},    {4, 0, 8, 5, 2, 0},
                            {0, -1, 3, 3, 2, 0},   {5, 19, 9, 19, 2, 1},  {3, 70, 66, 70, 1, 1}};
    for (auto& c : cases)
        for (int tensor_cores = 0; tensor_cores < 2; ++tensor_cores) {
            const int n = c[0], T = c[1], d_out = c[2], d_in = c[3], splits = c[4], broadcast = c[5];
            if (quick && (splits == 1 || n == 0)) continue;
            const bool shared = T >= 0;
            const size_t rows = size_t(n) * (shared ? T : 1);
            auto gt = random_floats(rows * d_out), at = random_floats((broadcast ? size_t(T) : rows) * d_in);
            auto S0 = random_floats(size_t(d_out) * d_in);
            Buffer ws(emu_scale_workspace(d_out, d_in, splits));
            std::vector<float> S = S0;
            CHECK(emu_scale(gt.empty() ? nullptr : gt.data(), at.empty() ? nullptr : at.data(), S.data(), ws.get(), n,
                            shared, broadcast, shared ? T : 0, d_out, d_in, splits, tensor_cores, 0.5f, 0.25f) == 0);
            CHECK(all_finite(S));
            if (rows == 0) {  // an empty sum: S <- beta S exactly
                bool exact = true;
                for (size_t e = 0; e < S.size(); ++e) exact = exact && S[e] == 0.5f * S0[e];
                CHECK(exact);
            }
        }
}

void conv_cases() {
    // n, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw | bias, weighted, splits
    const int cases[][15] = {{1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 1},
                             {2, 3, 9, 7, 3, 2, 2, 1, 1, 0, 1, 2, 1, 1, 1},
                             {3, 2, 5, 6, 1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 2},
                             {2, 8, 9, 9, 3, 3, 1, 1, 1, 1, 1, 1, 1, 0, 3},
                             {1, 2, 4, 4, 3, 3, 1, 1, 3, 3, 1, 1, 1, 1, 2}};
    for (int type = 0; type < 3; ++type)
        for (auto& c : cases) {
            if (quick && (c[14] == 1 || c[0] != 2 + type % 2)) continue;
            const int n = c[0], C = c[1], H = c[2], W = c[3];
            const int oh = (H + 2 * c[8] - c[10] * (c[4] - 1) - 1) / c[6] + 1;
            const int ow = (W + 2 * c[9] - c[11] * (c[5] - 1) - 1) / c[7] + 1;
            const int bias = c[12], splits = c[14];
            const int D = C * c[4] * c[5] + bias;
            auto x = random_floats(size_t(n) * C * H * W);
            auto x16 = to_16bit(x, type);
            auto w = random_floats(size_t(n) * oh * ow);
            std::vector<float> A(size_t(D) * D, NAN);
            Buffer ws(emu_conv_workspace(D, splits));
            const void* xp = type == 0 ? static_cast<const void*>(x.data()) : x16.data();
            for (int tensor_cores = 0; tensor_cores < 2; ++tensor_cores) {
                std::fill(A.begin(), A.end(), NAN);
                // chunks of one example (several launches) when n > 1 on the tensor-core path
                CHECK(emu_conv(xp, type, c[13] ? w.data() : nullptr, A.data(), ws.get(), c, bias, splits,
                               tensor_cores, tensor_cores && n > 1 ? (long long)C * H * W : 0, 0.f, 1.f) == 0);
                CHECK(all_finite(A) && symmetric(A, D));
            }
        }
}

void factor_cases() {
    // n, d, bias, weighted, splits
    const int cases[][5] = {{1, 1, 0, 0, 1}, {7, 33, 1, 0, 1}, {33, 70, 1, 1, 1}, {600, 9, 1, 0, 3},
                            {97, 64, 0, 0, 2}, {70, 65, 1, 1, 3}, {0, 5, 1, 0, 2}, {40, 0, 1, 0, 2}};
    for (int type = 0; type < 3; ++type)
        for (auto& c : cases) {
            if (quick && (c[4] == 1 || c[0] > 100 || c[0] == 0)) continue;
            const int n = c[0], d = c[1], bias = c[2], splits = c[4];
            const int D = d + bias;
            auto a = random_floats(size_t(n) * d);
            auto a16 = to_16bit(a, type);
            auto w = random_floats(n);
            for (float& x : w) x = std::fabs(x);
            std::vector<float> A0 = random_floats(size_t(D) * D);
            for (int i = 0; i < D; ++i)
                for (int j = 0; j < i; ++j) A0[size_t(i) * D + j] = A0[size_t(j) * D + i];
            for (int tensor_cores = 0; tensor_cores < 2; ++tensor_cores)
            for (float beta : {0.f, 0.75f}) {
                if (quick && beta == 0.f) continue;
                std::vector<float> A = beta == 0.f ? std::vector<float>(A0.size(), NAN) : A0;
                Buffer ws(emu_factor_workspace(D, splits));
                const void* ap = type == 0 ? static_cast<const void*>(a.data()) : a16.data();
                CHECK(emu_factor(A.data(), n ? ap : nullptr, type, c[3] ? w.data() : nullptr, ws.get(), n, d, bias,
                                 tensor_cores, splits, beta, 0.5f) == 0);
                CHECK(all_finite(A) && symmetric(A, D));
            }
        }
}

}  // namespace

int main(int argc, char** argv) {
    quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
    precondition_cases();
    scale_cases();
    conv_cases();
    factor_cases();
    std::printf("sanitize_driver: %s (%d failures)\n", failures ? "FAILED" : "ok", failures);
    return failures ? 1 : 0;
}
