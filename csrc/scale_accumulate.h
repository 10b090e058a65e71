// Raw launchers of the EKFAC / TEKFAC scale kernels (csrc/scale_accumulate.cu); no
// pybind11, no DLPack. All matrices fp32, row-major, contiguous, on the current device.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kfac {

struct ScaleArgs {
    const float* gt;   // G~ = g Q_G: rows x d_out (rows = n, or n * T with weight sharing)
    const float* at;   // A~ = abar Q_A: rows x d_in
    float* scale;      // S: d_out x d_in, updated in place
    float* workspace;  // splits * d_out * d_in floats when splits > 1, else unused (may be null)
    int n;             // examples
    int positions;     // T (weight sharing, may be 0); ignored for the per-row case
    bool shared;       // true: gt/at are (n, T, d) (weight sharing); false: (n, d) rows
    int d_out;
    int d_in;
    int splits;        // >= 1: the reduction dimension (rows or examples) is cut in `splits` parts
    float beta;
    float alpha;
};

// Without weight sharing (!shared):  S <- beta S + alpha (G~ o G~)^T (A~ o A~).
// With weight sharing (shared, positions == T >= 0; T == 0 gives S <- beta S): S <- beta S + alpha sum_i (G~_i^T A~_i)^2,
//   G~_i = G~[i*T:(i+1)*T] (T x d_out), A~_i likewise; the per-example product is never stored.
cudaError_t scale_accumulate_launch(const ScaleArgs& args, cudaStream_t stream);

// Floats of workspace the launcher needs for `splits` (0 when splits == 1).
int64_t scale_accumulate_workspace_floats(int d_out, int d_in, int splits);

// Number of 64 x 64 output tiles (to choose `splits`).
int scale_accumulate_tiles(int d_out, int d_in);

}  // namespace kfac
