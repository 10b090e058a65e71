// Raw launcher of the Kronecker-factor accumulation kernels (csrc/factor_accumulate.cu); no
// pybind11, no DLPack.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kfac {

enum class FactorInputType { Float32, BFloat16, Float16 };

struct FactorArgs {
    float* factor;            // A: D x D fp32, D = d + bias, updated in place
    const void* a;            // n x d rows, dtype a_type, C-contiguous
    FactorInputType a_type;
    const float* weights;     // (n,) row weights, or nullptr
    float* workspace;         // factor_accumulate_workspace_floats(D, splits) floats when splits > 1
    int n;
    int d;
    bool bias;
    bool tensor_cores;        // sm_80+: unweighted bf16/fp16 rows use mma.sync
    int splits;               // >= 1: the n rows are cut in `splits` parts (deterministic reduction)
    float beta;
    float alpha;
};

// A <- beta A + alpha abar^T diag(w) abar (see the .cu file).
cudaError_t factor_accumulate_launch(const FactorArgs& args, cudaStream_t stream);

// Floats of workspace needed for `splits` (0 when splits == 1).
int64_t factor_accumulate_workspace_floats(int D, int splits);

// Number of 64 x 64 tiles on or above the diagonal of the D x D factor (blocks per split).
int factor_accumulate_tiles(int D);

}  // namespace kfac
