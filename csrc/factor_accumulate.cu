// Kronecker-factor accumulation  A <- beta*A + alpha * abar^T diag(w) abar.
//
// a: (n, d) fp32/bf16/fp16 rows, abar = [a | 1] when bias (D = d + 1; the homogeneous column is
// produced on load, never stored), w: optional (n,) fp32, A: (D, D) fp32, fp32 accumulation.
// Cost: n*D*(D+1)/2 multiply-adds (upper-triangle tiles only, mirrored), reads
// n*d*elt*~(D/64) bytes of a (L2-resident re-reads) + D^2*4 of A (none when beta == 0),
// writes D^2*4. With beta == 0 A is never read (NaN/Inf in it do not propagate, as in addmm).
//
// Each block owns one 64x64 output tile (I, J), I <= J, loops over rows in slabs staged in
// shared memory, then writes the tile and its transpose (coalesced through shared memory),
// only elements with row <= col, so A is exactly symmetric.
// Paths: fp32/weighted inputs use a SIMT kernel (4x4 outputs per thread, fp32 FMA);
// unweighted bf16/fp16 on sm_80+ use tensor cores (WMMA 16x16x16, fp32 accumulate: bf16 and
// fp16 products are exact in fp32, so this loses nothing against the fp32 reference).
// A TF32 tensor-core path for fp32 inputs is not used: it would round the inputs to 10-bit
// mantissas, which the fp32 reference does not do.
// When there are too few tiles to fill the GPU (small D, large n) the rows are split over
// gridDim.z blocks that atomically add into A after a separate A <- beta*A pass (the result is
// then not bitwise deterministic, but still exactly symmetric up to atomic ordering).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>

#include "cuda_check.h"
#include "device_guard.h"
#include "ops_registry.h"
#include "tensor_intake.h"

namespace py = pybind11;

