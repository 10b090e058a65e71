// Basis rotation with per-element scaling and the KL-clipping dot product, one layer:
//
//     U   = Q_G [ (Q_G^T V Q_A) / (S + damping) ] Q_A^T        (d_out x d_in, fp32)
//     dot = <U, V> = sum_ij U_ij V_ij                          (fp32 scalar, on device)
//
// V (d_out x d_in, fp32 or bf16, row-major contiguous) is the gradient with the bias as
// its last column; Q_G (d_out x d_out) and Q_A (d_in x d_in) are fp32 row-major; S is
// either stored (d_out x d_in fp32: EKFAC / TEKFAC) or formed on the fly as
// eig_g[i] * eig_a[j] (K-FAC / TKFAC; no d_out x d_in buffer is read).
//
// Four tiled GEMMs on the caller's stream, with one d_out x d_in fp32 workspace W and the
// output U doubling as the second intermediate:
//   1. W = Q_G^T V                       (K = d_out; V converted to fp32 on load)
//   2. U = (W Q_A) / (S + damping)        (K = d_in; the division is the epilogue)
//   3. W = Q_G U                         (K = d_out)
//   4. U = W Q_A^T, partial[block] = sum over the tile of U o V   (K = d_in; epilogue)
//   5. dot = sum(partial)                (one block; fixed order, double accumulation)
// The dot is a DETERMINISTIC two-stage reduction (no atomics): the same inputs give the
// same bits on every run and under CUDA-graph replay.
// Cost: 2 d_out d_in (d_out + d_in) multiply-adds; memory traffic per GEMM about
// d_out d_in (d_out + d_in) / 16 floats through L2 (64 x 64 tiles), plus 4 d_out d_in
// writes. Workspace: d_out d_in + ceil(d_out/64) ceil(d_in/64) floats. Allocates nothing.
// Launch: 256-thread blocks, grid (ceil(d_in/64), ceil(d_out/64)) per GEMM; 8.3 KiB smem.
// Assumptions: d_out, d_in >= 1 and < 2^31 / 64 blocks (grid.y <= 65535 -> d_out <= 4M);
// all pointers are device pointers of the current device; U and W do not alias inputs.
#include "gemm_tile.cuh"
#include "precondition.h"

