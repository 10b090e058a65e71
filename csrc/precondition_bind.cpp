// Python binding of the precondition kernel (csrc/precondition.cu): validation through the
// DLPack intake layer, then one launch sequence on the caller's stream. Allocates nothing.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

#include "cuda_check.h"
#include "device_guard.h"
#include "op_checks.h"
#include "ops_registry.h"
#include "precondition.h"
#include "tensor_intake.h"

namespace py = pybind11;

namespace kfac {
namespace {

constexpr int64_t kMaxDim = int64_t(65535) * 64;  // grid.y <= 65535 tiles of 64 rows

void precondition(py::object grad_obj, py::object qg_obj, py::object qa_obj, py::object scale_obj,
                  py::object eig_g_obj, py::object eig_a_obj, double damping, py::object out_obj,
                  py::object dot_obj, py::object ws_obj, std::uintptr_t stream_handle) {
    const std::uintptr_t st = stream_handle;
    CudaTensor grad = take_cuda_tensor(grad_obj, {"grad", {DType::Float32, DType::BFloat16}, 2}, st);
    const int dev = grad.device();
    CudaTensor qg = take_cuda_tensor(qg_obj, {"QG", {DType::Float32}, 2, false, dev}, st);
    CudaTensor qa = take_cuda_tensor(qa_obj, {"QA", {DType::Float32}, 2, false, dev}, st);
    std::optional<CudaTensor> scale = take_optional_cuda_tensor(scale_obj, {"scale", {DType::Float32}, 2, false, dev}, st);
    std::optional<CudaTensor> eig_g = take_optional_cuda_tensor(eig_g_obj, {"eig_g", {DType::Float32}, 1, false, dev}, st);
    std::optional<CudaTensor> eig_a = take_optional_cuda_tensor(eig_a_obj, {"eig_a", {DType::Float32}, 1, false, dev}, st);
    CudaTensor out = take_cuda_tensor(out_obj, {"out", {DType::Float32}, 2, true, dev}, st);
    CudaTensor dot = take_cuda_tensor(dot_obj, {"dot", {DType::Float32}, 0, true, dev}, st);
    CudaTensor ws = take_cuda_tensor(ws_obj, {"workspace", {DType::Float32}, 1, true, dev}, st);

    const int64_t d_out = grad.size(0);
    const int64_t d_in = grad.size(1);
    require_shape(d_out >= 1 && d_in >= 1 && d_out < kMaxDim && d_in < kMaxDim, "grad",
                  "expected 1 <= dimensions < " + std::to_string(kMaxDim) + ", got " + shape_string(grad));
    require_matrix(qg, "QG", d_out, d_out);
    require_matrix(qa, "QA", d_in, d_in);
    require_shape(scale.has_value() != (eig_g.has_value() && eig_a.has_value()) &&
                      (eig_g.has_value() == eig_a.has_value()),
                  "scale", "pass either scale, or both eig_g and eig_a");
    if (scale) require_matrix(*scale, "scale", d_out, d_in);
    if (eig_g) require_vector(*eig_g, "eig_g", d_out);
    if (eig_a) require_vector(*eig_a, "eig_a", d_in);
    require_matrix(out, "out", d_out, d_in);
    require_workspace(ws, precondition_workspace_floats(int(d_out), int(d_in)));
    for (const CudaTensor* in : {&grad, &qg, &qa}) require_disjoint(out, "out", *in, "an input");
    if (scale) require_disjoint(out, "out", *scale, "scale");
    require_disjoint(ws, "workspace", out, "out");
    for (const CudaTensor* in : {&grad, &qg, &qa}) require_disjoint(ws, "workspace", *in, "an input");
    if (scale) require_disjoint(ws, "workspace", *scale, "scale");
    require_disjoint(dot, "dot", out, "out");
    require_disjoint(dot, "dot", ws, "workspace");

    PreconditionArgs args;
    args.grad = grad.data();
    args.grad_is_bf16 = grad.dtype() == DType::BFloat16;
    args.qg = qg.data_as<float>();
    args.qa = qa.data_as<float>();
    args.scale = scale ? scale->data_as<float>() : nullptr;
    args.eig_g = eig_g ? eig_g->data_as<float>() : nullptr;
    args.eig_a = eig_a ? eig_a->data_as<float>() : nullptr;
    args.damping = float(damping);
    args.out = out.data_as<float>();
    args.dot = dot.data_as<float>();
    args.workspace = ws.data_as<float>();
    args.d_out = int(d_out);
    args.d_in = int(d_in);
    DeviceGuard guard(dev);
    int major = 0;
    KFAC_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    if (major < 8)  // the kernel is 3xTF32 mma.sync only (csrc/precondition.cu)
        throw std::runtime_error("precondition: the CUDA kernel needs tensor cores (compute capability 8.0+), device " +
                                 std::to_string(dev) + " has " + std::to_string(major) + ".x; use backend='torch'");
    KFAC_CUDA_CHECK(precondition_launch(args, reinterpret_cast<cudaStream_t>(stream_handle)));
}

}  // namespace

void register_precondition(py::module_& m) {
    m.def("precondition", &precondition, py::arg("grad"), py::arg("QG"), py::arg("QA"), py::arg("scale"),
          py::arg("eig_g"), py::arg("eig_a"), py::arg("damping"), py::arg("out"), py::arg("dot"),
          py::arg("workspace"), py::arg("stream"),
          "out = QG [(QG^T grad QA) / (S + damping)] QA^T and dot = <out, grad> on `stream` (int handle).\n"
          "grad: (d_out, d_in) float32/bfloat16; QG, QA, scale (or eig_g, eig_a), out: float32;\n"
          "dot: 0-d float32; workspace: 1-D float32 of precondition_workspace_size(d_out, d_in).\n"
          "S = scale, or eig_g[i] * eig_a[j] when scale is None. Deterministic; allocates nothing.");
    m.def("precondition_workspace_size",
          [](int64_t d_out, int64_t d_in) {
              require_shape(d_out >= 1 && d_in >= 1 && d_out < kMaxDim && d_in < kMaxDim, "d_out, d_in",
                            "out of range");
              return precondition_workspace_floats(int(d_out), int(d_in));
          },
          py::arg("d_out"), py::arg("d_in"), "float32 elements of workspace the precondition kernel needs.");
}

}  // namespace kfac
