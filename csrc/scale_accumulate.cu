// EKFAC / TEKFAC scale accumulation in the Kronecker eigenbasis:
//
//     S <- beta S + alpha sum_i (Q_G^T dW_i Q_A)^2     (element-wise square),  dW_i = sum_t g_it abar_it^T
//
// The dense GEMMs that feed these kernels (projections or per-example gradients) run in the
// Python wrapper with torch/cuBLAS; these kernels do the rest, never materialising squares
// or per-example products.
//
// (a) no weight sharing (one row per example): Q_G^T g_i abar_i^T Q_A = G~_i A~_i^T with the
//     projections G~ = g Q_G, A~ = abar Q_A, so S <- beta S + alpha (G~ o G~)^T (A~ o A~):
//     one GEMM over the n rows with the squares taken on load. Cost n d_out d_in multiply-adds.
// (b) weight sharing (T positions per example), S += alpha sum_i (X_i^T Y_i)^2 where X_i, Y_i
//     are the example's K x d_out and K x d_in slices of gt, at (at may be one K x d_in matrix
//     for every example: at_broadcast). Each block owns one 64 x 64 tile of S and walks its
//     examples: it forms the tile of X_i^T Y_i in registers, squares it into a second register
//     accumulator, and never writes the product anywhere. Cost n K d_out d_in. The wrapper
//     (kfac_cuda/ops/scale_accumulate.py) feeds it in one of two contraction orders, chosen
//     per layer by cost:
//       project: X_i = G~_i, Y_i = A~_i (K = T, every position projected first):
//                n T (d_out^2 + d_in^2) for the projections + n T d_out d_in here;
//       rotate:  X_i = (Q_G^T dW_i)^T = dW_i^T Q_G (K = d_in, torch forms dW_i^T = abar_i^T g_i
//                and the product with Q_G), Y = Q_A broadcast:
//                n T d_out d_in + n d_in d_out^2 in torch + n d_out d_in^2 here.
//     "project" wins when T (d_out^2 + d_in^2) < d_out d_in (d_out + d_in) (ResNet l3/l4, ViT
//     with 512-token sequences), "rotate" otherwise (ResNet l1/l2: T = 1024 / 256 positions).
//
// Paths. sm_80+ (tensor_cores): 3xTF32 on mma.sync.m16n8k8 (csrc/warp_mma.cuh), 128 threads,
// 4 warps of 32 x 32 outputs (2 m16 x 4 n8 accumulators each), slabs of 16 rows staged as fp32
// in shared memory (squared on load for (a)); every fragment element x is split as
// x = hi + lo, hi = tf32(x), lo = tf32(x - hi), and x y ~ lo hi' + hi lo' + hi hi' (lo lo',
// below 2^-22 |x y|, dropped), each an mma with fp32 accumulation. Error model: each product
// within 3 * 2^-22 of exact, plus 2^-22 * sum|terms| per mma step (three per 8 rows), i.e.
// about fp32 accuracy at tensor-core rate (tests/test_kernel_emulation.py derives its bounds
// from this). Below sm_80: 64 x 64 SIMT tiles of gemm_tile.cuh (256 threads, fp32 FMA).
// Why not cuBLAS for (a): the S GEMM is one of three GEMMs of the op and squares on load
// save the two squared copies; docs/kernels.md says whether that is enough (it is not: the
// projections dominate).
//
// Parallelism / determinism: grid (ceil(d_in/64), ceil(d_out/64), splits). With splits == 1
// the block applies the EMA straight into S. With splits > 1, block z handles a contiguous
// range of rows (a) or examples (b) and stores its partial tile in workspace[z]; then
// reduce_splits_kernel sums the partials in a fixed order and applies the EMA. No atomics:
// results are bitwise reproducible for a given `splits`.
// beta == 0 never reads S; K == 0 (T = 0) gives S <- beta S without reading gt or at.
// Launch: 128 threads and 9.2 KiB static smem (tensor cores), 256 threads and 8.3 KiB (SIMT).
// Assumptions: rows = n (or n * T) < 2^31; pointers are device pointers; S does not alias
// gt, at or the workspace.
#include "gemm_tile.cuh"
#include "scale_accumulate.h"
#include "sym_mma_tile.cuh"
#include "warp_mma.cuh"

