// Raw launcher of the precondition kernel (csrc/precondition.cu); no pybind11, no DLPack.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kfac {

struct PreconditionArgs {
    const void* grad;      // V, d_out x d_in, fp32 or bf16 (grad_is_bf16), row-major contiguous
    bool grad_is_bf16;
    const float* qg;       // d_out x d_out
    const float* qa;       // d_in x d_in
    const float* scale;    // d_out x d_in, or nullptr: use eig_g[i] * eig_a[j]
    const float* eig_g;    // d_out (read only when scale == nullptr)
    const float* eig_a;    // d_in  (read only when scale == nullptr)
    float damping;
    float* out;            // U, d_out x d_in
    float* dot;            // 1 float: <U, V>
    float* workspace;      // precondition_workspace_floats(d_out, d_in) floats
    int d_out;
    int d_in;
};

// Number of dot partial sums (the workspace slot after the d_out x d_in intermediate).
int precondition_partials(int d_out, int d_in);
// Workspace size in floats: d_out * d_in + precondition_partials(d_out, d_in) + the split-K
// partial tiles (splits * d_out * d_in for the most-split GEMM; 0 when no GEMM is split). A
// function of the shape alone.
int64_t precondition_workspace_floats(int d_out, int d_in);
// Enqueues the kernels on `stream` (sm_80+ only: 3xTF32 tensor cores); returns the first launch error (cudaSuccess otherwise).
cudaError_t precondition_launch(const PreconditionArgs& args, cudaStream_t stream);

}  // namespace kfac
