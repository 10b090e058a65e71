// Python bindings of the EKFAC / TEKFAC scale kernels (csrc/scale_accumulate.cu): validation
// through the DLPack intake layer, then the launch on the caller's stream. Allocates nothing.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#include <string>

#include "cuda_check.h"
#include "device_guard.h"
#include "op_checks.h"
#include "ops_registry.h"
#include "scale_accumulate.h"
#include "tensor_intake.h"

namespace py = pybind11;

namespace kfac {
namespace {

constexpr int64_t kMaxDim = int64_t(65535) * 64;  // grid.y <= 65535 tiles of 64 rows
constexpr int64_t kMaxRows = (int64_t(1) << 31) - 1;

// Rows: gt (n, d_out), at (n, d_in). Shared: gt (n, K, d_out), at (n, K, d_in). Broadcast (the
// rotate order): gt (n, K, d_out), at (K, d_in) for every example. S (d_out, d_in) in all three.
enum class Form { Rows, Shared, Broadcast };

void scale_common(py::object S_obj, py::object gt_obj, py::object at_obj, py::object ws_obj, Form form,
                  int64_t splits, double beta, double alpha, std::uintptr_t st) {
    const int ndim = form == Form::Rows ? 2 : 3;
    CudaTensor S = take_cuda_tensor(S_obj, {"S", {DType::Float32}, 2, true}, st);
    const int dev = S.device();
    CudaTensor gt = take_cuda_tensor(gt_obj, {"gt", {DType::Float32}, ndim, false, dev}, st);
    CudaTensor at = take_cuda_tensor(at_obj, {"at", {DType::Float32}, form == Form::Broadcast ? 2 : ndim, false, dev}, st);
    std::optional<CudaTensor> ws =
        take_optional_cuda_tensor(ws_obj, {"workspace", {DType::Float32}, 1, true, dev}, st);
    const int64_t d_out = S.size(0);
    const int64_t d_in = S.size(1);
    require_shape(d_out >= 1 && d_in >= 1 && d_out < kMaxDim && d_in < kMaxDim, "S",
                  "expected 1 <= dimensions < " + std::to_string(kMaxDim) + ", got " + shape_string(S));
    const int64_t n = gt.size(0);
    const int64_t positions = ndim == 3 ? gt.size(1) : 0;
    require_shape(gt.size(ndim - 1) == d_out, "gt",
                  "last dimension must be S.shape[0] = " + std::to_string(d_out) + ", got " + shape_string(gt));
    require_shape(at.size(at.ndim() - 1) == d_in, "at",
                  "last dimension must be S.shape[1] = " + std::to_string(d_in) + ", got " + shape_string(at));
    if (form == Form::Broadcast) {
        require_shape(at.size(0) == positions, "at",
                      "must have gt.shape[1] = " + std::to_string(positions) + " rows, got " + shape_string(at));
    } else {
        require_shape(at.size(0) == n && (ndim == 2 || at.size(1) == positions), "at",
                      "leading dimensions must match gt " + shape_string(gt) + ", got " + shape_string(at));
    }
    require_shape(positions <= kMaxRows && n * (ndim == 3 ? positions : 1) <= kMaxRows, "gt",
                  "too many rows: " + shape_string(gt));
    require_shape(splits >= 1 && splits <= 65535, "splits", "expected 1 <= splits <= 65535, got " + std::to_string(splits));
    const int64_t need = scale_accumulate_workspace_floats(int(d_out), int(d_in), int(splits));
    if (need > 0) {
        require_shape(ws.has_value(), "workspace", "is required when splits > 1");
        require_workspace(*ws, need);
        require_disjoint(*ws, "workspace", S, "S");
        require_disjoint(*ws, "workspace", gt, "gt");
        require_disjoint(*ws, "workspace", at, "at");
    }
    require_disjoint(S, "S", gt, "gt");
    require_disjoint(S, "S", at, "at");

    ScaleArgs args;
    args.gt = gt.data_as<float>();
    args.at = at.data_as<float>();
    args.scale = S.data_as<float>();
    args.workspace = need > 0 ? ws->data_as<float>() : nullptr;
    // Weight sharing with T = 0 positions: every per-example sum is empty, so S <- beta*S + 0;
    // the launcher's `shared` flag keeps that from being read as n rows of an empty tensor.
    args.n = int(n);
    args.positions = int(positions);
    args.shared = ndim == 3;
    args.at_broadcast = form == Form::Broadcast;
    args.d_out = int(d_out);
    args.d_in = int(d_in);
    args.splits = int(splits);
    args.beta = float(beta);
    args.alpha = float(alpha);
    DeviceGuard guard(dev);
    int major = 0;
    KFAC_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    args.tensor_cores = major >= 8;
    KFAC_CUDA_CHECK(scale_accumulate_launch(args, reinterpret_cast<cudaStream_t>(st)));
}

}  // namespace

void register_scale_accumulate(py::module_& m) {
    m.def("scale_accumulate",
          [](py::object S, py::object gt, py::object at, py::object workspace, int64_t splits, double beta,
             double alpha, std::uintptr_t stream) {
              scale_common(S, gt, at, workspace, Form::Rows, splits, beta, alpha, stream);
          },
          py::arg("S"), py::arg("gt"), py::arg("at"), py::arg("workspace"), py::arg("splits"), py::arg("beta"),
          py::arg("alpha"), py::arg("stream"),
          "S <- beta*S + alpha * (gt o gt)^T (at o at) in place on `stream` (int handle).\n"
          "gt = g QG: (n, d_out), at = abar QA: (n, d_in), S: (d_out, d_in), all float32 C-contiguous.\n"
          "splits >= 1 cuts the n rows; workspace: None for splits == 1, else 1-D float32 of\n"
          "scale_accumulate_workspace_size(d_out, d_in, splits). Deterministic; allocates nothing.");
    m.def("scale_accumulate_shared",
          [](py::object S, py::object gt, py::object at, py::object workspace, int64_t splits, double beta,
             double alpha, std::uintptr_t stream) {
              scale_common(S, gt, at, workspace, Form::Shared, splits, beta, alpha, stream);
          },
          py::arg("S"), py::arg("gt"), py::arg("at"), py::arg("workspace"), py::arg("splits"), py::arg("beta"),
          py::arg("alpha"), py::arg("stream"),
          "Weight sharing: S <- beta*S + alpha * sum_i (gt_i^T at_i)^2 in place on `stream`, with\n"
          "gt = g QG: (n, T, d_out), at = abar QA: (n, T, d_in); the per-example products are never stored.\n"
          "splits >= 1 cuts the n examples; workspace as for scale_accumulate.");
    m.def("scale_accumulate_broadcast",
          [](py::object S, py::object gt, py::object at, py::object workspace, int64_t splits, double beta,
             double alpha, std::uintptr_t stream) {
              scale_common(S, gt, at, workspace, Form::Broadcast, splits, beta, alpha, stream);
          },
          py::arg("S"), py::arg("gt"), py::arg("at"), py::arg("workspace"), py::arg("splits"), py::arg("beta"),
          py::arg("alpha"), py::arg("stream"),
          "S <- beta*S + alpha * sum_i (gt_i^T at)^2 in place on `stream`: gt (n, K, d_out), one at (K, d_in)\n"
          "for every example. The rotate order of weight sharing: gt_i = dW_i^T QG, at = QA, K = d_in.\n"
          "splits >= 1 cuts the n examples; workspace as for scale_accumulate.");
    m.def("scale_accumulate_workspace_size",
          [](int64_t d_out, int64_t d_in, int64_t splits) {
              require_shape(d_out >= 1 && d_in >= 1 && d_out < kMaxDim && d_in < kMaxDim && splits >= 1,
                            "d_out, d_in, splits", "out of range");
              return scale_accumulate_workspace_floats(int(d_out), int(d_in), int(splits));
          },
          py::arg("d_out"), py::arg("d_in"), py::arg("splits"),
          "float32 elements of workspace the scale kernels need (0 when splits == 1).");
    m.def("scale_accumulate_tiles",
          [](int64_t d_out, int64_t d_in) {
              require_shape(d_out >= 1 && d_in >= 1 && d_out < kMaxDim && d_in < kMaxDim, "d_out, d_in",
                            "expected 1 <= d_out, d_in < " + std::to_string(kMaxDim) + ", got " +
                                std::to_string(d_out) + ", " + std::to_string(d_in));
              return scale_accumulate_tiles(int(d_out), int(d_in));
          },
          py::arg("d_out"), py::arg("d_in"), "Number of 64 x 64 tiles (thread blocks per split).");
}

}  // namespace kfac
