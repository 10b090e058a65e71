// EKFAC / TEKFAC scale accumulation in the Kronecker eigenbasis:
//
//     S <- beta S + alpha sum_i (Q_G^T dW_i Q_A)^2     (element-wise square),  dW_i = sum_t g_it abar_it^T
//
// The projections G~ = g Q_G and A~ = abar Q_A (abar = [a | 1] with a bias) are dense
// GEMMs that the Python wrapper runs with torch/cuBLAS; these kernels do the rest.
//
// (a) no weight sharing (one row per example): Q_G^T g_i abar_i^T Q_A = G~_i A~_i^T, so
//     S <- beta S + alpha (G~ o G~)^T (A~ o A~): one tiled GEMM over the n rows with the
//     squares taken on load (no squared copies). Cost n d_out d_in multiply-adds.
// (b) weight sharing (T positions per example): P_i = G~_i^T A~_i (d_out x d_in, a T-long
//     GEMM) and S += alpha P_i o P_i. Each block owns one 64 x 64 tile of S and walks its
//     examples: it computes the tile of P_i in registers (acc), squares it into a second
//     register accumulator, and never writes P_i anywhere: the n x d_out x d_in tensor
//     of per-example gradients is not materialised. Cost n T d_out d_in multiply-adds.
//
// Parallelism / determinism: grid (ceil(d_in/64), ceil(d_out/64), splits). With splits == 1
// the block applies the EMA straight into S. With splits > 1, block z handles a contiguous
// range of rows (a) or examples (b) and stores its partial tile in workspace[z]; then
// reduce_splits_kernel sums the partials in a fixed order and applies the EMA. No atomics:
// results are bitwise reproducible for a given `splits`.
// beta == 0 never reads S. Launch: 256 threads, 8.3 KiB static smem per block.
// Assumptions: rows = n (or n * T) < 2^31; pointers are device pointers; S does not alias
// G~, A~ or the workspace.
#include "gemm_tile.cuh"
#include "scale_accumulate.h"

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

// (b) S tile += sum_{i in examples of split z} (G~_i^T A~_i)^2, G~_i = rows [i T, (i+1) T).
// The per-example product lives only in `acc` (registers); `sq` accumulates its square.
__global__ void __launch_bounds__(tile::THREADS) scale_shared_kernel(const float* __restrict__ gt,
                                                                     const float* __restrict__ at,
                                                                     float* scale, float* out_ws, int n,
                                                                     int positions, int d_out, int d_in,
                                                                     int chunk, float beta, float alpha) {
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
                                     tile::RowMajor<float>{at + row0 * d_in, d_in});
#pragma unroll
        for (int a = 0; a < TM; ++a)
#pragma unroll
            for (int b = 0; b < TN; ++b) sq[a][b] = fmaf(acc[a][b], acc[a][b], sq[a][b]);
    }
    store_tile(sq, scale, out_ws, d_out, d_in, m0, n0, beta, alpha);
}

}  // namespace

int scale_accumulate_tiles(int d_out, int d_in) { return tile::ceil_div(d_out, BM) * tile::ceil_div(d_in, BN); }

int64_t scale_accumulate_workspace_floats(int d_out, int d_in, int splits) {
    return splits > 1 ? static_cast<int64_t>(splits) * d_out * d_in : 0;
}

cudaError_t scale_accumulate_launch(const ScaleArgs& p, cudaStream_t stream) {
    if (p.splits < 1) return cudaErrorInvalidValue;
    // The split dimension is n in both cases: the rows (a) or the examples (b).
    const int chunk = tile::ceil_div(p.n > 0 ? p.n : 1, p.splits);
    float* out_ws = p.splits > 1 ? p.workspace : nullptr;
    if (p.splits > 1 && p.workspace == nullptr) return cudaErrorInvalidValue;
    const dim3 grid(tile::ceil_div(p.d_in, BN), tile::ceil_div(p.d_out, BM), p.splits);
    if (p.shared) {  // T == 0 included: every example's product is 0, S <- beta S
        scale_shared_kernel<<<grid, tile::THREADS, 0, stream>>>(p.gt, p.at, p.scale, out_ws, p.n, p.positions,
                                                                 p.d_out, p.d_in, chunk, p.beta, p.alpha);
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
