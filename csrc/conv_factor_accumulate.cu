// Conv2d activation factor (KFC, Grosse & Martens 2016; K-FAC-expand):
//
//     A <- beta A + alpha sum_{i,t} w_it abar_it abar_it^T
//
// where abar_it (length d = C kh kw [+ 1]) is the im2col patch of example i at output
// position t = oh * OW + ow, ordered like the weight's (C_out, C, kh, kw) -> (C_out, C kh kw)
// view: column p = (c * kh + ki) * kw + kj holds x[i, c, oh sh - ph + ki dh, ow sw - pw + kj dw]
// (0 outside the input: zero padding), and the last column is the implicit 1 when `bias`.
// w_it is an optional per-row weight (n, OH OW), 1 when absent.
//
// This is the GEMM A += X^T diag(w) X over the K = n OH OW rows of the im2col matrix X,
// but X is never built: the slab loaders gather each patch element from x on the fly
// (implicit im2col into shared memory). Memory: reads x (each element about kh kw times,
// mostly from L1/L2), writes d^2 floats; the reference's im2col buffer of
// n OH OW C kh kw elements is not allocated. Compute: n OH OW d^2 multiply-adds, of which
// only the tiles on or above the diagonal are computed (A is symmetric; about half).
//
// Paths (the host picks one per call):
//  - sm_80+ (tensor_cores), one example of x below 2^31 elements (x itself is processed in
//    launches of < 2^31 elements, one launch unless x is larger): the tensor-core kernels of
//    csrc/sym_mma_tile.cuh (one 64x64 upper-triangle tile per block of 128 threads):
//    conv_tf32_kernel (3xTF32 on mma.m16n8k8: fp32 x, or weighted rows of any dtype, weights
//    applied on load) and conv_mma_kernel (unweighted bf16/fp16: mma.m16n8k16 on the raw
//    16-bit values, fragments through ldmatrix). Error models: as factor_accumulate.cu's
//    3xTF32 and mma16 paths (tests/test_kernel_emulation.py derives the tolerances).
//    Index decoding is hoisted out of the element loop: each block decodes its 2 x 64 columns
//    p -> (c, ki, kj) once into a shared table {c H W + ki dh W + kj dw, ki dh, kj dw, value
//    outside the input}; each thread owns 2 (tf32) or 4 (16-bit) rows of every slab and
//    decodes r -> (i, oh, ow) once per row and slab with magic-number division
//    (csrc/fast_divmod.cuh, divisors precomputed on the host). An element then costs two
//    adds and two unsigned compares for the bounds (padding), one 32-bit offset add (exact:
//    the element's offset is < 2^31 and the row and column parts are summed modulo 2^32) and
//    the load.
//    The next slab's elements are loaded into registers while the warps run the current
//    slab's MMAs (one slab of prefetch), so the global latency overlaps the tensor work.
//  - otherwise: conv_factor_kernel, the SIMT gemm_tile kernel (256 threads, 64x64 tiles,
//    fp32 FMA, grid (ceil(d/64), ceil(d/64), splits) with the blocks below the diagonal
//    exiting at once). Not optimised: each gathered element decodes its (row, column) with
//    integer divisions. Only GPUs below sm_80 (not in the default build) and inputs with
//    C H W >= 2^31 take it.
// Splits: splits == 1: each block writes its tile and the mirrored tile of A (EMA applied,
// beta == 0 never reads A). splits > 1: block z sums a contiguous range of rows and stores the
// upper-triangle part of its tile into workspace[z]; then reduce_splits_kernel<true> adds the
// partials in a fixed order and mirrors them. No atomics: bitwise reproducible for a given
// `splits`, and A is exactly symmetric.
// Input fp32 / bf16 / fp16 (converted on load), accumulation and A in fp32.
// Assumptions: x is C-contiguous (n, C, H, W); n OH OW < 2^31; d < 2^31 / 64 tiles;
// pointers are device pointers of the current device; A does not alias x, w or workspace.
#include "conv_factor_accumulate.h"
#include "fast_divmod.cuh"
#include "gemm_tile.cuh"
#include "sym_mma_tile.cuh"
#include "warp_mma.cuh"

#include <type_traits>