namespace kfac {
namespace {

constexpr int kTile = 64;          // output tile edge
constexpr int kSimtRows = 16;      // rows per shared-memory slab, SIMT path
constexpr int kSimtThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each
constexpr int kMmaRows = 32;       // rows per slab, tensor-core path
constexpr int kMmaThreads = 128;   // 4 warps, 32 x 32 outputs each
constexpr int kMinRowsPerSplit = 256;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// abar[row][col] as float: a's entry, the implicit 1 at col == d (bias), 0 past D.
template <typename T>
__device__ __forceinline__ float abar_at(const T* a, int64_t row, int col, int d, int D) {
  if (col < d) return to_float(a[row * d + col]);
  return col < D ? 1.0f : 0.0f;
}

// Upper-triangle tile t (row-major over I <= J) of a T x T tile grid.
__device__ __forceinline__ void tile_coords(int t, int tiles, int& I, int& J) {
  I = 0;
  while (t >= tiles - I) {
    t -= tiles - I;
    ++I;
  }
  J = I + t;
}

__device__ __forceinline__ void store(float* dst, float v, float alpha, float beta, bool atomic) {
  if (atomic) {
    atomicAdd(dst, alpha * v);
  } else {
    *dst = beta == 0.0f ? alpha * v : fmaf(beta, *dst, alpha * v);
  }
}

// Writes the tile C[i0.., j0..] held in sC (row-major, leading dim LDC) to A and its transpose
// to A[j0.., i0..], keeping only elements with global row <= col; both writes coalesced.
template <int LDC>
__device__ void write_tile(float* A, int D, const float* sC, int i0, int j0, float alpha, float beta,
                           bool atomic) {
  for (int idx = threadIdx.x; idx < kTile * kTile; idx += blockDim.x) {
    const int r = idx / kTile, c = idx % kTile;
    const int gi = i0 + r, gj = j0 + c;  // C[gi][gj] = sC[r][c]
    if (gi < D && gj < D && gi <= gj) store(&A[int64_t(gi) * D + gj], sC[r * LDC + c], alpha, beta, atomic);
    const int ti = i0 + c, tj = j0 + r;  // C[ti][tj] = sC[c][r] goes to A[tj][ti]
    if (ti < D && tj < D && ti < tj) store(&A[int64_t(tj) * D + ti], sC[c * LDC + r], alpha, beta, atomic);
  }
}

// SIMT path: any input dtype, optional row weights.
template <typename T>
__global__ void __launch_bounds__(kSimtThreads)
    factor_simt_kernel(float* __restrict__ A, const T* __restrict__ a, const float* __restrict__ w,
                       int n, int d, int D, int tiles, int rows_per_split, float alpha, float beta,
                       bool atomic) {
  __shared__ __align__(16) float sX[kSimtRows][kTile];  // weighted columns of tile row I
  __shared__ __align__(16) float sY[kSimtRows][kTile];  // columns of tile column J
  __shared__ float sC[kTile * (kTile + 1)];
  int I, J;
  tile_coords(blockIdx.x, tiles, I, J);
  const int i0 = I * kTile, j0 = J * kTile;
  const int row_begin = blockIdx.z * rows_per_split;
  const int row_end = min(n, row_begin + rows_per_split);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;

  float acc[4][4] = {};
  for (int r0 = row_begin; r0 < row_end; r0 += kSimtRows) {
    for (int idx = threadIdx.x; idx < kSimtRows * kTile; idx += kSimtThreads) {
      const int k = idx / kTile, c = idx % kTile;
      const int row = r0 + k;
      float x = 0.0f, y = 0.0f;
      if (row < row_end) {
        x = abar_at(a, row, i0 + c, d, D);
        if (w != nullptr) x *= w[row];
        y = abar_at(a, row, j0 + c, d, D);
      }
      sX[k][c] = x;
      sY[k][c] = y;
    }
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
  write_tile<kTile + 1>(A, D, sC, i0, j0, alpha, beta, atomic);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// abar[row][col] in the input's own 16-bit type (exact: 0 and 1 are representable).
template <typename T>
__device__ __forceinline__ T abar_raw(const T* a, int64_t row, int col, int d, int D) {
  return col < d ? a[row * d + col] : from_float<T>(col < D ? 1.0f : 0.0f);
}

// Tensor-core path: bf16/fp16 inputs, no weights, sm_80+. Warp (wm, wn) owns the 32x32
// sub-tile [wm*32, wn*32] as 2x2 WMMA accumulators.
template <typename T>
__global__ void __launch_bounds__(kMmaThreads)
    factor_mma_kernel(float* __restrict__ A, const T* __restrict__ a, int n, int d, int D, int tiles,
                      int rows_per_split, float alpha, float beta, bool atomic) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  constexpr int LDS = kTile + 8;   // 16-bit elements; multiple of 8 as WMMA requires
  constexpr int LDC = kTile + 4;   // floats; multiple of 4
  __shared__ __align__(128) T sX[kMmaRows][LDS];  // sX[k][i] = abar[r0 + k][i0 + i]
  __shared__ __align__(128) T sY[kMmaRows][LDS];
  __shared__ __align__(128) float sC[kTile * LDC];
  int I, J;
  tile_coords(blockIdx.x, tiles, I, J);
  const int i0 = I * kTile, j0 = J * kTile;
  const int row_begin = blockIdx.z * rows_per_split;
  const int row_end = min(n, row_begin + rows_per_split);
  const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int q = 0; q < 2; ++q) wmma::fill_fragment(acc[m][q], 0.0f);

  const T zero = from_float<T>(0.0f);
  for (int r0 = row_begin; r0 < row_end; r0 += kMmaRows) {
    for (int idx = threadIdx.x; idx < kMmaRows * kTile; idx += kMmaThreads) {
      const int k = idx / kTile, c = idx % kTile;
      const int row = r0 + k;
      const bool in = row < row_end;
      sX[k][c] = in ? abar_raw(a, row, i0 + c, d, D) : zero;
      sY[k][c] = in ? abar_raw(a, row, j0 + c, d, D) : zero;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kMmaRows; k += 16) {
      // (abar^T)[i][k] = sX[k][i]: column-major with leading dimension LDS.
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
      for (int m = 0; m < 2; ++m) wmma::load_matrix_sync(fa[m], &sX[k][wm * 32 + m * 16], LDS);
#pragma unroll
      for (int q = 0; q < 2; ++q) wmma::load_matrix_sync(fb[q], &sY[k][wn * 32 + q * 16], LDS);
#pragma unroll
      for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int q = 0; q < 2; ++q) wmma::mma_sync(acc[m][q], fa[m], fb[q], acc[m][q]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int q = 0; q < 2; ++q)
      wmma::store_matrix_sync(&sC[(wm * 32 + m * 16) * LDC + wn * 32 + q * 16], acc[m][q], LDC,
                              wmma::mem_row_major);
  __syncthreads();
  write_tile<LDC>(A, D, sC, i0, j0, alpha, beta, atomic);
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

void launch_scale(float* A, int64_t count, float beta, cudaStream_t stream, int sms) {
  if (beta == 1.0f || count == 0) return;
  const int blocks = int(std::min<int64_t>((count + 255) / 256, int64_t(sms) * 8));
  scale_kernel<<<blocks, 256, 0, stream>>>(A, count, beta);
  KFAC_CUDA_CHECK_LAUNCH("scale_kernel");
}

template <typename T>
void launch(float* A, const void* a, const float* w, int n, int d, int D, float alpha, float beta,
            bool tensor_cores, cudaStream_t stream, int sms) {
  const int tiles = (D + kTile - 1) / kTile;
  const int blocks = tiles * (tiles + 1) / 2;
  // Split rows across gridDim.z when the tiles alone leave SMs idle (aim: ~2 blocks per SM).
  const int want = (2 * sms + blocks - 1) / blocks;
  const int max_splits = std::max(1, n / kMinRowsPerSplit);
  const int splits = std::min({want, max_splits, 65535});
  const int rows_per_split = splits == 1 ? n : ((n + splits - 1) / splits + kMmaRows - 1) / kMmaRows * kMmaRows;
  const int used_splits = (n + rows_per_split - 1) / rows_per_split;
  const bool atomic = used_splits > 1;
  if (atomic) launch_scale(A, int64_t(D) * D, beta, stream, sms);
  const dim3 grid(blocks, 1, used_splits);
  if constexpr (std::is_same_v<T, float>) {
    tensor_cores = false;
  } else if (tensor_cores) {
    factor_mma_kernel<T><<<grid, kMmaThreads, 0, stream>>>(A, static_cast<const T*>(a), n, d, D, tiles,
                                                           rows_per_split, alpha, beta, atomic);
    KFAC_CUDA_CHECK_LAUNCH("factor_mma_kernel");
    return;
  }
  factor_simt_kernel<T><<<grid, kSimtThreads, 0, stream>>>(A, static_cast<const T*>(a), w, n, d, D, tiles,
                                                           rows_per_split, alpha, beta, atomic);
  KFAC_CUDA_CHECK_LAUNCH("factor_simt_kernel");
}

void factor_accumulate(py::object A_obj, py::object a_obj, py::object w_obj, bool bias, double beta,
                       double alpha, std::uintptr_t stream_handle) {
  CudaTensor A = take_cuda_tensor(A_obj, {"A", {DType::Float32}, 2, true}, stream_handle);
  CudaTensor a = take_cuda_tensor(a_obj, {"a", kFloatingTypes, 2, false, A.device()}, stream_handle);
  const std::optional<CudaTensor> w =
      take_optional_cuda_tensor(w_obj, {"weights", {DType::Float32}, 1, false, A.device()}, stream_handle);
  const int64_t n = a.size(0), d = a.size(1), D = d + (bias ? 1 : 0);
  require_shape(A.size(0) == D && A.size(1) == D, "A",
                "expected shape (" + std::to_string(D) + ", " + std::to_string(D) + ") for a of shape " +
                    shape_string(a) + (bias ? " with bias" : " without bias") + ", got " + shape_string(A));
  require_shape(!w || w->size(0) == n, "weights",
                "expected shape (" + std::to_string(n) + ",) to match a's rows, got " + (w ? shape_string(*w) : ""));
  require_shape(n < (int64_t(1) << 31) && D < (int64_t(1) << 20), "a", "too large: shape " + shape_string(a));
  if (D == 0) return;

  DeviceGuard guard(A.device());
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  int sms = 0, major = 0;
  KFAC_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, A.device()));
  KFAC_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, A.device()));
  float* A_ptr = A.data_as<float>();
  if (n == 0) {  // abar^T abar = 0
    launch_scale(A_ptr, D * D, float(beta), stream, sms);
    return;
  }
  const float* w_ptr = w ? w->data_as<float>() : nullptr;
  const bool tensor_cores = w_ptr == nullptr && major >= 8;
  const auto args = std::make_tuple(A_ptr, a.data(), w_ptr, int(n), int(d), int(D), float(alpha), float(beta),
                                    tensor_cores, stream, sms);
  switch (a.dtype()) {
    case DType::Float32: std::apply(launch<float>, args); break;
    case DType::BFloat16: std::apply(launch<__nv_bfloat16>, args); break;
    case DType::Float16: std::apply(launch<__half>, args); break;
  }
}

}  // namespace

void register_factor_accumulate(py::module_& m) {
  m.def("factor_accumulate", &factor_accumulate, py::arg("A"), py::arg("a"), py::arg("weights"),
        py::arg("bias"), py::arg("beta"), py::arg("alpha"), py::arg("stream"),
        "A <- beta*A + alpha * abar^T diag(weights) abar in place on `stream` (a cudaStream_t as int);\n"
        "abar = [a | 1] when bias. A: (d+bias, d+bias) float32; a: (n, d) float32/bfloat16/float16;\n"
        "weights: None or (n,) float32; all C-contiguous on one CUDA device. Allocates nothing.");
}

}  // namespace kfac
