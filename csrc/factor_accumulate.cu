// Kronecker-factor accumulation  A <- beta*A + alpha * abar^T diag(w) abar.
//
// a: (n, d) fp32/bf16/fp16 rows, abar = [a | 1] when bias (D = d + 1; the homogeneous column is
// produced on load, never stored), w: optional (n,) fp32, A: (D, D) fp32, fp32 accumulation.
// Cost: n*D*(D+1)/2 multiply-adds (upper-triangle tiles only, mirrored), reads
// n*d*elt*~(D/64) bytes of a (L2-resident re-reads) + D^2*4 of A (none when beta == 0),
// writes D^2*4. With beta == 0 A is never read (NaN/Inf in it do not propagate, as in addmm).
// Why a kernel: the PyTorch reference up-casts 16-bit rows to fp32, concatenates the ones
// column (a copy of a) and runs a full fp32 SGEMM; this computes half the product, never
// copies a, and on tensor cores reads the 16-bit rows as they are.
//
// Each block owns one 64x64 output tile (I, J), I <= J, loops over rows in slabs staged in
// shared memory, then writes the tile and its transpose (coalesced through shared memory),
// only elements with row <= col, so A is exactly symmetric.
// Paths:
//  - unweighted bf16/fp16 on sm_80+ (tensor_cores): mma.sync.m16n8k16 with fp32 accumulation,
//    fragments loaded from shared memory with ldmatrix.trans (csrc/warp_mma.cuh). The products
//    are exact in fp32, but the tensor cores' fp32 accumulation is NOT IEEE round-to-nearest:
//    terms are aligned to the largest and truncated, the sum is rounded toward zero (Fasi et
//    al., PeerJ CS 2021). Error model per output: below about 2^-22 * sum|terms| per 16-row
//    mma step, so about n/16 * 2^-22 * sum|terms| over a chain of n rows (2-4x the error of
//    sequential fp32 FMA, and biased toward zero): close to, not identical with, the fp32 reference.
//  - fp32 rows, or weighted rows of any dtype, on sm_80+: 3xTF32 on mma.sync.m16n8k8 (x = hi + lo,
//    x y ~ hi hi' + hi lo' + lo hi', fp32 accumulation; weights applied on load, never stored).
//    Error model: each product within 3 * 2^-22 of exact (the split leaves 2^-22 |x|, lo lo' is
//    dropped), plus 2^-22 * sum|terms| per mma step (three per 8 rows): about fp32 accuracy at
//    tensor-core rate. A plain 1xTF32 path is not offered: it would round the inputs to 10-bit
//    mantissas, which the fp32 reference does not do.
//  - below sm_80: a SIMT kernel (4x4 outputs per thread, fp32 FMA, weights applied on load).
// Splits: when the tiles alone leave SMs idle (small D, large n) the caller cuts the rows into
// `splits` parts; block z writes the upper triangle of its partial tile into workspace[z] and
// reduce_splits_kernel<true> sums the partials in a fixed order, applies the EMA and mirrors:
// no atomics, bitwise reproducible for a given `splits`, A exactly symmetric.
// Assumptions: n < 2^31 - 2^16, D < 2^20; device pointers of the current device; A does not
// alias a, w or the workspace. Launch: 256 (SIMT) / 128 (tensor cores) threads, static smem
// <= 28 KiB. Why it can win: see docs/kernels.md (performance model).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "factor_accumulate.h"
#include "gemm_tile.cuh"
#include "sym_mma_tile.cuh"
#include "warp_mma.cuh"

