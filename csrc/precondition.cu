// Basis rotation with per-element scaling and the KL-clipping dot product, one layer:
//
//     U   = Q_G M Q_A^T,  M = V' / (S + damping),  V' = Q_G^T V Q_A     (d_out x d_in, fp32)
//     dot = <U, V> = <M, V'> = sum_ij M_ij V'_ij                       (fp32 scalar, on device)
//
// V (d_out x d_in, fp32 or bf16, row-major contiguous) is the gradient with the bias as
// its last column; Q_G (d_out x d_out) and Q_A (d_in x d_in) are fp32 row-major; S is
// either stored (d_out x d_in fp32: EKFAC / TEKFAC) or formed on the fly as
// eig_g[i] * eig_a[j] (K-FAC / TKFAC; no d_out x d_in buffer is read).
// <U, V> = tr(Q_A M^T Q_G^T V) = <M, Q_G^T V Q_A> holds for any Q_G, Q_A (adjointness, no
// orthogonality needed), so the dot is fused into the epilogue that forms M and V is read once.
//
// Four 3xTF32 tensor-core GEMMs (csrc/tf32_gemm.cuh: fp32 accuracy, sm_80+) on the caller's
// stream, with one d_out x d_in fp32 workspace W and the output U doubling as the second
// intermediate:
//   1. W = Q_G^T V                                   (K = d_out; V converted to fp32 on load)
//   2. U = M = (W Q_A) / (S + damping), partial[block] = sum over the tile of M o (W Q_A)
//   3. W = Q_G U                                     (K = d_out)
//   4. U = W Q_A^T                                   (K = d_in)
//   5. dot = sum(partial)                            (one block; fixed order, double accumulation)
// Split-K: when a GEMM's 128 x 64 tiles are too few to fill 132 SMs twice or spread unevenly
// over them (plan_gemm), its K range is cut into `splits` parts (chosen from the shape alone,
// so the result does not depend on the device);
// block z writes its raw partial tile into the workspace and split_epilogue_kernel sums the
// partials in a fixed order and applies the epilogue. No atomics anywhere: the same inputs give
// the same bits on every run and under CUDA-graph replay.
// Cost: 2 d_out d_in (d_out + d_in) multiply-adds, each as three tf32 mma products; traffic
// per GEMM about d_out d_in K (1/128 + 1/64) floats through L2, plus 4 d_out d_in writes (and
// 2 splits d_out d_in for a split GEMM). Workspace: precondition_workspace_floats(). Allocates
// nothing. Launch: 128-thread blocks, grid (ceil(d_in/64), ceil(d_out/128), splits) per GEMM,
// 14-19 KiB static shared memory, 168 registers (3 blocks per SM). Below sm_80 there is no
// kernel (the binding refuses: the default build targets sm_80 and sm_90 only).
// Assumptions: d_out, d_in >= 1, ceil(d_out/128) <= 65535 (grid.y), d_out * d_in * splits < 2^63;
// all pointers are device pointers of the current device; U and W do not alias inputs.
#include "precondition.h"

#include <algorithm>

#include "tf32_gemm.cuh"