namespace kfac {
namespace {

using tile::BM;
using tile::BN;
using tile::TM;
using tile::TN;

// Squared element of a row-major matrix (square on load).
struct SquaredRowMajor {
    const float* p;
    int64_t ld;
    __device__ __forceinline__ float operator()(int r, int c) const {
        const float v = p[static_cast<int64_t>(r) * ld + c];
        return v * v;
    }
};

// Squared element of the transpose of a row-major matrix.
struct SquaredTransposed {
    const float* p;
    int64_t ld;
    __device__ __forceinline__ float operator()(int r, int c) const {
        const float v = p[static_cast<int64_t>(c) * ld + r];
        return v * v;
    }
};

// Writes the block's tile: EMA into S when out_ws == nullptr, else the raw partial into
// out_ws[blockIdx.z] (a d_out x d_in slice).
__device__ __forceinline__ void store_tile(const float (&acc)[TM][TN], float* scale, float* out_ws, int M, int N,
                                           int m0, int n0, float beta, float alpha) {
    float* partial = out_ws == nullptr ? nullptr : out_ws + static_cast<int64_t>(blockIdx.z) * M * N;
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int r = tile::tile_row(m0, i);
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const int c = tile::tile_col(n0, j);
            if (r < M && c < N) {
                const int64_t e = static_cast<int64_t>(r) * N + c;
                if (partial != nullptr) {
                    partial[e] = acc[i][j];
                } else {
                    scale[e] = tile::ema(scale + e, beta, alpha, acc[i][j]);
                }
            }
        }
    }
}

// (a) S tile += (G~ o G~)^T (A~ o A~) over rows [z * chunk, min(rows, (z + 1) * chunk)).
// A operand (d_out x rows): A(r, k) = G~[k, r]^2, contiguous along r. B operand
// (rows x d_in): B(k, c) = A~[k, c]^2, contiguous along c.
__global__ void __launch_bounds__(tile::THREADS) scale_rows_kernel(const float* __restrict__ gt,
                                                                   const float* __restrict__ at,
                                                                   float* scale, float* out_ws, int rows,
                                                                   int d_out, int d_in, int chunk, float beta,
                                                                   float alpha) {
    __shared__ tile::Smem s;
    const int m0 = blockIdx.y * BM;
    const int n0 = blockIdx.x * BN;
    const int64_t begin64 = static_cast<int64_t>(blockIdx.z) * chunk;
    const int k_begin = static_cast<int>(begin64 < rows ? begin64 : rows);
    const int k_end = static_cast<int>(begin64 + chunk < rows ? begin64 + chunk : rows);
    float acc[TM][TN];
    tile::zero(acc);
    tile::mainloop<false, false>(acc, s, d_out, d_in, k_begin, k_end, m0, n0, SquaredTransposed{gt, d_out},
                                 SquaredRowMajor{at, d_in});
    store_tile(acc, scale, out_ws, d_out, d_in, m0, n0, beta, alpha);
}