namespace kfac {
namespace {

using symtile::tile_coords;
using symtile::write_tile;

constexpr int kTile = symtile::kTile;  // output tile edge
constexpr int kSimtRows = 16;      // rows per shared-memory slab, SIMT path
constexpr int kSimtThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each
constexpr int kMmaRows = 32;       // rows per slab, tensor-core path (two k16 steps)
constexpr int kMmaThreads = symtile::kThreads;  // 4 warps, 32 x 32 outputs each (both tensor-core paths)
constexpr int kTf32Rows = 16;      // rows per slab, 3xTF32 path (two k8 steps)

// abar[row][col] as float: a's entry, the implicit 1 at col == d (bias), 0 past D.
template <typename T>
__device__ __forceinline__ float abar_at(const T* a, int64_t row, int col, int d, int D) {
  if (col < d) return tile::to_float(a[row * d + col]);
  return col < D ? 1.0f : 0.0f;
}

// This block's rows [row_begin, row_end) and its partial slice (nullptr: write A directly).
struct RowRange {
  int begin, end;
  float* partial;
};

__device__ __forceinline__ RowRange row_range(int n, int rows_per_split, float* workspace, int D) {
  const int64_t begin = int64_t(blockIdx.z) * rows_per_split;
  const int64_t end = begin + rows_per_split < n ? begin + rows_per_split : n;
  float* partial = workspace == nullptr ? nullptr : workspace + int64_t(blockIdx.z) * D * D;
  return RowRange{int(begin < n ? begin : n), int(end), partial};
}

// Stages rows [r0, r0 + ROWS) of the tile's columns as fp32: sX[k][c] = w[r0+k] abar[r0+k][i0+c]
// (w == nullptr: 1), sY[k][c] = abar[r0+k][j0+c]; zeros from row `end` on. All THREADS call it.
template <int ROWS, int LDS, int THREADS, typename T>
__device__ __forceinline__ void stage_fp32(float (*sX)[LDS], float (*sY)[LDS], const T* a, const float* w, int r0,
                                           int end, int i0, int j0, int d, int D) {
  for (int idx = threadIdx.x; idx < ROWS * kTile; idx += THREADS) {
    const int k = idx / kTile, c = idx % kTile;
    const int row = r0 + k;  // < n < 2^31 - 2^16
    float x = 0.0f, y = 0.0f;
    if (row < end) {
      x = abar_at(a, row, i0 + c, d, D);
      if (w != nullptr) x *= w[row];
      y = abar_at(a, row, j0 + c, d, D);
    }
    sX[k][c] = x;
    sY[k][c] = y;
  }
}

// SIMT path: any input dtype, optional row weights.
template <typename T>
__global__ void __launch_bounds__(kSimtThreads)
    factor_simt_kernel(float* __restrict__ A, const T* __restrict__ a, const float* __restrict__ w,
                       float* __restrict__ workspace, int n, int d, int D, int tiles, int rows_per_split,
                       float alpha, float beta) {
  __shared__ __align__(16) float sX[kSimtRows][kTile];  // weighted columns of tile row I
  __shared__ __align__(16) float sY[kSimtRows][kTile];  // columns of tile column J
  __shared__ float sC[kTile * (kTile + 1)];
  int I, J;
  tile_coords(blockIdx.x, tiles, I, J);
  const int i0 = I * kTile, j0 = J * kTile;
  const RowRange rows = row_range(n, rows_per_split, workspace, D);
  const int row_begin = rows.begin, row_end = rows.end;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;

  float acc[4][4] = {};
  for (int r0 = row_begin; r0 < row_end; r0 += kSimtRows) {
    stage_fp32<kSimtRows, kTile, kSimtThreads>(sX, sY, a, w, r0, row_end, i0, j0, d, D);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kSimtRows; ++k) {
      const float4 xv = *reinterpret_cast<const float4*>(&sX[k][ty * 4]);
      const float4 yv = *reinterpret_cast<const float4*>(&sY[k][tx * 4]);
      const float xs[4] = {xv.x, xv.y, xv.z, xv.w}, ys[4] = {yv.x, yv.y, yv.z, yv.w};
#pragma unroll
      for (int m = 0; m < 4; ++m)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[m][q] = fmaf(xs[m], ys[q], acc[m][q]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int m = 0; m < 4; ++m)
#pragma unroll
    for (int q = 0; q < 4; ++q) sC[(ty * 4 + m) * (kTile + 1) + tx * 4 + q] = acc[m][q];
  __syncthreads();
  write_tile<kTile + 1>(A, rows.partial, D, sC, i0, j0, alpha, beta);
}

// Bit pattern of 1.0 in the 16-bit input type (the bias column).
template <typename T>
constexpr uint16_t kOneBits = std::is_same<T, __nv_bfloat16>::value ? 0x3F80 : 0x3C00;

// Tensor-core path: bf16/fp16 rows, no weights, sm_80+. Warp (wm, wn) owns the 32x32 sub-tile
// [wm*32, wn*32]: 2 (m16) x 4 (n8) mma.m16n8k16 accumulators, 32 fp32 registers per lane.
// The slab sX[k][i] = abar[r0 + k][i0 + i] holds A^T of the product C = X^T Y (A(i,k) = sX[k][i]),
// so both operands are loaded with ldmatrix.trans from k-major rows of 16-bit elements.
// Shared rows are 72 halves (144 B): 16-byte aligned for ldmatrix, and the 8 row addresses of
// one 8x8 matrix fall in 8 distinct 4-bank groups (no bank conflicts).
template <typename T>
__global__ void __launch_bounds__(kMmaThreads)
    factor_mma_kernel(float* __restrict__ A, const T* __restrict__ a, float* __restrict__ workspace, int n, int d,
                      int D, int tiles, int rows_per_split, float alpha, float beta) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr warp::Mma16 kType = std::is_same<T, __nv_bfloat16>::value ? warp::Mma16::BFloat16 : warp::Mma16::Float16;
  constexpr int LDS = kTile + 8;  // 16-bit elements per shared row
  constexpr int LDC = kTile + 4;  // floats per sC row
  __shared__ __align__(128) uint16_t sX[kMmaRows][LDS];
  __shared__ __align__(128) uint16_t sY[kMmaRows][LDS];
  __shared__ __align__(16) float sC[kTile * LDC];
  int I, J;
  tile_coords(blockIdx.x, tiles, I, J);
  const int i0 = I * kTile, j0 = J * kTile;
  const RowRange rows = row_range(n, rows_per_split, workspace, D);
  const int warp_id = threadIdx.x / 32, lane = threadIdx.x % 32, wm = warp_id / 2, wn = warp_id % 2;
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(a);

  float acc[2][4][4] = {};
  for (int r0 = rows.begin; r0 < rows.end; r0 += kMmaRows) {
    for (int idx = threadIdx.x; idx < kMmaRows * kTile; idx += kMmaThreads) {
      const int k = idx / kTile, c = idx % kTile;
      const int64_t row = r0 + k;
      uint16_t x = 0, y = 0;  // +0.0 in both 16-bit formats
      if (row < rows.end) {
        const int ci = i0 + c, cj = j0 + c;
        x = ci < d ? bits[row * d + ci] : (ci < D ? kOneBits<T> : 0);
        y = cj < d ? bits[row * d + cj] : (cj < D ? kOneBits<T> : 0);
      }
      sX[k][c] = x;
      sY[k][c] = y;
    }
    __syncthreads();
    symtile::mma16_slab<kType, kMmaRows, LDS>(acc, sX, sY, wm, wn, lane);
    __syncthreads();
  }
  symtile::write_fragments<LDC>(A, rows.partial, D, sC, acc, wm, wn, lane, i0, j0, alpha, beta);
#else
  __trap();  // the host never selects this path below sm_80
#endif
}

// 3xTF32 tensor-core path: fp32 rows, or weighted rows of any dtype (weights applied on load),
// sm_80+. x = hi + lo with hi = tf32(x), lo = tf32(x - hi); x y ~= hi*hi' + hi*lo' + lo*hi'
// (the lo*lo' term, below 2^-22 |x y|, is dropped), each an mma.m16n8k8.tf32 with fp32
// accumulation: about fp32 accuracy at tensor-core rate. Warp (wm, wn) owns the 32x32 sub-tile
// [wm*32, wn*32] as 2 (m16) x 4 (n8) accumulators. Shared rows of 72 floats: the fragment loads
// (8 lanes along i or j, 4 along k) hit 32 distinct banks.
template <typename T>
__global__ void __launch_bounds__(kMmaThreads)
    factor_tf32_kernel(float* __restrict__ A, const T* __restrict__ a, const float* __restrict__ w,
                       float* __restrict__ workspace, int n, int d, int D, int tiles, int rows_per_split,
                       float alpha, float beta) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int LDS = kTile + 8;  // floats per shared row
  constexpr int LDC = kTile + 4;
  __shared__ __align__(16) float sX[kTf32Rows][LDS];  // sX[k][i] = w[r0+k] abar[r0+k][i0+i]
  __shared__ __align__(16) float sY[kTf32Rows][LDS];  // sY[k][j] = abar[r0+k][j0+j]
  __shared__ __align__(16) float sC[kTile * LDC];
  int I, J;
  tile_coords(blockIdx.x, tiles, I, J);
  const int i0 = I * kTile, j0 = J * kTile;
  const RowRange rows = row_range(n, rows_per_split, workspace, D);
  const int warp_id = threadIdx.x / 32, lane = threadIdx.x % 32, wm = warp_id / 2, wn = warp_id % 2;

