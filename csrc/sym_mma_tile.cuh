// Tensor-core building blocks of the symmetric factor products C = X^T Y (sm_80+), shared by
// factor_accumulate.cu and conv_factor_accumulate.cu: one 64x64 output tile per block of 128
// threads (4 warps, warp (wm, wn) owns the 32x32 sub-tile [wm*32, wn*32] as 2 (m16) x 4 (n8)
// fp32 accumulators), the K dimension (rows of X and Y) staged in shared-memory slabs
// sX[k][i] = X[r0 + k][i0 + i], sY[k][j] = Y[r0 + k][j0 + j]. The kernels differ only in how
// they stage a slab; the warp MMA over a staged slab and the epilogue are here.
//   - tf32_slab: 3xTF32 (x = hi + lo, x y ~ hi hi' + hi lo' + lo hi', mma.m16n8k8, fp32 slabs);
//     tf32_split_slab: the same on slabs split into hi/lo when staged (warp::split_tf32).
//   - mma16_slab: bf16/fp16 (mma.m16n8k16, fragments through ldmatrix.trans, 16-bit slabs).
//   - write_fragments / write_tile: accumulators -> shared tile -> A (EMA, mirrored, only
//     row <= col, coalesced both ways) or the split's partial (upper triangle, raw).
// Fragment layouts: csrc/warp_mma.cuh. Only upper-triangle tiles are computed (tile_coords).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "gemm_tile.cuh"
#include "warp_mma.cuh"

namespace kfac {
namespace symtile {

constexpr int kTile = 64;     // output tile edge
constexpr int kThreads = 128; // 4 warps of 32x32 outputs

// Upper-triangle tile t (row-major over I <= J) of a T x T tile grid.
__device__ __forceinline__ void tile_coords(int t, int tiles, int& I, int& J) {
  I = 0;
  while (t >= tiles - I) {
    t -= tiles - I;
    ++I;
  }
  J = I + t;
}

// Writes the tile C[i0.., j0..] held in sC (row-major, leading dim LDC), keeping only elements
// with global row <= col. partial == nullptr: EMA into A and the transpose into A[j0.., i0..]
// (both writes coalesced); otherwise the raw upper-triangle values into partial (D x D).
template <int LDC>
__device__ void write_tile(float* A, float* partial, int D, const float* sC, int i0, int j0, float alpha,
                           float beta) {
  for (int idx = threadIdx.x; idx < kTile * kTile; idx += blockDim.x) {
    const int r = idx / kTile, c = idx % kTile;
    const int gi = i0 + r, gj = j0 + c;  // C[gi][gj] = sC[r][c]
    if (gi < D && gj < D && gi <= gj) {
      const int64_t e = int64_t(gi) * D + gj;
      if (partial != nullptr) {
        partial[e] = sC[r * LDC + c];
      } else {
        A[e] = tile::ema(A + e, beta, alpha, sC[r * LDC + c]);
      }
    }
    const int ti = i0 + c, tj = j0 + r;  // C[ti][tj] = sC[c][r] goes to A[tj][ti]
    if (partial == nullptr && ti < D && tj < D && ti < tj) {
      const int64_t e = int64_t(tj) * D + ti;
      A[e] = tile::ema(A + e, beta, alpha, sC[c * LDC + r]);
    }
  }
}

// Epilogue of the tensor-core kernels: warp (wm, wn)'s 2 x 4 accumulators (m16n8 C fragments:
// c_e at row g + 8(e >= 2), col 2t + (e & 1)) go to the row-major tile sC, then write_tile.
template <int LDC>
__device__ __forceinline__ void write_fragments(float* A, float* partial, int D, float* sC,
                                                const float (&acc)[2][4][4], int wm, int wn, int lane, int i0,
                                                int j0, float alpha, float beta) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int q = 0; q < 4; ++q)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        sC[(wm * 32 + m * 16 + g + 8 * (e >> 1)) * LDC + wn * 32 + q * 8 + 2 * t + (e & 1)] = acc[m][q][e];
  __syncthreads();
  write_tile<LDC>(A, partial, D, sC, i0, j0, alpha, beta);
}

// acc[m][q] += A_m B_q for one k8 step of a warp's 32x32 tile from split fragments, 3xTF32:
// lo hi' + hi lo' + hi hi', small terms first.
__device__ __forceinline__ void mma_3xtf32(float (&acc)[2][4][4], const uint32_t (&a_hi)[2][4],
                                           const uint32_t (&a_lo)[2][4], const uint32_t (&b_hi)[4][2],
                                           const uint32_t (&b_lo)[4][2]) {
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      warp::mma_m16n8k8_tf32(acc[m][q], a_lo[m], b_hi[q]);
      warp::mma_m16n8k8_tf32(acc[m][q], a_hi[m], b_lo[q]);
      warp::mma_m16n8k8_tf32(acc[m][q], a_hi[m], b_hi[q]);
    }
}