namespace kfac {
namespace {

using tile::BM;
using tile::BN;
using tile::TM;
using tile::TN;

struct Geom {
    int channels, height, width;
    int kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
    int out_w;
    int positions;  // out_h * out_w
    int d_real;     // channels * kernel_h * kernel_w (columns before the bias column)
};

// Element (row r, column p) of the implicit im2col matrix with the bias column.
template <typename T>
__device__ __forceinline__ float patch_value(const T* __restrict__ x, const Geom& g, int r, int p) {
    if (p >= g.d_real) return 1.f;  // the homogeneous column (only exists when bias)
    const int i = r / g.positions;
    const int t = r - i * g.positions;
    const int oh = t / g.out_w;
    const int ow = t - oh * g.out_w;
    const int khw = g.kernel_h * g.kernel_w;
    const int c = p / khw;
    const int rem = p - c * khw;
    const int ki = rem / g.kernel_w;
    const int kj = rem - ki * g.kernel_w;
    const int y = oh * g.stride_h - g.pad_h + ki * g.dilation_h;
    const int xx = ow * g.stride_w - g.pad_w + kj * g.dilation_w;
    if (y < 0 || y >= g.height || xx < 0 || xx >= g.width) return 0.f;
    const int64_t offset = ((static_cast<int64_t>(i) * g.channels + c) * g.height + y) * g.width + xx;
    return tile::to_float(x[offset]);
}

// A operand (d x rows): A(p, r) = X[r, p].
template <typename T>
struct PatchTransposed {
    const T* x;
    Geom g;
    __device__ __forceinline__ float operator()(int p, int r) const { return patch_value(x, g, r, p); }
};

// B operand (rows x d): B(r, q) = w_r X[r, q].
template <typename T>
struct WeightedPatch {
    const T* x;
    const float* w;  // nullptr: all ones
    Geom g;
    __device__ __forceinline__ float operator()(int r, int q) const {
        const float v = patch_value(x, g, r, q);
        return w == nullptr ? v : w[r] * v;
    }
};

template <typename T>
__global__ void __launch_bounds__(tile::THREADS) conv_factor_kernel(const T* __restrict__ x,
                                                                    const float* __restrict__ w, Geom g,
                                                                    int d, float* factor, float* out_ws,
                                                                    int rows, int chunk, float beta,
                                                                    float alpha) {
    if (blockIdx.y > blockIdx.x) return;  // below the diagonal: filled by mirroring (whole block exits)
    __shared__ tile::Smem s;
    const int m0 = blockIdx.y * BM;
    const int n0 = blockIdx.x * BN;
    const int64_t begin64 = static_cast<int64_t>(blockIdx.z) * chunk;
    const int k_begin = static_cast<int>(begin64 < rows ? begin64 : rows);
    const int k_end = static_cast<int>(begin64 + chunk < rows ? begin64 + chunk : rows);
    float acc[TM][TN];
    tile::zero(acc);
    // Both operands walk rows r (= k) fastest: consecutive r are consecutive ow.
    tile::mainloop<true, true>(acc, s, d, d, k_begin, k_end, m0, n0, PatchTransposed<T>{x, g},
                               WeightedPatch<T>{x, w, g});
    float* partial = out_ws == nullptr ? nullptr : out_ws + static_cast<int64_t>(blockIdx.z) * d * d;
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int r = tile::tile_row(m0, i);
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const int c = tile::tile_col(n0, j);
            if (r < d && c < d && r <= c) {  // upper triangle only; (c, r) is its mirror
                const int64_t e = static_cast<int64_t>(r) * d + c;
                if (partial != nullptr) {
                    partial[e] = acc[i][j];
                } else {
                    factor[e] = tile::ema(factor + e, beta, alpha, acc[i][j]);
                    if (r != c) {
                        const int64_t m = static_cast<int64_t>(c) * d + r;
                        factor[m] = tile::ema(factor + m, beta, alpha, acc[i][j]);
                    }
                }
            }
        }
    }
}


// ---- tensor-core path (sm_80+) ---------------------------------------------------------

using symtile::kTile;
constexpr int kTcThreads = symtile::kThreads;
constexpr int kTf32Rows = 16;  // rows per slab, 3xTF32 kernel (two k8 steps)
constexpr int kMmaRows = 32;   // rows per slab, bf16/fp16 kernel (two k16 steps)
constexpr int kSplitRows = 32; // split boundaries fall on multiples of both slabs