  float acc[2][4][4] = {};
  for (int r0 = rows.begin; r0 < rows.end; r0 += kTf32Rows) {
    stage_fp32<kTf32Rows, LDS, kMmaThreads>(sX, sY, a, w, r0, rows.end, i0, j0, d, D);
    __syncthreads();
    symtile::tf32_slab<kTf32Rows, LDS>(acc, sX, sY, wm, wn, lane);
    __syncthreads();
  }
  symtile::write_fragments<LDC>(A, rows.partial, D, sC, acc, wm, wn, lane, i0, j0, alpha, beta);
#else
  __trap();  // the host never selects this path below sm_80
#endif
}

// A <- beta*A over all D*D entries; A <- 0 without reading it when beta == 0.
__global__ void scale_kernel(float* __restrict__ A, int64_t count, float beta) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x)
    A[i] = beta == 0.0f ? 0.0f : beta * A[i];
}

// The bf16/fp16 mma kernel exists only for 16-bit T.
template <typename T>
void launch_mma16(const FactorArgs& p, const T* a, float* workspace, int D, int tiles, int rows_per_split, dim3 grid,
                  cudaStream_t stream) {
  if constexpr (!std::is_same<T, float>::value) {
    factor_mma_kernel<T><<<grid, kMmaThreads, 0, stream>>>(p.factor, a, workspace, p.n, p.d, D, tiles,
                                                           rows_per_split, p.alpha, p.beta);
  }
}

