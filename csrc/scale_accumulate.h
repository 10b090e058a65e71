// Raw launchers of the EKFAC / TEKFAC scale kernels (csrc/scale_accumulate.cu); no
// pybind11, no DLPack. All matrices fp32, row-major, contiguous, on the current device.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kfac {

struct ScaleArgs {
    const float* gt;   // rows x d_out: G~ = g Q_G (rows = n, or n * K with weight sharing)
    const float* at;   // rows x d_in: A~ = abar Q_A; with at_broadcast one K x d_in matrix
    float* scale;      // S: d_out x d_in, updated in place
    float* workspace;  // splits * d_out * d_in floats when splits > 1, else unused (may be null)
    int n;             // examples
    int positions;     // K rows per example (weight sharing, may be 0); ignored for the per-row case
    bool shared;       // true: gt/at are (n, K, d) (weight sharing); false: (n, d) rows
    bool at_broadcast; // shared only: at is one K x d_in matrix for every example (rotate order)
    bool tensor_cores; // sm_80+: the 3xTF32 mma.sync kernels; false: the SIMT kernels
    int d_out;
    int d_in;
    int splits;        // >= 1: the reduction dimension (rows or examples) is cut in `splits` parts
    float beta;
    float alpha;
};

// Without weight sharing (!shared):  S <- beta S + alpha (G~ o G~)^T (A~ o A~).
// With weight sharing (shared, positions == K >= 0; K == 0 gives S <- beta S): S <- beta S + alpha sum_i (X_i^T Y_i)^2,
//   X_i = gt[i*K:(i+1)*K] (K x d_out), Y_i = at[i*K:(i+1)*K] (or at itself with at_broadcast);
//   the per-example product is never stored. Orders of contraction: csrc/scale_accumulate.cu.
cudaError_t scale_accumulate_launch(const ScaleArgs& args, cudaStream_t stream);

// Floats of workspace the launcher needs for `splits` (0 when splits == 1).
int64_t scale_accumulate_workspace_floats(int d_out, int d_in, int splits);

// Number of 64 x 64 output tiles (to choose `splits`).
int scale_accumulate_tiles(int d_out, int d_in);

}  // namespace kfac