// Geometry of the tensor-core kernels, with the divisors as magic numbers (host-computed).
struct TcGeom {
    int height, width, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
    uint32_t plane;        // H * W
    uint32_t example;      // C * H * W; n C H W < 2^31 per launch on this path
    int d_real;            // C * kh * kw
    FastDivmod positions;  // r -> (i, oh * OW + ow)
    FastDivmod out_w;      // t -> (oh, ow)
    FastDivmod khw;        // p -> (c, ki * kw + kj)
    FastDivmod kernel_w;   // -> (ki, kj)
};

// One im2col column p of the block's tile, decoded once per block: the in-example offset of
// (c, ki dh, kj dw), the two kernel displacements, and the bits of the value when the bounds
// check fails (0; 1 for the bias column). Columns >= d_real never pass the bounds check
// (dy = 2^31 - 1 puts y = y0 + dy above H for every y0 in [-2^20, 2^30 + 2^20)).
struct alignas(16) Column {
    uint32_t off, dy, dx, konst;
};

__device__ __forceinline__ Column decode_column(const TcGeom& g, int p, int D, uint32_t one_bits) {
    Column col;
    if (p < g.d_real) {
        int c, rem, ki, kj;
        g.khw.divmod(p, c, rem);
        g.kernel_w.divmod(rem, ki, kj);
        col.dy = static_cast<uint32_t>(ki * g.dilation_h);  // <= H + 2 ph - 1 since OH >= 1
        col.dx = static_cast<uint32_t>(kj * g.dilation_w);
        col.off = static_cast<uint32_t>(c) * g.plane + col.dy * static_cast<uint32_t>(g.width) + col.dx;
        col.konst = 0;
    } else {
        col.off = 0;
        col.dy = 0x7fffffffu;
        col.dx = 0;
        col.konst = p < D ? one_bits : 0u;
    }
    return col;
}

// Value type a slab element is held in between load and store: fp32 for the 3xTF32 kernel,
// the raw 16-bit pattern for the bf16/fp16 kernel.
template <typename V, typename E>
__device__ __forceinline__ V load_element(const E* p) {
    if constexpr (std::is_same<V, float>::value) {
        return tile::to_float(*p);
    } else {
        return *p;
    }
}

template <typename V>
__device__ __forceinline__ V konst_value(uint32_t bits) {
    if constexpr (std::is_same<V, float>::value) {
        return __uint_as_float(bits);
    } else {
        return static_cast<V>(bits);
    }
}

// This thread's share of slab [r0, r0 + ROWS) (rows >= end read as 0): rows k = tid % 8 + 8 rr,
// columns c = tid / 8 + 16 l of both operands, into registers. Consecutive lanes walk
// consecutive rows (consecutive ow: coalesced for stride 1). Each row is decoded once here.
template <int ROWS, typename V, typename E>
__device__ __forceinline__ void load_slab(V (&vx)[ROWS / 8][4], V (&vy)[ROWS / 8][4], float (&wr)[ROWS / 8],
                                          const E* __restrict__ x, const float* __restrict__ w, const TcGeom& g,
                                          const Column* cols, int64_t r0, int end) {
    const int lane8 = threadIdx.x % 8, cg = threadIdx.x / 8;
#pragma unroll
    for (int rr = 0; rr < ROWS / 8; ++rr) {
        const int64_t r = r0 + lane8 + 8 * rr;
        const bool ok = r < end;
        const int row = ok ? static_cast<int>(r) : static_cast<int>(r0);  // a valid row to decode
        int i, t, oh, ow;
        g.positions.divmod(row, i, t);
        g.out_w.divmod(t, oh, ow);
        const uint32_t y0 = static_cast<uint32_t>(oh * g.stride_h - g.pad_h);
        const uint32_t x0 = static_cast<uint32_t>(ow * g.stride_w - g.pad_w);
        // offset of (i, 0, y0, x0) modulo 2^32: + a column's offset = the element's (< 2^31) when in bounds
        const uint32_t row_off = static_cast<uint32_t>(i) * g.example + y0 * static_cast<uint32_t>(g.width) + x0;
        const uint32_t hlim = ok ? static_cast<uint32_t>(g.height) : 0u;  // row past end: nothing passes
        const uint32_t mask = ok ? ~0u : 0u;
        const uint32_t wlim = static_cast<uint32_t>(g.width);
        wr[rr] = ok ? (w == nullptr ? 1.f : w[row]) : 0.f;
#pragma unroll
        for (int l = 0; l < 4; ++l) {
            const Column cx = cols[cg + 16 * l], cy = cols[kTile + cg + 16 * l];
            vx[rr][l] = (y0 + cx.dy < hlim && x0 + cx.dx < wlim) ? load_element<V>(x + (row_off + cx.off))
                                                                  : konst_value<V>(cx.konst & mask);
            vy[rr][l] = (y0 + cy.dy < hlim && x0 + cy.dx < wlim) ? load_element<V>(x + (row_off + cy.off))
                                                                  : konst_value<V>(cy.konst & mask);
        }
    }
}

