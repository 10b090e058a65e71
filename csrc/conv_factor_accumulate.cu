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
// but X is never built: the tile loaders gather each patch element from x on the fly
// (implicit im2col into shared memory). Memory: reads x (each element about kh kw times,
// mostly from L1/L2), writes d^2 floats; the reference's im2col buffer of
// n OH OW C kh kw elements is not allocated. Compute: n OH OW d^2 multiply-adds, of which
// only the tiles on or above the diagonal are computed (A is symmetric; about half).
//
// Launch: 256 threads, grid (ceil(d/64), ceil(d/64), splits); blocks below the diagonal
// exit at once. splits == 1: each block writes its tile and the mirrored tile of A
// (EMA applied, beta == 0 never reads A). splits > 1: block z sums a contiguous range of
// rows and stores the upper-triangle part of its tile into workspace[z]; then
// reduce_splits_kernel<true> adds the partials in a fixed order and mirrors them. No
// atomics: bitwise reproducible for a given `splits`, and A is exactly symmetric.
// Input fp32 / bf16 / fp16 (converted on load), accumulation and A in fp32.
// Assumptions: x is C-contiguous (n, C, H, W); n OH OW < 2^31; d < 2^31 / 64 tiles;
// pointers are device pointers of the current device; A does not alias x, w or workspace.
// Not optimised: each gathered element decodes its (row, column) indices with integer
// divisions (no shared-memory index tables, no vector loads).
#include "conv_factor_accumulate.h"
#include "gemm_tile.cuh"

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
