// Python binding of the Conv2d activation-factor kernel (csrc/conv_factor_accumulate.cu):
// validation through the DLPack intake layer, then the launch on the caller's stream.
// Allocates nothing.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>

#include "conv_factor_accumulate.h"
#include "cuda_check.h"
#include "device_guard.h"
#include "op_checks.h"
#include "ops_registry.h"
#include "tensor_intake.h"

namespace py = pybind11;

namespace kfac {
namespace {

constexpr int64_t kMaxFactor = int64_t(65535) * 64;  // grid.y <= 65535 tiles of 64
constexpr int64_t kMaxRows = (int64_t(1) << 31) - 1;

using Pair = std::array<int64_t, 2>;

void require_pair(const Pair& p, const char* name, int64_t lowest) {
    require_shape(p[0] >= lowest && p[1] >= lowest && p[0] < (int64_t(1) << 20) && p[1] < (int64_t(1) << 20), name,
                  "expected two integers >= " + std::to_string(lowest) + ", got (" + std::to_string(p[0]) + ", " +
                      std::to_string(p[1]) + ")");
}

void conv_factor_accumulate(py::object A_obj, py::object x_obj, py::object w_obj, Pair kernel_size, Pair stride,
                            Pair padding, Pair dilation, bool bias, py::object ws_obj, int64_t splits, double beta,
                            double alpha, std::uintptr_t st) {
    CudaTensor A = take_cuda_tensor(A_obj, {"A", {DType::Float32}, 2, true}, st);
    const int dev = A.device();
    CudaTensor x = take_cuda_tensor(x_obj, {"x", kFloatingTypes, 4, false, dev}, st);
    std::optional<CudaTensor> w = take_optional_cuda_tensor(w_obj, {"weights", {DType::Float32}, 2, false, dev}, st);
    std::optional<CudaTensor> ws = take_optional_cuda_tensor(ws_obj, {"workspace", {DType::Float32}, 1, true, dev}, st);
    require_pair(kernel_size, "kernel_size", 1);
    require_pair(stride, "stride", 1);
    require_pair(padding, "padding", 0);
    require_pair(dilation, "dilation", 1);
    const int64_t n = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
    require_shape(n < kMaxRows && C < kMaxRows && H < (int64_t(1) << 30) && W < (int64_t(1) << 30), "x",
                  "too large: " + shape_string(x));
    const int oh = conv_output_size(int(H), int(kernel_size[0]), int(stride[0]), int(padding[0]), int(dilation[0]));
    const int ow = conv_output_size(int(W), int(kernel_size[1]), int(stride[1]), int(padding[1]), int(dilation[1]));
    require_shape(oh >= 1 && ow >= 1, "x",
                  "input " + shape_string(x) + " is smaller than the (dilated) kernel after padding");
    const int64_t d = C * kernel_size[0] * kernel_size[1] + (bias ? 1 : 0);
    require_shape(d >= 1 && d < kMaxFactor, "x", "factor dimension C*kh*kw+bias out of range for " + shape_string(x));
    require_matrix(A, "A", d, d);
    const int64_t positions = int64_t(oh) * ow;
    require_shape(n * positions <= kMaxRows, "x", "too many patch rows (n * positions) for " + shape_string(x));
    if (w) require_matrix(*w, "weights", n, positions);
    require_shape(splits >= 1 && splits <= 65535, "splits", "expected 1 <= splits <= 65535, got " + std::to_string(splits));
    const int64_t need = conv_factor_workspace_floats(int(d), int(splits));
    if (need > 0) {
        require_shape(ws.has_value(), "workspace", "is required when splits > 1");
        require_workspace(*ws, need);
        require_disjoint(*ws, "workspace", A, "A");
        require_disjoint(*ws, "workspace", x, "x");
        if (w) require_disjoint(*ws, "workspace", *w, "weights");
    }
    require_disjoint(A, "A", x, "x");
    if (w) require_disjoint(A, "A", *w, "weights");

    ConvFactorArgs args;
    args.x = x.data();
    args.x_type = x.dtype() == DType::Float32    ? ConvInputType::Float32
                  : x.dtype() == DType::BFloat16 ? ConvInputType::BFloat16
                                                 : ConvInputType::Float16;
    args.weights = w ? w->data_as<float>() : nullptr;
    args.factor = A.data_as<float>();
    args.workspace = need > 0 ? ws->data_as<float>() : nullptr;
    args.geom = ConvGeometry{int(n),          int(C),          int(H),           int(W),
                             int(kernel_size[0]), int(kernel_size[1]), int(stride[0]), int(stride[1]),
                             int(padding[0]), int(padding[1]), int(dilation[0]), int(dilation[1]),
                             oh,              ow};
    args.bias = bias;
    args.splits = int(splits);
    int major = 0;
    KFAC_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    args.tensor_cores = major >= 8;
    args.beta = float(beta);
    args.alpha = float(alpha);
    DeviceGuard guard(dev);
    KFAC_CUDA_CHECK(conv_factor_launch(args, reinterpret_cast<cudaStream_t>(st)));
}

}  // namespace

void register_conv_factor_accumulate(py::module_& m) {
    m.def("conv_factor_accumulate", &conv_factor_accumulate, py::arg("A"), py::arg("x"), py::arg("weights"),
          py::arg("kernel_size"), py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("bias"),
          py::arg("workspace"), py::arg("splits"), py::arg("beta"), py::arg("alpha"), py::arg("stream"),
          "A <- beta*A + alpha * sum_{i,t} w_it abar_it abar_it^T over the im2col patches of x, in place on\n"
          "`stream` (int handle), without an im2col buffer. A: (C*kh*kw+bias)^2 float32; x: (n, C, H, W)\n"
          "float32/bfloat16/float16; weights: None or (n, OH*OW) float32; geometry as (h, w) pairs;\n"
          "splits >= 1 cuts the rows; workspace: None for splits == 1, else 1-D float32 of\n"
          "conv_factor_workspace_size(d, splits). Deterministic; A exactly symmetric; allocates nothing.");
    m.def("conv_factor_workspace_size",
          [](int64_t d, int64_t splits) {
              require_shape(d >= 1 && d < kMaxFactor && splits >= 1, "d, splits", "out of range");
              return conv_factor_workspace_floats(int(d), int(splits));
          },
          py::arg("d"), py::arg("splits"), "float32 elements of workspace (0 when splits == 1).");
    m.def("conv_factor_tiles",
          [](int64_t d) {
              require_shape(d >= 1 && d < kMaxFactor, "d", "out of range");
              return conv_factor_tiles(int(d));
          },
          py::arg("d"), "Number of 64 x 64 tiles on or above the diagonal (thread blocks per split).");
}

}  // namespace kfac