// Column tables of tile (I, J): cols[0, 64) for the rows i0.. of A, cols[64, 128) for j0..
__device__ __forceinline__ void build_columns(Column* cols, const TcGeom& g, int i0, int j0, int D,
                                              uint32_t one_bits) {
    for (int c = threadIdx.x; c < 2 * kTile; c += blockDim.x)
        cols[c] = decode_column(g, c < kTile ? i0 + c : j0 + c - kTile, D, one_bits);
}

struct SplitRows {
    int begin, end;
    float* partial;  // nullptr: write A directly
};

__device__ __forceinline__ SplitRows split_rows(int rows, int64_t rows_per_split, float* workspace, int D) {
    const int64_t begin = static_cast<int64_t>(blockIdx.z) * rows_per_split;
    const int64_t end = begin + rows_per_split < rows ? begin + rows_per_split : rows;
    float* partial = workspace == nullptr ? nullptr : workspace + static_cast<int64_t>(blockIdx.z) * D * D;
    return SplitRows{static_cast<int>(begin < rows ? begin : rows), static_cast<int>(end), partial};
}

// 3xTF32: fp32 x, or weighted rows of any dtype; the slabs hold w_r P[r][i0 + i] and P[r][j0 + j]
// split into tf32 hi and lo parts once, when staged (warp::split_tf32).
template <typename T>
__global__ void __launch_bounds__(kTcThreads)
    conv_tf32_kernel(const T* __restrict__ x, const float* __restrict__ w, TcGeom g, int D, int tiles,
                     float* __restrict__ factor, float* __restrict__ workspace, int rows, int64_t rows_per_split,
                     float beta, float alpha) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    constexpr int ROWS = kTf32Rows, LDS = kTile + 8, LDC = kTile + 4;
    __shared__ __align__(16) uint32_t sXh[ROWS][LDS];  // tf32 hi / lo parts of w_r P[r][i0 + i]
    __shared__ __align__(16) uint32_t sXl[ROWS][LDS];
    __shared__ __align__(16) uint32_t sYh[ROWS][LDS];  // of P[r][j0 + j]
    __shared__ __align__(16) uint32_t sYl[ROWS][LDS];
    __shared__ __align__(16) float sC[kTile * LDC];
    __shared__ Column cols[2 * kTile];
    int I, J;
    symtile::tile_coords(blockIdx.x, tiles, I, J);
    const int i0 = I * kTile, j0 = J * kTile;
    const SplitRows part = split_rows(rows, rows_per_split, workspace, D);
    const int warp_id = threadIdx.x / 32, lane = threadIdx.x % 32, wm = warp_id / 2, wn = warp_id % 2;
    const int lane8 = threadIdx.x % 8, cg = threadIdx.x / 8;
    build_columns(cols, g, i0, j0, D, 0x3f800000u);  // 1.0f
    __syncthreads();

    float acc[2][4][4] = {};
    float vx[ROWS / 8][4], vy[ROWS / 8][4], wr[ROWS / 8];
    if (part.begin < part.end) load_slab<ROWS>(vx, vy, wr, x, w, g, cols, part.begin, part.end);
    for (int64_t r0 = part.begin; r0 < part.end; r0 += ROWS) {
#pragma unroll
        for (int rr = 0; rr < ROWS / 8; ++rr)
#pragma unroll
            for (int l = 0; l < 4; ++l) {
                const int k = lane8 + 8 * rr, c = cg + 16 * l;
                warp::split_tf32(vx[rr][l] * wr[rr], sXh[k][c], sXl[k][c]);
                warp::split_tf32(vy[rr][l], sYh[k][c], sYl[k][c]);
            }
        __syncthreads();
        if (r0 + ROWS < part.end) load_slab<ROWS>(vx, vy, wr, x, w, g, cols, r0 + ROWS, part.end);
        symtile::tf32_split_slab<ROWS, LDS>(acc, sXh, sXl, sYh, sYl, wm, wn, lane);
        __syncthreads();
    }
    symtile::write_fragments<LDC>(factor, part.partial, D, sC, acc, wm, wn, lane, i0, j0, alpha, beta);
