// Python binding of the factor-accumulation kernels (csrc/factor_accumulate.cu): validation
// through the DLPack intake layer, then the launch on the caller's stream. Allocates nothing.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#include <string>

#include "cuda_check.h"
#include "device_guard.h"
#include "factor_accumulate.h"
#include "op_checks.h"
#include "ops_registry.h"
#include "tensor_intake.h"

namespace py = pybind11;

namespace kfac {
namespace {

constexpr int64_t kMaxRows = (int64_t(1) << 31) - (int64_t(1) << 16);  // row-slab arithmetic stays in int
constexpr int64_t kMaxFactor = int64_t(1) << 20;

void factor_accumulate(py::object A_obj, py::object a_obj, py::object w_obj, bool bias, py::object ws_obj,
                       int64_t splits, double beta, double alpha, std::uintptr_t stream_handle) {
  CudaTensor A = take_cuda_tensor(A_obj, {"A", {DType::Float32}, 2, true}, stream_handle);
  CudaTensor a = take_cuda_tensor(a_obj, {"a", kFloatingTypes, 2, false, A.device()}, stream_handle);
  const std::optional<CudaTensor> w =
      take_optional_cuda_tensor(w_obj, {"weights", {DType::Float32}, 1, false, A.device()}, stream_handle);
  std::optional<CudaTensor> ws =
      take_optional_cuda_tensor(ws_obj, {"workspace", {DType::Float32}, 1, true, A.device()}, stream_handle);
  const int64_t n = a.size(0), d = a.size(1), D = d + (bias ? 1 : 0);
  require_shape(A.size(0) == D && A.size(1) == D, "A",
                "expected shape (" + std::to_string(D) + ", " + std::to_string(D) + ") for a of shape " +
                    shape_string(a) + (bias ? " with bias" : " without bias") + ", got " + shape_string(A));
  require_shape(!w || w->size(0) == n, "weights",
                "expected shape (" + std::to_string(n) + ",) to match a's rows, got " + (w ? shape_string(*w) : ""));
  require_shape(n < kMaxRows && D < kMaxFactor, "a", "too large: shape " + shape_string(a));
  require_shape(splits >= 1 && splits <= 65535, "splits", "expected 1 <= splits <= 65535, got " + std::to_string(splits));
  const int64_t need = factor_accumulate_workspace_floats(int(D), int(splits));
  if (need > 0) {
    require_shape(ws.has_value(), "workspace", "is required when splits > 1");
    require_workspace(*ws, need);
    require_disjoint(*ws, "workspace", A, "A");
    require_disjoint(*ws, "workspace", a, "a");
    if (w) require_disjoint(*ws, "workspace", *w, "weights");
  }
  require_disjoint(A, "A", a, "a");
  if (w) require_disjoint(A, "A", *w, "weights");
  if (D == 0) return;

  DeviceGuard guard(A.device());
  int major = 0;
  KFAC_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, A.device()));
  FactorArgs args;
  args.factor = A.data_as<float>();
  args.a = a.data();
  args.a_type = a.dtype() == DType::Float32    ? FactorInputType::Float32
                : a.dtype() == DType::BFloat16 ? FactorInputType::BFloat16
                                               : FactorInputType::Float16;
  args.weights = w ? w->data_as<float>() : nullptr;
  args.workspace = need > 0 ? ws->data_as<float>() : nullptr;
  args.n = int(n);
  args.d = int(d);
  args.bias = bias;
  args.tensor_cores = major >= 8;
  args.splits = int(splits);
  args.beta = float(beta);
  args.alpha = float(alpha);
  KFAC_CUDA_CHECK(factor_accumulate_launch(args, reinterpret_cast<cudaStream_t>(stream_handle)));
}

}  // namespace

void register_factor_accumulate(py::module_& m) {
  m.def("factor_accumulate", &factor_accumulate, py::arg("A"), py::arg("a"), py::arg("weights"), py::arg("bias"),
        py::arg("workspace"), py::arg("splits"), py::arg("beta"), py::arg("alpha"), py::arg("stream"),
        "A <- beta*A + alpha * abar^T diag(weights) abar in place on `stream` (a cudaStream_t as int);\n"
        "abar = [a | 1] when bias. A: (d+bias, d+bias) float32; a: (n, d) float32/bfloat16/float16;\n"
        "weights: None or (n,) float32; all C-contiguous on one CUDA device. splits >= 1 cuts the rows;\n"
        "workspace: None for splits == 1, else 1-D float32 of factor_accumulate_workspace_size(D, splits).\n"
        "Deterministic; A exactly symmetric; allocates nothing.");
  m.def("factor_accumulate_workspace_size",
        [](int64_t D, int64_t splits) {
          require_shape(D >= 0 && D < kMaxFactor && splits >= 1, "D, splits", "out of range");
          return factor_accumulate_workspace_floats(int(D), int(splits));
        },
        py::arg("D"), py::arg("splits"), "float32 elements of workspace (0 when splits == 1).");
  m.def("factor_accumulate_tiles",
        [](int64_t D) {
          require_shape(D >= 0 && D < kMaxFactor, "D", "out of range");
          return factor_accumulate_tiles(int(D));
        },
        py::arg("D"), "Number of 64 x 64 tiles on or above the diagonal (thread blocks per split).");
}

}  // namespace kfac