// (b) S tile += sum_{i in examples of split z} (X_i^T Y_i)^2, X_i = gt rows [i K, (i+1) K) with
// K = positions, Y_i = at + i * at_stride (at_stride = 0: one matrix for every example).
// The per-example product lives only in `acc` (registers); `sq` accumulates its square.
__global__ void __launch_bounds__(tile::THREADS) scale_shared_kernel(const float* __restrict__ gt,
                                                                     const float* __restrict__ at,
                                                                     float* scale, float* out_ws, int n,
                                                                     int positions, int d_out, int d_in,
                                                                     int64_t at_stride, int chunk, float beta,
                                                                     float alpha) {
    __shared__ tile::Smem s;
    const int m0 = blockIdx.y * BM;
    const int n0 = blockIdx.x * BN;
    const int64_t begin64 = static_cast<int64_t>(blockIdx.z) * chunk;
    const int i_begin = static_cast<int>(begin64 < n ? begin64 : n);
    const int i_end = static_cast<int>(begin64 + chunk < n ? begin64 + chunk : n);
    float sq[TM][TN];
    tile::zero(sq);
    for (int i = i_begin; i < i_end; ++i) {
        const int64_t row0 = static_cast<int64_t>(i) * positions;
        float acc[TM][TN];
        tile::zero(acc);
        // A(r, t) = G~_i[t, r] (contiguous along r), B(t, c) = A~_i[t, c].
        tile::mainloop<false, false>(acc, s, d_out, d_in, 0, positions, m0, n0,
                                     tile::Transposed<float>{gt + row0 * d_out, d_out},
                                     tile::RowMajor<float>{at + i * at_stride, d_in});
#pragma unroll
        for (int a = 0; a < TM; ++a)
#pragma unroll
            for (int b = 0; b < TN; ++b) sq[a][b] = fmaf(acc[a][b], acc[a][b], sq[a][b]);
    }
    store_tile(sq, scale, out_ws, d_out, d_in, m0, n0, beta, alpha);
}


// ---- sm_80+: 3xTF32 tensor-core kernels ------------------------------------------------------
constexpr int kMmaThreads = 128;  // 4 warps, 32 x 32 outputs each
constexpr int kMmaRows = 16;      // rows (K) per staged slab: two k8 steps
constexpr int kLds = BM + 8;      // floats per shared row: fragment loads hit 32 distinct banks
static_assert(BM == BN, "one staging loop fills both operands");

// Stages rows [k0, k0 + 16) of the block's columns: sX[k][c] = x[(k0+k) ldx + m0 + c] and
// sY[k][c] = y[(k0+k) ldy + n0 + c], squared when kSquare, zero past k_end, M and N. Thread
// tid owns column c = tid % 64 of rows tid / 64 + 2j (j < 8): the column tests are made once,
// and consecutive threads read consecutive columns (coalesced). All kMmaThreads threads call it.
template <bool kSquare>
__device__ __forceinline__ void stage_slab(float (*sX)[kLds], float (*sY)[kLds], const float* x, int64_t ldx,
                                           const float* y, int64_t ldy, int64_t k0, int64_t k_end, int m0, int n0,
                                           int M, int N) {
    static_assert(kMmaThreads == 2 * BM, "two staged rows per pass");
    const int c = static_cast<int>(threadIdx.x) % BM, k_first = static_cast<int>(threadIdx.x) / BM;
    const bool x_in = m0 + c < M, y_in = n0 + c < N;
    int64_t xo = (k0 + k_first) * ldx + m0 + c, yo = (k0 + k_first) * ldy + n0 + c;
#pragma unroll
    for (int j = 0; j < kMmaRows / 2; ++j) {
        const int k = k_first + 2 * j;
        float xv = 0.f, yv = 0.f;
        if (k0 + k < k_end) {
            if (x_in) xv = x[xo];
            if (y_in) yv = y[yo];
        }
        if (kSquare) {
            xv *= xv;
            yv *= yv;
        }
        sX[k][c] = xv;
        sY[k][c] = yv;
        xo += 2 * ldx;
        yo += 2 * ldy;
    }
}

// acc += A B over one staged slab, 3xTF32 (symtile::tf32_slab, operands split on the bits):
// warp (wm, wn) takes A(i, k) = sX[k][wm*32 + i] and B(k, j) = sY[k][wn*32 + j].
__device__ __forceinline__ void mma_slab(float (&acc)[2][4][4], const float (*sX)[kLds], const float (*sY)[kLds]) {
    const int warp_id = threadIdx.x / 32;
    symtile::tf32_slab<kMmaRows, kLds, /*kBitSplit=*/true>(acc, sX, sY, warp_id / 2, warp_id % 2, threadIdx.x % 32);
}