#else
    __trap();  // the host never selects this path below sm_80
#endif
}

// Bit pattern of 1.0 in the 16-bit input type (the bias column).
template <typename T>
constexpr uint32_t kOneBits = std::is_same<T, __nv_bfloat16>::value ? 0x3F80u : 0x3C00u;

// Unweighted bf16/fp16 x: the raw 16-bit patterns are staged (sX[k][i] = P[r][i0 + i],
// sY[k][j] = P[r][j0 + j]) and multiplied exactly by mma.m16n8k16 with fp32 accumulation.
template <typename T>
__global__ void __launch_bounds__(kTcThreads)
    conv_mma_kernel(const T* __restrict__ x, TcGeom g, int D, int tiles, float* __restrict__ factor,
                    float* __restrict__ workspace, int rows, int64_t rows_per_split, float beta, float alpha) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    constexpr warp::Mma16 kType = std::is_same<T, __nv_bfloat16>::value ? warp::Mma16::BFloat16 : warp::Mma16::Float16;
    constexpr int ROWS = kMmaRows, LDS = kTile + 8, LDC = kTile + 4;
    __shared__ __align__(128) uint16_t sX[ROWS][LDS];
    __shared__ __align__(128) uint16_t sY[ROWS][LDS];
    __shared__ __align__(16) float sC[kTile * LDC];
    __shared__ Column cols[2 * kTile];
    int I, J;
    symtile::tile_coords(blockIdx.x, tiles, I, J);
    const int i0 = I * kTile, j0 = J * kTile;
    const SplitRows part = split_rows(rows, rows_per_split, workspace, D);
    const int warp_id = threadIdx.x / 32, lane = threadIdx.x % 32, wm = warp_id / 2, wn = warp_id % 2;
    const int lane8 = threadIdx.x % 8, cg = threadIdx.x / 8;
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(x);
    build_columns(cols, g, i0, j0, D, kOneBits<T>);
    __syncthreads();

    float acc[2][4][4] = {};
    uint16_t vx[ROWS / 8][4], vy[ROWS / 8][4];
    float wr[ROWS / 8];  // unused (no weights on this path)
    if (part.begin < part.end) load_slab<ROWS>(vx, vy, wr, bits, nullptr, g, cols, part.begin, part.end);
    for (int64_t r0 = part.begin; r0 < part.end; r0 += ROWS) {
#pragma unroll
        for (int rr = 0; rr < ROWS / 8; ++rr)
#pragma unroll
            for (int l = 0; l < 4; ++l) {
                sX[lane8 + 8 * rr][cg + 16 * l] = vx[rr][l];
                sY[lane8 + 8 * rr][cg + 16 * l] = vy[rr][l];
            }
        __syncthreads();
        if (r0 + ROWS < part.end) load_slab<ROWS>(vx, vy, wr, bits, nullptr, g, cols, r0 + ROWS, part.end);
        symtile::mma16_slab<kType, ROWS, LDS>(acc, sX, sY, wm, wn, lane);
        __syncthreads();
    }
    symtile::write_fragments<LDC>(factor, part.partial, D, sC, acc, wm, wn, lane, i0, j0, alpha, beta);
#else
    __trap();  // the host never selects this path below sm_80
#endif
}