namespace kfac {
namespace {

constexpr int kSms = 132;           // an H100 SXM: the split plan assumes it (shape-only, so the
constexpr int kTargetBlocks = 264;  // result never depends on the device); 2 blocks per SM
constexpr double kBalance = 0.9;
constexpr int kMinSplitK = 64;      // at least 4 K-slices per split
constexpr int kMaxSplits = 16;
constexpr int kReduceThreads = 256;
constexpr int kMaxReduceBlocks = 1024;

// Epilogue: C[r, c] = v.
struct StorePlain {
    static constexpr bool kDot = false;
    float* c;
    int64_t ld;
    __device__ __forceinline__ float operator()(int r, int col, float v) const {
        c[r * ld + col] = v;
        return 0.f;
    }
};

// Epilogue of a split GEMM: block z's raw partial into slice z of the workspace.
struct StoreSplit {
    static constexpr bool kDot = false;
    float* ws;
    int64_t ld;
    int64_t slice;
    __device__ __forceinline__ float operator()(int r, int col, float v) const {
        ws[blockIdx.z * slice + r * ld + col] = v;
        return 0.f;
    }
};

// Epilogue: C[r, c] = m = v / (S[r, c] + damping) with S stored (s != nullptr) or
// eig_g[r] * eig_a[c]; returns m * v, this element's share of the dot <M, V'>.
struct StoreScaled {
    static constexpr bool kDot = true;
    float* c;
    int64_t ld;
    const float* s;
    const float* eig_g;
    const float* eig_a;
    float damping;
    __device__ __forceinline__ float operator()(int r, int col, float v) const {
        const float sc = s != nullptr ? s[r * ld + col] : eig_g[r] * eig_a[col];
        const float m = v / (sc + damping);
        c[r * ld + col] = m;
        return m * v;
    }
};

// Sum of `v` over the block's THREADS threads, in a fixed order (shared-memory tree); the
// result is valid in thread 0. Every thread calls it.
template <int THREADS>
__device__ __forceinline__ float block_sum(float v, float* red) {
    const int tid = threadIdx.x;
    red[tid] = v;
    __syncthreads();
    for (int stride = THREADS / 2; stride > 0; stride >>= 1) {
        if (tid < stride) red[tid] += red[tid + stride];
        __syncthreads();
    }
    return red[0];
}

// C (M x N) = A (M x K) B (K x N) on tensor cores (3xTF32), then the epilogue on every element;
// with Epi::kDot, partial[tile] = the sum of what the epilogue returns over the tile.
// Grid (ceil(N/64), ceil(M/128), splits); block z covers K range [z k_chunk, (z+1) k_chunk).
// No early exit: every thread reaches every __syncthreads.
template <bool AKF, bool BKF, class LA, class LB, class Epi>
__global__ void __launch_bounds__(tc::THREADS, 3) tf32_gemm_kernel(int M, int N, int K, int k_chunk, LA la, LB lb,
                                                                Epi epi, float* __restrict__ partial) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    __shared__ tc::Smem<AKF, BKF> s;
    const int m0 = blockIdx.y * tc::BM;
    const int n0 = blockIdx.x * tc::BN;
    const int k_begin = blockIdx.z * k_chunk;
    const int k_end = min(K, k_begin + k_chunk);
    float acc[tc::MT][tc::NT][4];
    tc::mainloop<AKF, BKF>(acc, s, M, N, k_begin, k_end, m0, n0, la, lb);
    float local = 0.f;
#pragma unroll
    for (int i = 0; i < tc::MT; ++i)
#pragma unroll
        for (int j = 0; j < tc::NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = tc::acc_row(m0, i, e), c = tc::acc_col(n0, j, e);
                if (r < M && c < N) local += epi(r, c, acc[i][j][e]);
            }
    if constexpr (Epi::kDot) {
        __shared__ float red[tc::THREADS];
        const float sum = block_sum<tc::THREADS>(local, red);
        if (threadIdx.x == 0) partial[blockIdx.y * gridDim.x + blockIdx.x] = sum;
    }
#else
    __trap();  // the binding never launches below sm_80
#endif
}

// Split-K reduction: v = sum_{z < splits} ws[z][r][c] in a fixed order, then the epilogue;
// with Epi::kDot, partial[block] = the block's sum of what the epilogue returns. Grid-stride
// over M * N elements with a grid fixed by the shape (reduce_blocks).
template <class Epi>
__global__ void __launch_bounds__(kReduceThreads) split_epilogue_kernel(const float* __restrict__ ws, int M, int N,
                                                                        int splits, Epi epi,
                                                                        float* __restrict__ partial) {
    const int64_t total = static_cast<int64_t>(M) * N;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    float local = 0.f;
    for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
        float v = 0.f;
        for (int z = 0; z < splits; ++z) v += ws[z * total + e];
        local += epi(static_cast<int>(e / N), static_cast<int>(e % N), v);
    }
    if constexpr (Epi::kDot) {
        __shared__ float red[kReduceThreads];
        const float sum = block_sum<kReduceThreads>(local, red);
        if (threadIdx.x == 0) partial[blockIdx.x] = sum;
    }
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

int reduce_blocks(int M, int N) {
    const int64_t blocks = (static_cast<int64_t>(M) * N + kReduceThreads - 1) / kReduceThreads;
    return static_cast<int>(blocks < kMaxReduceBlocks ? blocks : kMaxReduceBlocks);
}

// Launch shape of one GEMM C (M x N) with reduction length K.
struct GemmPlan {
    dim3 grid;    // (tiles along N, tiles along M, splits)
    int k_chunk;  // K elements per split, a multiple of tc::BK
    int splits;
    int tiles() const { return static_cast<int>(grid.x * grid.y); }
};

// Splits: the smallest count whose blocks both fill the GPU (>= kTargetBlocks) and spread
// evenly over kSms SMs (the busiest SM runs ceil(blocks / kSms): at least kBalance of it busy on
// average), else the best such score; at most kMaxSplits, at least kMinSplitK of K per split.
GemmPlan plan_gemm(int M, int N, int K) {
    const int tiles_n = tile::ceil_div(N, tc::BN), tiles_m = tile::ceil_div(M, tc::BM);
    const int64_t tiles = static_cast<int64_t>(tiles_n) * tiles_m;
    const int most = std::min(kMaxSplits, std::max(1, K / kMinSplitK));
    int splits = 1;
    double best = -1.0;
    for (int s = 1; s <= most; ++s) {
        const int64_t blocks = tiles * s;
        const double balance = static_cast<double>(blocks) / (((blocks + kSms - 1) / kSms) * kSms);
        const double score = std::min(1.0, static_cast<double>(blocks) / kTargetBlocks) * balance;
        if (score > best) {
            best = score;
            splits = s;
        }
        if (score >= kBalance) break;
    }
    const int k_chunk = tile::ceil_div(tile::ceil_div(K, splits), tc::BK) * tc::BK;
    splits = tile::ceil_div(K, k_chunk);
    return GemmPlan{dim3(tiles_n, tiles_m, splits), k_chunk, splits};
}

// Workspace layout: [W: M*N | dot partials: precondition_partials | split partials].
int64_t split_floats(int M, int N) {
    int64_t most = 0;
    for (int K : {M, N}) {
        const GemmPlan p = plan_gemm(M, N, K);
        if (p.splits > 1) most = std::max(most, static_cast<int64_t>(p.splits) * M * N);
    }
    return most;
}

template <bool AKF, bool BKF, class LA, class LB, class Epi>
cudaError_t launch_gemm(int M, int N, int K, const LA& la, const LB& lb, const Epi& epi, float* partial,
                        float* split_ws, cudaStream_t stream) {
    const GemmPlan p = plan_gemm(M, N, K);
    if (p.splits == 1) {
        tf32_gemm_kernel<AKF, BKF, LA, LB, Epi><<<p.grid, tc::THREADS, 0, stream>>>(M, N, K, p.k_chunk, la, lb, epi,
                                                                                   partial);
        return cudaGetLastError();
    }
    const int64_t slice = static_cast<int64_t>(M) * N;
    tf32_gemm_kernel<AKF, BKF, LA, LB, StoreSplit><<<p.grid, tc::THREADS, 0, stream>>>(
        M, N, K, p.k_chunk, la, lb, StoreSplit{split_ws, N, slice}, nullptr);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    split_epilogue_kernel<Epi><<<reduce_blocks(M, N), kReduceThreads, 0, stream>>>(split_ws, M, N, p.splits, epi,
                                                                                   partial);
    return cudaGetLastError();
}

template <typename TV>
cudaError_t precondition_impl(const PreconditionArgs& p, cudaStream_t stream) {
    const int m = p.d_out;
    const int n = p.d_in;
    const TV* V = static_cast<const TV*>(p.grad);
    float* W = p.workspace;
    float* partial = W + static_cast<int64_t>(m) * n;
    float* split_ws = partial + precondition_partials(m, n);
    cudaError_t err;
    // 1. W = Q_G^T V: A(r, k) = Q_G[k, r] (contiguous along r), B(k, c) = V[k, c].
    err = launch_gemm<false, false>(m, n, m, tile::Transposed<float>{p.qg, m}, tile::RowMajor<TV>{V, n},
                                    StorePlain{W, n}, nullptr, split_ws, stream);
    if (err != cudaSuccess) return err;
    // 2. U = M = (W Q_A) / (S + damping); dot partials <M, W Q_A> per block.
    err = launch_gemm<true, false>(m, n, n, tile::RowMajor<float>{W, n}, tile::RowMajor<float>{p.qa, n},
                                   StoreScaled{p.out, n, p.scale, p.eig_g, p.eig_a, p.damping}, partial, split_ws,
                                   stream);
    if (err != cudaSuccess) return err;
    // 3. W = Q_G U.
    err = launch_gemm<true, false>(m, n, m, tile::RowMajor<float>{p.qg, m}, tile::RowMajor<float>{p.out, n},
                                   StorePlain{W, n}, nullptr, split_ws, stream);
    if (err != cudaSuccess) return err;
    // 4. U = W Q_A^T: B(k, c) = Q_A[c, k] (contiguous along k).
    err = launch_gemm<true, true>(m, n, n, tile::RowMajor<float>{W, n}, tile::Transposed<float>{p.qa, n},
                                  StorePlain{p.out, n}, nullptr, split_ws, stream);
    if (err != cudaSuccess) return err;
    // 5. dot = sum of GEMM 2's partials.
    const GemmPlan second = plan_gemm(m, n, n);
    const int count = second.splits > 1 ? reduce_blocks(m, n) : second.tiles();
    sum_partials_kernel<<<1, 256, 0, stream>>>(partial, count, p.dot);
    return cudaGetLastError();
}

}  // namespace

int precondition_partials(int d_out, int d_in) {
    return std::max(plan_gemm(d_out, d_in, d_in).tiles(), reduce_blocks(d_out, d_in));
}

int64_t precondition_workspace_floats(int d_out, int d_in) {
    return static_cast<int64_t>(d_out) * d_in + precondition_partials(d_out, d_in) + split_floats(d_out, d_in);
}

cudaError_t precondition_launch(const PreconditionArgs& args, cudaStream_t stream) {
    return args.grad_is_bf16 ? precondition_impl<__nv_bfloat16>(args, stream)
                             : precondition_impl<float>(args, stream);
}

}  // namespace kfac
