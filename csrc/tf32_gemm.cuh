// 3xTF32 tensor-core GEMM main loop (sm_80+), used by precondition.cu.
//
// One block of 128 threads (4 warps, 2 x 2) computes a 128 x 64 tile of C = A B with fp32
// accuracy on mma.sync.m16n8k8.tf32 (csrc/warp_mma.cuh): every operand element x is split
// ONCE, when it is staged in shared memory, into hi = tf32(x) and lo = tf32(x - hi), and
// each product is taken as hi hi' + hi lo' + lo hi' with fp32 accumulation (the lo lo' term,
// below 2^-22 |x y|, is dropped). Error per product within 3 * 2^-22 |x y|. The three mma of one
// k8 step accumulate into a fresh fragment, which is then added to the running sum with an fp32
// (round-to-nearest) FADD: the tensor cores' truncating, round-toward-zero accumulation (model
// in tests/emulation/cuda_shim/warp.h) then errs only within each k8 step's partial (3 steps of
// at most 2^-22 of its terms), and the long chain over K is unbiased fp32 addition (u per
// step) instead of 3 K / 8 biased roundings: fp32-level accuracy at three times the TF32
// tensor-core work (plus 4 FADD per fragment and step).
//
// Warp (wm, wn) owns the 64 x 32 sub-tile at (64 wm, 32 wn): 4 (m16) x 4 (n8) accumulators,
// 64 fp32 registers per lane. The K loop stages a 128 x 8 slice of A and an 8 x 64 slice of B
// per iteration as hi and lo planes; the next slice is read from global memory into registers
// while the tensor cores work on the current one (register double buffering: one shared
// buffer, two barriers per slice, no cp.async).
//
// Operands are loaders (tile::RowMajor / tile::Transposed of csrc/gemm_tile.cuh or any functor
// `float operator()(int row, int k)` for A, `(int k, int col)` for B), called only inside the
// matrix (zeros are substituted outside), so every size is bounds-checked. AKF / BKF ("k
// fast"): the operand is contiguous along k. It chooses both the order in which consecutive
// threads read it (coalescing) and its shared layout, k-major ([k][row]) or row-major
// ([row][k]), so that the staging stores and the fragment loads are (nearly) free of bank
// conflicts (see Slice).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "gemm_tile.cuh"
#include "warp_mma.cuh"

namespace kfac {
namespace tc {

constexpr int BM = 128;      // tile rows
constexpr int BN = 64;       // tile columns
constexpr int BK = 8;        // K slice per stage (one m16n8k8 step)
constexpr int THREADS = 128; // 4 warps, 2 (m) x 2 (n)
constexpr int WM = 64;       // warp tile rows
constexpr int WN = 32;       // warp tile columns
constexpr int MT = WM / 16;  // m16 tiles per warp
constexpr int NT = WN / 8;   // n8 tiles per warp
static_assert((BM / WM) * (BN / WN) * 32 == THREADS, "warp layout");
static_assert((BM * BK) % THREADS == 0 && (BK * BN) % THREADS == 0, "staging");

// Shared slice of one operand with ROWS rows (m for A, n for B) and BK k-columns, the hi and lo
// parts in separate planes so that each fragment register is one LDS.32 straight into place.
// Row length: ROWS + 8 words (k-major; = 8 mod 32) or BK + 4 = 20 (row-major): the 32 lanes of
// one fragment load, (g, t) = (0..7, 0..3), hit words 8 t + g or 20 g + t (mod 32): 32 banks.
template <int ROWS, bool KFAST>
struct Slice {
    static constexpr int kLd = KFAST ? BK + 4 : ROWS + 8;
    static constexpr int kSize = KFAST ? ROWS * kLd : BK * kLd;
    uint32_t hi[kSize];
    uint32_t lo[kSize];
    __device__ __forceinline__ static int index(int row, int k) { return KFAST ? row * kLd + k : k * kLd + row; }
    __device__ __forceinline__ void store(int row, int k, float x) {
        uint32_t h, l;
        warp::split_tf32_bits(x, h, l);
        hi[index(row, k)] = h;
        lo[index(row, k)] = l;
    }
};

template <bool AKF, bool BKF>
struct Smem {
    Slice<BM, AKF> a;
    Slice<BN, BKF> b;
};

// Registers holding the next slice while the current one is computed.
struct Staged {
    float a[BM * BK / THREADS];
    float b[BK * BN / THREADS];
};

// Element e (0 <= e < ROWS * BK) of a slice -> (row, k): consecutive e walk the contiguous index.
template <int ROWS, bool KFAST>
__device__ __forceinline__ void slice_coords(int e, int& row, int& k) {
    row = KFAST ? e / BK : e % ROWS;
    k = KFAST ? e % BK : e / ROWS;
}

template <bool AKF, bool BKF, class LA, class LB>
__device__ __forceinline__ void load_slice(Staged& st, int M, int N, int k0, int k_end, int m0, int n0,
                                           const LA& la, const LB& lb) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int l = 0; l < BM * BK / THREADS; ++l) {
        int r, k;
        slice_coords<BM, AKF>(tid + l * THREADS, r, k);
        st.a[l] = (m0 + r < M && k0 + k < k_end) ? la(m0 + r, k0 + k) : 0.f;
    }
#pragma unroll
    for (int l = 0; l < BK * BN / THREADS; ++l) {
        int c, k;
        slice_coords<BN, BKF>(tid + l * THREADS, c, k);
        st.b[l] = (n0 + c < N && k0 + k < k_end) ? lb(k0 + k, n0 + c) : 0.f;
    }
}