TcGeom tc_geometry(const ConvGeometry& cg) {
    TcGeom g;
    g.height = cg.height;
    g.width = cg.width;
    g.stride_h = cg.stride_h;
    g.stride_w = cg.stride_w;
    g.pad_h = cg.pad_h;
    g.pad_w = cg.pad_w;
    g.dilation_h = cg.dilation_h;
    g.dilation_w = cg.dilation_w;
    g.plane = static_cast<uint32_t>(cg.height) * static_cast<uint32_t>(cg.width);
    g.example = static_cast<uint32_t>(cg.channels) * static_cast<uint32_t>(cg.height) * static_cast<uint32_t>(cg.width);
    g.d_real = cg.channels * cg.kernel_h * cg.kernel_w;
    g.positions = FastDivmod::make(cg.out_h * cg.out_w);
    g.out_w = FastDivmod::make(cg.out_w);
    g.khw = FastDivmod::make(cg.kernel_h * cg.kernel_w);
    g.kernel_w = FastDivmod::make(cg.kernel_w);
    return g;
}

template <typename T>
void launch_tc(const ConvFactorArgs& p, const TcGeom& g, int D, int tiles, dim3 grid, float* workspace, int rows,
               int64_t rows_per_split, cudaStream_t stream) {
    const T* x = static_cast<const T*>(p.x);
    if (std::is_same<T, float>::value || p.weights != nullptr) {
        conv_tf32_kernel<T><<<grid, kTcThreads, 0, stream>>>(x, p.weights, g, D, tiles, p.factor, workspace, rows,
                                                              rows_per_split, p.beta, p.alpha);
    } else if constexpr (!std::is_same<T, float>::value) {
        conv_mma_kernel<T><<<grid, kTcThreads, 0, stream>>>(x, g, D, tiles, p.factor, workspace, rows,
                                                             rows_per_split, p.beta, p.alpha);
    }
}

// One launch of the tensor-core path (n C H W < 2^31): grid (upper tiles, 1, used splits),
// rows cut at multiples of 32.
cudaError_t launch_tensor_cores_once(const ConvFactorArgs& p, cudaStream_t stream) {
    const TcGeom g = tc_geometry(p.geom);
    const int D = g.d_real + (p.bias ? 1 : 0);
    const int rows = p.geom.n * p.geom.out_h * p.geom.out_w;
    const int tiles = tile::ceil_div(D, kTile);
    const int64_t per_split = (static_cast<int64_t>(rows) + p.splits - 1) / p.splits;
    const int64_t rows_per_split = (per_split + kSplitRows - 1) / kSplitRows * kSplitRows;
    const int used_splits = rows == 0 ? 1 : static_cast<int>((rows + rows_per_split - 1) / rows_per_split);
    float* workspace = used_splits > 1 ? p.workspace : nullptr;
    const dim3 grid(tiles * (tiles + 1) / 2, 1, used_splits);
    switch (p.x_type) {
        case ConvInputType::Float32: launch_tc<float>(p, g, D, tiles, grid, workspace, rows, rows_per_split, stream); break;
        case ConvInputType::BFloat16:
            launch_tc<__nv_bfloat16>(p, g, D, tiles, grid, workspace, rows, rows_per_split, stream);
            break;
        case ConvInputType::Float16: launch_tc<__half>(p, g, D, tiles, grid, workspace, rows, rows_per_split, stream); break;
    }
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || workspace == nullptr) return err;
    const int64_t total = static_cast<int64_t>(D) * D;
    const int blocks = static_cast<int>(total / 256 + 1 < 4096 ? total / 256 + 1 : 4096);
    tile::reduce_splits_kernel<true><<<blocks, 256, 0, stream>>>(p.factor, workspace, D, D, used_splits, p.beta,
                                                                  p.alpha);
    return cudaGetLastError();
}