namespace kfac {
namespace {

using tile::BM;
using tile::BN;
using tile::TM;
using tile::TN;

// Epilogue: C[r, c] = acc.
struct StorePlain {
    float* c;
    int64_t ld;
    __device__ __forceinline__ void operator()(const float (&acc)[TM][TN], int M, int N, int m0, int n0) const {
#pragma unroll
        for (int i = 0; i < TM; ++i) {
            const int r = tile::tile_row(m0, i);
#pragma unroll
            for (int j = 0; j < TN; ++j) {
                const int col = tile::tile_col(n0, j);
                if (r < M && col < N) c[r * ld + col] = acc[i][j];
            }
        }
    }
};

// Epilogue: C[r, c] = acc / (S[r, c] + damping), S stored (s != nullptr) or
// eig_g[r] * eig_a[c].
struct StoreScaled {
    float* c;
    int64_t ld;
    const float* s;
    const float* eig_g;
    const float* eig_a;
    float damping;
    __device__ __forceinline__ void operator()(const float (&acc)[TM][TN], int M, int N, int m0, int n0) const {
#pragma unroll
        for (int i = 0; i < TM; ++i) {
            const int r = tile::tile_row(m0, i);
#pragma unroll
            for (int j = 0; j < TN; ++j) {
                const int col = tile::tile_col(n0, j);
                if (r < M && col < N) {
                    const float sc = s != nullptr ? s[r * ld + col] : eig_g[r] * eig_a[col];
                    c[r * ld + col] = acc[i][j] / (sc + damping);
                }
            }
        }
    }
};

// Epilogue: C[r, c] = acc, and partial[block] = sum over the tile of acc * V[r, c]
// (block tree reduction in shared memory; every thread of the block must call it).
template <typename TV>
struct StoreDot {
    float* c;
    int64_t ld;
    const TV* v;
    float* partial;
    __device__ __forceinline__ void operator()(const float (&acc)[TM][TN], int M, int N, int m0, int n0) const {
        __shared__ float red[tile::THREADS];
        float local = 0.f;
#pragma unroll
        for (int i = 0; i < TM; ++i) {
            const int r = tile::tile_row(m0, i);
#pragma unroll
            for (int j = 0; j < TN; ++j) {
                const int col = tile::tile_col(n0, j);
                if (r < M && col < N) {
                    c[r * ld + col] = acc[i][j];
                    local = fmaf(acc[i][j], tile::to_float(v[r * ld + col]), local);
                }
            }
        }
        const int tid = threadIdx.x;
        red[tid] = local;
        __syncthreads();
        for (int stride = tile::THREADS / 2; stride > 0; stride >>= 1) {
            if (tid < stride) red[tid] += red[tid + stride];
            __syncthreads();
        }
        if (tid == 0) partial[blockIdx.y * gridDim.x + blockIdx.x] = red[0];
    }
};

// C (M x N) = A (M x K) B (K x N) through loaders, then the epilogue. Grid (ceil(N/64),
// ceil(M/64)), 256 threads. No early exit: every thread reaches every __syncthreads.
template <bool AKF, bool BKF, class LA, class LB, class Epi>
__global__ void __launch_bounds__(tile::THREADS) gemm_kernel(int M, int N, int K, LA la, LB lb, Epi epi) {
    __shared__ tile::Smem s;
    const int m0 = blockIdx.y * BM;
    const int n0 = blockIdx.x * BN;
    float acc[TM][TN];
    tile::zero(acc);
    tile::mainloop<AKF, BKF>(acc, s, M, N, 0, K, m0, n0, la, lb);
    epi(acc, M, N, m0, n0);
}

// dot[0] = sum of count partials, one block of 256 threads, double accumulation in a fixed
// order (thread-strided, then a shared-memory tree).
__global__ void __launch_bounds__(256) sum_partials_kernel(const float* __restrict__ partial, int count,
                                                           float* __restrict__ dot) {
    __shared__ double red[256];
    double local = 0.0;
    for (int e = threadIdx.x; e < count; e += 256) local += static_cast<double>(partial[e]);
    red[threadIdx.x] = local;
    __syncthreads();
    for (int stride = 128; stride > 0; stride >>= 1) {
        if (static_cast<int>(threadIdx.x) < stride) red[threadIdx.x] += red[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) dot[0] = static_cast<float>(red[0]);
}

template <bool AKF, bool BKF, class LA, class LB, class Epi>
cudaError_t launch_gemm(int M, int N, int K, const LA& la, const LB& lb, const Epi& epi, cudaStream_t stream) {
    const dim3 grid(tile::ceil_div(N, BN), tile::ceil_div(M, BM));
    gemm_kernel<AKF, BKF, LA, LB, Epi><<<grid, tile::THREADS, 0, stream>>>(M, N, K, la, lb, epi);
    return cudaGetLastError();
}

template <typename TV>
cudaError_t precondition_impl(const PreconditionArgs& p, cudaStream_t stream) {
    const int m = p.d_out;
    const int n = p.d_in;
    const TV* V = static_cast<const TV*>(p.grad);
    float* W = p.workspace;
    float* partial = p.workspace + static_cast<int64_t>(m) * n;
    cudaError_t err;
    // 1. W = Q_G^T V: A(r, k) = Q_G[k, r] (contiguous along r), B(k, c) = V[k, c].
    err = launch_gemm<false, false>(m, n, m, tile::Transposed<float>{p.qg, m}, tile::RowMajor<TV>{V, n},
                                    StorePlain{W, n}, stream);
    if (err != cudaSuccess) return err;
    // 2. U = (W Q_A) / (S + damping).
    err = launch_gemm<true, false>(m, n, n, tile::RowMajor<float>{W, n}, tile::RowMajor<float>{p.qa, n},
                                   StoreScaled{p.out, n, p.scale, p.eig_g, p.eig_a, p.damping}, stream);
    if (err != cudaSuccess) return err;
    // 3. W = Q_G U.
    err = launch_gemm<true, false>(m, n, m, tile::RowMajor<float>{p.qg, m}, tile::RowMajor<float>{p.out, n},
                                   StorePlain{W, n}, stream);
    if (err != cudaSuccess) return err;
    // 4. U = W Q_A^T: B(k, c) = Q_A[c, k] (contiguous along k); dot partials per block.
    err = launch_gemm<true, true>(m, n, n, tile::RowMajor<float>{W, n}, tile::Transposed<float>{p.qa, n},
                                  StoreDot<TV>{p.out, n, V, partial}, stream);
    if (err != cudaSuccess) return err;
    // 5. dot = sum of the partials.
    sum_partials_kernel<<<1, 256, 0, stream>>>(partial, precondition_partials(m, n), p.dot);
    return cudaGetLastError();
}

}  // namespace

int precondition_partials(int d_out, int d_in) {
    return tile::ceil_div(d_out, BM) * tile::ceil_div(d_in, BN);
}

int64_t precondition_workspace_floats(int d_out, int d_in) {
    return static_cast<int64_t>(d_out) * d_in + precondition_partials(d_out, d_in);
}

cudaError_t precondition_launch(const PreconditionArgs& args, cudaStream_t stream) {
    return args.grad_is_bf16 ? precondition_impl<__nv_bfloat16>(args, stream)
                             : precondition_impl<float>(args, stream);
}

}  // namespace kfac
