// Shared-memory tiled GEMM building block used by precondition.cu, scale_accumulate.cu and
// conv_factor_accumulate.cu.
//
// One thread block of 256 threads computes a 64 x 64 tile of C = A B (fp32 accumulation):
// the K loop stages a 64 x 16 slice of A and a 16 x 64 slice of B in shared memory, and
// thread (ty, tx) = (tid / 16, tid % 16) keeps a 4 x 4 register block of C at rows
// m0 + ty + 16*i and columns n0 + tx + 16*j (i, j = 0..3). That strided layout makes the
// epilogue's stores coalesced along a row (consecutive tx -> consecutive columns).
//
// The operands are not pointers but "loaders": functors `float operator()(int m, int k)`
// (for A) and `float operator()(int k, int n)` (for B) returning one element as fp32.
// The main loop only calls them with 0 <= m < M, 0 <= n < N, k_begin <= k < k_end and
// substitutes 0 outside, so every kernel built on it is bounds-checked for any size.
// A loader can compute its element (implicit im2col, square on load, implicit bias
// column, bf16 -> fp32, transposed reads) so none of that is ever materialised.
//
// AKF / BKF ("k fast") choose which index consecutive threads walk when loading a tile:
// true when the operand is contiguous along k, false when contiguous along m (A) or
// n (B); this only affects coalescing, never the result.
//
// No double buffering, no tensor cores: simple enough to check by reading.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kfac {
namespace tile {

constexpr int BM = 64;       // tile rows (M)
constexpr int BN = 64;       // tile columns (N)
constexpr int BK = 16;       // K slice staged per iteration
constexpr int TM = 4;        // register block rows per thread
constexpr int TN = 4;        // register block columns per thread
constexpr int THREADS = 256; // (BM / TM) * (BN / TN)
constexpr int TY = BM / TM;  // 16 thread rows
constexpr int TX = BN / TN;  // 16 thread columns
static_assert(TY * TX == THREADS, "thread layout");
static_assert((BM * BK) % THREADS == 0 && (BK * BN) % THREADS == 0, "tile loads");

__host__ __device__ inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// Row-major matrix view: element (r, c) at p[r * ld + c].
template <typename T>
struct RowMajor {
    const T* p;
    int64_t ld;
    __device__ __forceinline__ float operator()(int r, int c) const {
        return to_float(p[static_cast<int64_t>(r) * ld + c]);
    }
};

// Transposed view of a row-major matrix: element (r, c) at p[c * ld + r].
template <typename T>
struct Transposed {
    const T* p;
    int64_t ld;
    __device__ __forceinline__ float operator()(int r, int c) const {
        return to_float(p[static_cast<int64_t>(c) * ld + r]);
    }
};

struct Smem {
    float a[BK][BM + 1];  // A slice stored k-major; +1 column breaks store bank conflicts
    float b[BK][BN + 1];
};

__device__ __forceinline__ void zero(float (&acc)[TM][TN]) {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;
}

// acc += A[m0:m0+64, k_begin:k_end] * B[k_begin:k_end, n0:n0+64] (this thread's 4 x 4 part).
// Must be called by all 256 threads of the block (it synchronises).
template <bool AKF, bool BKF, class LA, class LB>
__device__ __forceinline__ void mainloop(float (&acc)[TM][TN], Smem& s, int M, int N,
                                         int k_begin, int k_end, int m0, int n0,
                                         const LA& la, const LB& lb) {
    const int tid = threadIdx.x;
    const int tx = tid % TX;
    const int ty = tid / TX;
    for (int k0 = k_begin; k0 < k_end; k0 += BK) {
#pragma unroll
        for (int l = 0; l < (BM * BK) / THREADS; ++l) {
            const int e = tid + l * THREADS;
            const int mm = AKF ? e / BK : e % BM;
            const int kk = AKF ? e % BK : e / BM;
            const int m = m0 + mm;
            const int k = k0 + kk;
            s.a[kk][mm] = (m < M && k < k_end) ? la(m, k) : 0.f;
        }
#pragma unroll
        for (int l = 0; l < (BK * BN) / THREADS; ++l) {
            const int e = tid + l * THREADS;
            const int nn = BKF ? e / BK : e % BN;
            const int kk = BKF ? e % BK : e / BN;
            const int n = n0 + nn;
            const int k = k0 + kk;
            s.b[kk][nn] = (n < N && k < k_end) ? lb(k, n) : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            float ra[TM], rb[TN];
#pragma unroll
            for (int i = 0; i < TM; ++i) ra[i] = s.a[kk][ty + TY * i];
#pragma unroll
            for (int j = 0; j < TN; ++j) rb[j] = s.b[kk][tx + TX * j];
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(ra[i], rb[j], acc[i][j]);
        }
        __syncthreads();
    }
}

// Row / column of this thread's register element (i, j) inside the tile at (m0, n0).
__device__ __forceinline__ int tile_row(int m0, int i) { return m0 + static_cast<int>(threadIdx.x) / TX + TY * i; }
__device__ __forceinline__ int tile_col(int n0, int j) { return n0 + static_cast<int>(threadIdx.x) % TX + TX * j; }

// out = alpha * v when beta == 0 (the old value is not read, so NaN in it cannot leak),
// beta * old + alpha * v otherwise.
__device__ __forceinline__ float ema(float* out, float beta, float alpha, float v) {
    return beta == 0.f ? alpha * v : fmaf(beta, *out, alpha * v);
}

// Deterministic reduction of split-K partial sums:
//   out[r, c] = beta * out[r, c] + alpha * sum_{z < splits} ws[z][r', c']
// with (r', c') = (r, c), or for kSymmetric the upper-triangle element (min, max) (the
// partial kernels of a symmetric product fill only r' <= c'). Fixed summation order.
// Grid-stride over rows * cols elements; any launch shape. (A template so that every .cu
// file including this header can instantiate it without duplicate symbols at link time.)
template <bool kSymmetric>
__global__ void __launch_bounds__(256) reduce_splits_kernel(float* __restrict__ out,
                                                            const float* __restrict__ ws,
                                                            int rows, int cols, int splits,
                                                            float beta, float alpha) {
    const int64_t total = static_cast<int64_t>(rows) * cols;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
        int64_t src = e;
        if (kSymmetric) {
            const int64_t r = e / cols;
            const int64_t c = e - r * cols;
            src = r <= c ? e : c * cols + r;
        }
        float sum = 0.f;
        for (int z = 0; z < splits; ++z) sum += ws[static_cast<int64_t>(z) * total + src];
        out[e] = ema(out + e, beta, alpha, sum);
    }
}

}  // namespace tile
}  // namespace kfac