// The tensor-core path for C H W <= chunk_elements: the examples in chunks of at most
// chunk_elements (< 2^31) elements of x, so that the kernels address x with 32-bit offsets; the
// first chunk with beta, the others adding to it (beta = 1) in stream order. One chunk, hence
// one launch, unless x has 2^31 elements or more.
cudaError_t launch_tensor_cores(const ConvFactorArgs& p, int64_t example, cudaStream_t stream) {
    const int64_t per_chunk = p.chunk_elements / example > 1 ? p.chunk_elements / example : 1;
    const size_t elt = p.x_type == ConvInputType::Float32 ? 4 : 2;
    const int64_t positions = static_cast<int64_t>(p.geom.out_h) * p.geom.out_w;
    ConvFactorArgs chunk = p;
    for (int64_t first = 0; first == 0 || first < p.geom.n; first += per_chunk) {
        chunk.geom.n = static_cast<int>(p.geom.n - first < per_chunk ? p.geom.n - first : per_chunk);
        chunk.x = static_cast<const char*>(p.x) + static_cast<size_t>(first) * example * elt;
        chunk.weights = p.weights == nullptr ? nullptr : p.weights + first * positions;
        chunk.beta = first == 0 ? p.beta : 1.f;
        const cudaError_t err = launch_tensor_cores_once(chunk, stream);
        if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
}

}  // namespace

int conv_factor_tiles(int d) {
    const int t = tile::ceil_div(d, BM);
    return t * (t + 1) / 2;
}

int64_t conv_factor_workspace_floats(int d, int splits) {
    return splits > 1 ? static_cast<int64_t>(splits) * d * d : 0;
}

cudaError_t conv_factor_launch(const ConvFactorArgs& p, cudaStream_t stream) {
    const ConvGeometry& cg = p.geom;
    if (p.splits < 1 || (p.splits > 1 && p.workspace == nullptr)) return cudaErrorInvalidValue;
    const int64_t example = static_cast<int64_t>(cg.channels) * cg.height * cg.width;
    if (p.chunk_elements < 1 || p.chunk_elements >= (int64_t(1) << 31)) return cudaErrorInvalidValue;
    if (p.tensor_cores && example <= p.chunk_elements) return launch_tensor_cores(p, example, stream);
    Geom g;
    g.channels = cg.channels;
    g.height = cg.height;
    g.width = cg.width;
    g.kernel_h = cg.kernel_h;
    g.kernel_w = cg.kernel_w;
    g.stride_h = cg.stride_h;
    g.stride_w = cg.stride_w;
    g.pad_h = cg.pad_h;
    g.pad_w = cg.pad_w;
    g.dilation_h = cg.dilation_h;
    g.dilation_w = cg.dilation_w;
    g.out_w = cg.out_w;
    g.positions = cg.out_h * cg.out_w;
    g.d_real = cg.channels * cg.kernel_h * cg.kernel_w;
    const int d = g.d_real + (p.bias ? 1 : 0);
    const int rows = cg.n * g.positions;
    const int chunk = tile::ceil_div(rows > 0 ? rows : 1, p.splits);
    float* out_ws = p.splits > 1 ? p.workspace : nullptr;
    const dim3 grid(tile::ceil_div(d, BN), tile::ceil_div(d, BM), p.splits);
    switch (p.x_type) {
        case ConvInputType::Float32:
            conv_factor_kernel<float><<<grid, tile::THREADS, 0, stream>>>(
                static_cast<const float*>(p.x), p.weights, g, d, p.factor, out_ws, rows, chunk, p.beta, p.alpha);
            break;
        case ConvInputType::BFloat16:
            conv_factor_kernel<__nv_bfloat16><<<grid, tile::THREADS, 0, stream>>>(
                static_cast<const __nv_bfloat16*>(p.x), p.weights, g, d, p.factor, out_ws, rows, chunk, p.beta,
                p.alpha);
            break;
        case ConvInputType::Float16:
            conv_factor_kernel<__half><<<grid, tile::THREADS, 0, stream>>>(
                static_cast<const __half*>(p.x), p.weights, g, d, p.factor, out_ws, rows, chunk, p.beta, p.alpha);
            break;
    }
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || p.splits == 1) return err;
    const int64_t total = static_cast<int64_t>(d) * d;
    const int blocks = static_cast<int>(total / 256 + 1 < 4096 ? total / 256 + 1 : 4096);
    tile::reduce_splits_kernel<true><<<blocks, 256, 0, stream>>>(p.factor, p.workspace, d, d, p.splits, p.beta,
                                                                  p.alpha);
    return cudaGetLastError();
}

}  // namespace kfac