template <typename T>
cudaError_t launch(const FactorArgs& p, int D, cudaStream_t stream) {
  const int tiles = (D + kTile - 1) / kTile;
  const int blocks = tiles * (tiles + 1) / 2;
  const int rows_per_split = (tile::ceil_div(p.n, p.splits) + kMmaRows - 1) / kMmaRows * kMmaRows;
  const int used_splits = tile::ceil_div(p.n, rows_per_split);
  float* workspace = used_splits > 1 ? p.workspace : nullptr;
  const dim3 grid(blocks, 1, used_splits);
  const T* a = static_cast<const T*>(p.a);
  if (!p.tensor_cores) {
    factor_simt_kernel<T><<<grid, kSimtThreads, 0, stream>>>(p.factor, a, p.weights, workspace, p.n, p.d, D, tiles,
                                                             rows_per_split, p.alpha, p.beta);
  } else if (std::is_same<T, float>::value || p.weights != nullptr) {
    factor_tf32_kernel<T><<<grid, kMmaThreads, 0, stream>>>(p.factor, a, p.weights, workspace, p.n, p.d, D, tiles,
                                                            rows_per_split, p.alpha, p.beta);
  } else {
    launch_mma16(p, a, workspace, D, tiles, rows_per_split, grid, stream);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || workspace == nullptr) return err;
  const int64_t total = int64_t(D) * D;
  const int reduce_blocks = int(total / 256 + 1 < 4096 ? total / 256 + 1 : 4096);
  tile::reduce_splits_kernel<true><<<reduce_blocks, 256, 0, stream>>>(p.factor, workspace, D, D, used_splits, p.beta,
                                                                       p.alpha);
  return cudaGetLastError();
}

}  // namespace

int factor_accumulate_tiles(int D) {
  const int t = tile::ceil_div(D, kTile);
  return t * (t + 1) / 2;
}

int64_t factor_accumulate_workspace_floats(int D, int splits) {
  return splits > 1 ? int64_t(splits) * D * D : 0;
}

cudaError_t factor_accumulate_launch(const FactorArgs& p, cudaStream_t stream) {
  if (p.splits < 1 || (p.splits > 1 && p.workspace == nullptr) || p.n < 0 || p.d < 0) return cudaErrorInvalidValue;
  const int D = p.d + (p.bias ? 1 : 0);
  if (D == 0) return cudaSuccess;
  if (p.n == 0) {  // abar^T abar = 0: A <- beta A
    if (p.beta == 1.0f) return cudaSuccess;
    const int64_t count = int64_t(D) * D;
    scale_kernel<<<int(count / 256 + 1 < 4096 ? count / 256 + 1 : 4096), 256, 0, stream>>>(p.factor, count, p.beta);
    return cudaGetLastError();
  }
  switch (p.a_type) {
    case FactorInputType::Float32: return launch<float>(p, D, stream);
    case FactorInputType::BFloat16: return launch<__nv_bfloat16>(p, D, stream);
    case FactorInputType::Float16: return launch<__half>(p, D, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace kfac
