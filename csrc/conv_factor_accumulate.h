// Raw launcher of the Conv2d activation-factor kernel (csrc/conv_factor_accumulate.cu);
// no pybind11, no DLPack.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kfac {

enum class ConvInputType { Float32, BFloat16, Float16 };

struct ConvGeometry {
    int n, channels, height, width;       // input (n, C, H, W), C-contiguous
    int kernel_h, kernel_w;
    int stride_h, stride_w;
    int pad_h, pad_w;                     // zero padding
    int dilation_h, dilation_w;
    int out_h, out_w;                     // output positions (computed by conv_output_size)
};

struct ConvFactorArgs {
    const void* x;            // input, dtype x_type
    ConvInputType x_type;
    const float* weights;     // (n, out_h * out_w) per-row weights, or nullptr
    float* factor;            // A: d x d, d = C * kh * kw + bias, updated in place
    float* workspace;         // splits * d * d floats when splits > 1, else unused
    ConvGeometry geom;
    bool bias;
    int splits;               // >= 1: the n * positions rows are cut in `splits` parts
    bool tensor_cores;        // sm_80+: the mma.sync kernels (3xTF32, or bf16/fp16 when unweighted)
    int64_t chunk_elements = (int64_t(1) << 31) - 1;  // tensor-core path: at most this many elements
                              // of x per launch (< 2^31: 32-bit offsets); tests lower it
    float beta;
    float alpha;
};

// Output extent of one spatial dimension (PyTorch's formula); <= 0 means no output.
inline int conv_output_size(int in, int kernel, int stride, int pad, int dilation) {
    const int span = in + 2 * pad - dilation * (kernel - 1) - 1;
    return span < 0 ? 0 : span / stride + 1;
}

// A <- beta A + alpha sum_{i,t} w_it abar_it abar_it^T (see the .cu file).
cudaError_t conv_factor_launch(const ConvFactorArgs& args, cudaStream_t stream);

// Floats of workspace needed for `splits` (0 when splits == 1).
int64_t conv_factor_workspace_floats(int d, int splits);

// Number of 64 x 64 tiles on or above the diagonal of the d x d factor (blocks doing work).
int conv_factor_tiles(int d);

}  // namespace kfac