template <bool AKF, bool BKF>
__device__ __forceinline__ void store_slice(Smem<AKF, BKF>& s, const Staged& st) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int l = 0; l < BM * BK / THREADS; ++l) {
        int r, k;
        slice_coords<BM, AKF>(tid + l * THREADS, r, k);
        s.a.store(r, k, st.a[l]);
    }
#pragma unroll
    for (int l = 0; l < BK * BN / THREADS; ++l) {
        int c, k;
        slice_coords<BN, BKF>(tid + l * THREADS, c, k);
        s.b.store(c, k, st.b[l]);
    }
}

// acc[i][j] (m16n8 C fragment of warp tile row i, column j) += the slice's k8 step(s).
template <bool AKF, bool BKF>
__device__ __forceinline__ void mma_slice(float (&acc)[MT][NT][4], Smem<AKF, BKF>& s, int wm, int wn, int g,
                                          int t) {
#pragma unroll
    for (int kk = 0; kk < BK; kk += 8) {
        uint32_t b_hi[NT][2], b_lo[NT][2];
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 2; ++e) {  // b_e at (k t + 4e, col g)
                const int idx = s.b.index(wn * WN + j * 8 + g, kk + t + 4 * e);
                b_hi[j][e] = s.b.hi[idx];
                b_lo[j][e] = s.b.lo[idx];
            }
#pragma unroll
        for (int i = 0; i < MT; ++i) {  // one m16 row of fragments at a time: fewer live registers
            uint32_t a_hi[4], a_lo[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {  // a_e at (row g + 8(e & 1), k t + 4(e >= 2))
                const int idx = s.a.index(wm * WM + i * 16 + g + 8 * (e & 1), kk + t + 4 * (e >> 1));
                a_hi[e] = s.a.hi[idx];
                a_lo[e] = s.a.lo[idx];
            }
#pragma unroll
            for (int j = 0; j < NT; ++j) {  // this k8 step's partial, small terms first
                float step[4];
                warp::mma_m16n8k8_tf32_zero(step, a_lo, b_hi[j]);
                warp::mma_m16n8k8_tf32(step, a_hi, b_lo[j]);
                warp::mma_m16n8k8_tf32(step, a_hi, b_hi[j]);
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[i][j][e] += step[e];  // round to nearest
            }
        }
    }
}

// acc = A[m0:m0+128, k_begin:k_end] B[k_begin:k_end, n0:n0+64] (this lane's fragments).
// All THREADS threads of the block call it (it synchronises); k_begin < k_end.
template <bool AKF, bool BKF, class LA, class LB>
__device__ __forceinline__ void mainloop(float (&acc)[MT][NT][4], Smem<AKF, BKF>& s, int M, int N, int k_begin,
                                         int k_end, int m0, int n0, const LA& la, const LB& lb) {
    const int warp_id = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = warp_id / (BN / WN), wn = warp_id % (BN / WN);
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
    Staged st;
    load_slice<AKF, BKF>(st, M, N, k_begin, k_end, m0, n0, la, lb);
    for (int k0 = k_begin; k0 < k_end; k0 += BK) {
        store_slice(s, st);
        __syncthreads();
        if (k0 + BK < k_end) load_slice<AKF, BKF>(st, M, N, k0 + BK, k_end, m0, n0, la, lb);
        mma_slice(acc, s, wm, wn, g, t);
        __syncthreads();
    }
}

// Row and column of accumulator element acc[i][j][e] of this lane (c_e at row g + 8(e >= 2),
// col 2t + (e & 1) of the m16n8 tile).
__device__ __forceinline__ int acc_row(int m0, int i, int e) {
    const int warp_id = threadIdx.x / 32, g = (threadIdx.x % 32) / 4;
    return m0 + (warp_id / (BN / WN)) * WM + i * 16 + g + 8 * (e >> 1);
}
__device__ __forceinline__ int acc_col(int n0, int j, int e) {
    const int warp_id = threadIdx.x / 32, t = threadIdx.x % 4;
    return n0 + (warp_id % (BN / WN)) * WN + j * 8 + 2 * t + (e & 1);
}

}  // namespace tc
}  // namespace kfac