// acc += sX[0:ROWS][wm*32..]^T sY[0:ROWS][wn*32..] with 3xTF32 (sm_80+): x = hi + lo with
// hi = tf32(x), lo = tf32(x - hi); x y ~= hi hi' + hi lo' + lo hi' (lo lo', below 2^-22 |x y|,
// is dropped), small terms first. Shared rows of LDS = 72 floats: the fragment loads (8 lanes
// along i or j, 4 along k) hit 32 distinct banks. kBitSplit: split with warp::split_tf32_bits
// (fewer instructions, identical for finite values; a NaN operand may come out finite, see
// warp::round_tf32_bits) instead of cvt.rna for both parts.
template <int ROWS, int LDS, bool kBitSplit = false>
__device__ __forceinline__ void tf32_slab(float (&acc)[2][4][4], const float (*sX)[LDS], const float (*sY)[LDS],
                                          int wm, int wn, int lane) {
  const int g = lane / 4, t = lane % 4;  // fragment coordinates (csrc/warp_mma.cuh)
#pragma unroll
  for (int k0 = 0; k0 < ROWS; k0 += 8) {
    uint32_t a_hi[2][4], a_lo[2][4], b_hi[4][2], b_lo[4][2];
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int e = 0; e < 4; ++e) {  // A(i, k) = sX[k][i]: a_e at i = g + 8(e & 1), k = t + 4(e >= 2)
        const float x = sX[k0 + t + 4 * (e >> 1)][wm * 32 + m * 16 + g + 8 * (e & 1)];
        if constexpr (kBitSplit) {
          warp::split_tf32_bits(x, a_hi[m][e], a_lo[m][e]);
        } else {
          a_hi[m][e] = warp::to_tf32(x);
          a_lo[m][e] = warp::to_tf32(x - __uint_as_float(a_hi[m][e]));
        }
      }
#pragma unroll
    for (int q = 0; q < 4; ++q)
#pragma unroll
      for (int e = 0; e < 2; ++e) {  // B(k, j) = sY[k][j]: b_e at k = t + 4e, j = g
        const float y = sY[k0 + t + 4 * e][wn * 32 + q * 8 + g];
        if constexpr (kBitSplit) {
          warp::split_tf32_bits(y, b_hi[q][e], b_lo[q][e]);
        } else {
          b_hi[q][e] = warp::to_tf32(y);
          b_lo[q][e] = warp::to_tf32(y - __uint_as_float(b_hi[q][e]));
        }
      }
    mma_3xtf32(acc, a_hi, a_lo, b_hi, b_lo);
  }
}

// As tf32_slab, with the operands split once when staged (hi/lo slabs as tf32 bit patterns):
// each staged value is split once instead of once per warp that loads it.
template <int ROWS, int LDS>
__device__ __forceinline__ void tf32_split_slab(float (&acc)[2][4][4], const uint32_t (*sXh)[LDS],
                                                const uint32_t (*sXl)[LDS], const uint32_t (*sYh)[LDS],
                                                const uint32_t (*sYl)[LDS], int wm, int wn, int lane) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int k0 = 0; k0 < ROWS; k0 += 8) {
    uint32_t a_hi[2][4], a_lo[2][4], b_hi[4][2], b_lo[4][2];
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int e = 0; e < 4; ++e) {  // a_e at i = g + 8(e & 1), k = t + 4(e >= 2)
        const int k = k0 + t + 4 * (e >> 1), i = wm * 32 + m * 16 + g + 8 * (e & 1);
        a_hi[m][e] = sXh[k][i];
        a_lo[m][e] = sXl[k][i];
      }
#pragma unroll
    for (int q = 0; q < 4; ++q)
#pragma unroll
      for (int e = 0; e < 2; ++e) {  // b_e at k = t + 4e, j = g
        const int k = k0 + t + 4 * e, j = wn * 32 + q * 8 + g;
        b_hi[q][e] = sYh[k][j];
        b_lo[q][e] = sYl[k][j];
      }
    mma_3xtf32(acc, a_hi, a_lo, b_hi, b_lo);
  }
}

// acc += sX[0:ROWS][wm*32..]^T sY[0:ROWS][wn*32..] on bf16/fp16 slabs (sm_80+, ROWS % 16 == 0):
// sX holds A^T of the product (A(i, k) = sX[k][i]), so both operands load with ldmatrix.trans
// from k-major rows. Shared rows of LDS = 72 halves (144 B): 16-byte aligned for ldmatrix, and
// the 8 row addresses of one 8x8 matrix fall in 8 distinct 4-bank groups (no bank conflicts).
template <warp::Mma16 kType, int ROWS, int LDS>
__device__ __forceinline__ void mma16_slab(float (&acc)[2][4][4], const uint16_t (*sX)[LDS],
                                           const uint16_t (*sY)[LDS], int wm, int wn, int lane) {
#pragma unroll
  for (int k0 = 0; k0 < ROWS; k0 += 16) {
    // Lane l addresses row (l % 8) of 8x8 matrix j = l / 8.
    const int j = lane / 8, r = lane % 8;
    uint32_t fa[2][4], fb[4][2];
#pragma unroll
    for (int m = 0; m < 2; ++m)  // matrices: (i 0-7, k 0-7), (i 8-15, k 0-7), (i 0-7, k 8-15), (i 8-15, k 8-15)
      warp::ldmatrix_x4_trans(fa[m], &sX[k0 + r + 8 * (j >> 1)][wm * 32 + m * 16 + 8 * (j & 1)]);
#pragma unroll
    for (int q = 0; q < 2; ++q) {  // matrices: (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15)
      uint32_t rb[4];
      warp::ldmatrix_x4_trans(rb, &sY[k0 + r + 8 * (j & 1)][wn * 32 + q * 16 + 8 * (j >> 1)]);
      fb[2 * q][0] = rb[0];
      fb[2 * q][1] = rb[1];
      fb[2 * q + 1][0] = rb[2];
      fb[2 * q + 1][1] = rb[3];
    }
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int q = 0; q < 4; ++q) warp::mma_m16n8k16<kType>(acc[m][q], fa[m], fb[q]);
  }
}

}  // namespace symtile
}  // namespace kfac