// Writes the block's fragments (c_e of accumulator (m, q) at tile row wm*32 + m*16 + g + 8(e >= 2),
// col wn*32 + q*8 + 2t + (e & 1)): EMA into S when out_ws == nullptr, else the raw partial into
// out_ws[blockIdx.z]. Lanes t = 0..3 of a row write 8 consecutive floats (full 32-byte sectors).
__device__ __forceinline__ void store_fragments(const float (&acc)[2][4][4], float* scale, float* out_ws, int M,
                                                int N, int m0, int n0, float beta, float alpha) {
    float* partial = out_ws == nullptr ? nullptr : out_ws + static_cast<int64_t>(blockIdx.z) * M * N;
    const int warp_id = threadIdx.x / 32, lane = threadIdx.x % 32, wm = warp_id / 2, wn = warp_id % 2;
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int q = 0; q < 4; ++q)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = m0 + wm * 32 + m * 16 + g + 8 * (e >> 1);
                const int c = n0 + wn * 32 + q * 8 + 2 * t + (e & 1);
                if (r < M && c < N) {
                    const int64_t idx = static_cast<int64_t>(r) * N + c;
                    if (partial != nullptr) {
                        partial[idx] = acc[m][q][e];
                    } else {
                        scale[idx] = tile::ema(scale + idx, beta, alpha, acc[m][q][e]);
                    }
                }
            }
}

// (a) on tensor cores: S tile += (G~ o G~)^T (A~ o A~) over rows [z * chunk, min(rows, (z+1) chunk)),
// squares taken when staging (sX[k][i] = G~[k][m0+i]^2, sY[k][j] = A~[k][n0+j]^2).
__global__ void __launch_bounds__(kMmaThreads) scale_rows_tf32_kernel(const float* __restrict__ gt,
                                                                      const float* __restrict__ at, float* scale,
                                                                      float* out_ws, int rows, int d_out, int d_in,
                                                                      int chunk, float beta, float alpha) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    __shared__ __align__(16) float sX[kMmaRows][kLds];
    __shared__ __align__(16) float sY[kMmaRows][kLds];
    const int m0 = blockIdx.y * BM;
    const int n0 = blockIdx.x * BN;
    const int64_t begin = static_cast<int64_t>(blockIdx.z) * chunk;
    const int64_t k_begin = begin < rows ? begin : rows;
    const int64_t k_end = begin + chunk < rows ? begin + chunk : rows;
    float acc[2][4][4] = {};
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kMmaRows) {
        stage_slab<true>(sX, sY, gt, d_out, at, d_in, k0, k_end, m0, n0, d_out, d_in);
        __syncthreads();
        mma_slab(acc, sX, sY);
        __syncthreads();
    }
    store_fragments(acc, scale, out_ws, d_out, d_in, m0, n0, beta, alpha);
#else
    __trap();  // the host never selects this path below sm_80
#endif
}

// (b) on tensor cores: S tile += sum_{i in examples of split z} (X_i^T Y_i)^2 (see above); the
// product's tile lives in `acc`, its square accumulates in `sq`, both in registers. The
// second launch bound keeps 4 blocks (16 warps) per SM: at most 128 registers per thread.
__global__ void __launch_bounds__(kMmaThreads, 4) scale_shared_tf32_kernel(const float* __restrict__ gt,
                                                                         const float* __restrict__ at,
                                                                         float* scale, float* out_ws, int n,
                                                                         int positions, int d_out, int d_in,
                                                                         int64_t at_stride, int chunk, float beta,
                                                                         float alpha) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    __shared__ __align__(16) float sX[kMmaRows][kLds];
    __shared__ __align__(16) float sY[kMmaRows][kLds];
    const int m0 = blockIdx.y * BM;
    const int n0 = blockIdx.x * BN;
    const int64_t begin = static_cast<int64_t>(blockIdx.z) * chunk;
    const int i_begin = static_cast<int>(begin < n ? begin : n);
    const int i_end = static_cast<int>(begin + chunk < n ? begin + chunk : n);
    float sq[2][4][4] = {};
    for (int i = i_begin; i < i_end; ++i) {
        const float* x = gt + static_cast<int64_t>(i) * positions * d_out;
        const float* y = at + i * at_stride;
        float acc[2][4][4] = {};
        for (int64_t k0 = 0; k0 < positions; k0 += kMmaRows) {
            stage_slab<false>(sX, sY, x, d_out, y, d_in, k0, positions, m0, n0, d_out, d_in);
            __syncthreads();
            mma_slab(acc, sX, sY);
            __syncthreads();
        }
#pragma unroll
        for (int m = 0; m < 2; ++m)
#pragma unroll
            for (int q = 0; q < 4; ++q)
#pragma unroll
                for (int e = 0; e < 4; ++e) sq[m][q][e] = fmaf(acc[m][q][e], acc[m][q][e], sq[m][q][e]);
    }
    store_fragments(sq, scale, out_ws, d_out, d_in, m0, n0, beta, alpha);
#else
    __trap();  // the host never selects this path below sm_80
#endif
}

}  // namespace

int scale_accumulate_tiles(int d_out, int d_in) { return tile::ceil_div(d_out, BM) * tile::ceil_div(d_in, BN); }

int64_t scale_accumulate_workspace_floats(int d_out, int d_in, int splits) {
    return splits > 1 ? static_cast<int64_t>(splits) * d_out * d_in : 0;
}

cudaError_t scale_accumulate_launch(const ScaleArgs& p, cudaStream_t stream) {
    if (p.splits < 1 || p.n < 0 || p.positions < 0) return cudaErrorInvalidValue;
    if (p.at_broadcast && !p.shared) return cudaErrorInvalidValue;
    // The split dimension is n in both cases: the rows (a) or the examples (b).
    const int chunk = tile::ceil_div(p.n > 0 ? p.n : 1, p.splits);
    float* out_ws = p.splits > 1 ? p.workspace : nullptr;
    if (p.splits > 1 && p.workspace == nullptr) return cudaErrorInvalidValue;
    const dim3 grid(tile::ceil_div(p.d_in, BN), tile::ceil_div(p.d_out, BM), p.splits);
    const int64_t at_stride = p.at_broadcast ? 0 : static_cast<int64_t>(p.positions) * p.d_in;
    if (p.shared && p.tensor_cores) {  // K == 0 included: every example's product is 0, S <- beta S
        scale_shared_tf32_kernel<<<grid, kMmaThreads, 0, stream>>>(p.gt, p.at, p.scale, out_ws, p.n, p.positions,
                                                                    p.d_out, p.d_in, at_stride, chunk, p.beta,
                                                                    p.alpha);
    } else if (p.shared) {
        scale_shared_kernel<<<grid, tile::THREADS, 0, stream>>>(p.gt, p.at, p.scale, out_ws, p.n, p.positions,
                                                                 p.d_out, p.d_in, at_stride, chunk, p.beta, p.alpha);
    } else if (p.tensor_cores) {
        scale_rows_tf32_kernel<<<grid, kMmaThreads, 0, stream>>>(p.gt, p.at, p.scale, out_ws, p.n, p.d_out, p.d_in,
                                                                  chunk, p.beta, p.alpha);
    } else {
        scale_rows_kernel<<<grid, tile::THREADS, 0, stream>>>(p.gt, p.at, p.scale, out_ws, p.n, p.d_out, p.d_in,
                                                               chunk, p.beta, p.alpha);
    }
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || p.splits == 1) return err;
    const int64_t total = static_cast<int64_t>(p.d_out) * p.d_in;
    const int blocks = static_cast<int>(total / 256 + 1 < 4096 ? total / 256 + 1 : 4096);
    tile::reduce_splits_kernel<false><<<blocks, 256, 0, stream>>>(p.scale, p.workspace, p.d_out, p.d_in,
                                                                   p.splits, p.beta, p.alpha);
    return cudaGetLastError();
}

}  // namespace kfac
