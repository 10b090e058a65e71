// extern "C" entry points over the raw launchers, for ctypes (CPU emulation tests only).
#include "conv_factor_accumulate.h"
#include "fast_divmod.cuh"
#include "factor_accumulate.h"
#include "precondition.h"
#include "scale_accumulate.h"

extern "C" {

int emu_launches() { return emu::launches; }

long long emu_precondition_workspace(int d_out, int d_in) { return kfac::precondition_workspace_floats(d_out, d_in); }

int emu_precondition(const void* grad, int grad_is_bf16, const float* qg, const float* qa, const float* scale,
                     const float* eig_g, const float* eig_a, float damping, float* out, float* dot, float* ws,
                     int d_out, int d_in) {
    kfac::PreconditionArgs a;
    a.grad = grad;
    a.grad_is_bf16 = grad_is_bf16 != 0;
    a.qg = qg;
    a.qa = qa;
    a.scale = scale;
    a.eig_g = eig_g;
    a.eig_a = eig_a;
    a.damping = damping;
    a.out = out;
    a.dot = dot;
    a.workspace = ws;
    a.d_out = d_out;
    a.d_in = d_in;
    return kfac::precondition_launch(a, nullptr);
}

long long emu_scale_workspace(int d_out, int d_in, int splits) {
    return kfac::scale_accumulate_workspace_floats(d_out, d_in, splits);
}

// shared: gt/at per example (K = positions rows each); at_broadcast: one at for every example;
// tensor_cores: the sm_80+ 3xTF32 kernels, else the SIMT kernels.
int emu_scale(const float* gt, const float* at, float* S, float* ws, int n, int shared, int at_broadcast, int positions,
              int d_out, int d_in, int splits, int tensor_cores, float beta, float alpha) {
    kfac::ScaleArgs a;
    a.gt = gt;
    a.at = at;
    a.scale = S;
    a.workspace = ws;
    a.n = n;
    a.positions = positions;
    a.shared = shared != 0;
    a.at_broadcast = at_broadcast != 0;
    a.tensor_cores = tensor_cores != 0;
    a.d_out = d_out;
    a.d_in = d_in;
    a.splits = splits;
    a.beta = beta;
    a.alpha = alpha;
    return kfac::scale_accumulate_launch(a, nullptr);
}

// q, r of n / d through kfac::FastDivmod (the magic-number division of the conv kernels).
void emu_fast_divmod(int d, int n, int* q, int* r) { kfac::FastDivmod::make(d).divmod(n, *q, *r); }

long long emu_conv_workspace(int d, int splits) { return kfac::conv_factor_workspace_floats(d, splits); }

// geometry: n, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw (12 ints)
// tensor_cores: the sm_80+ kernels (3xTF32, or mma.sync bf16/fp16 when unweighted); 0: the SIMT kernel.
// chunk_elements > 0: at most that many elements of x per tensor-core launch (0: the default).
int emu_conv(const void* x, int x_type, const float* w, float* A, float* ws, const int* geometry, int bias,
             int splits, int tensor_cores, long long chunk_elements, float beta, float alpha) {
    const int* g = geometry;
    kfac::ConvFactorArgs a;
    a.x = x;
    a.x_type = static_cast<kfac::ConvInputType>(x_type);
    a.weights = w;
    a.factor = A;
    a.workspace = ws;
    a.geom = kfac::ConvGeometry{g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11],
                                kfac::conv_output_size(g[2], g[4], g[6], g[8], g[10]),
                                kfac::conv_output_size(g[3], g[5], g[7], g[9], g[11])};
    a.bias = bias != 0;
    a.splits = splits;
    a.tensor_cores = tensor_cores != 0;
    if (chunk_elements > 0) a.chunk_elements = chunk_elements;
    a.beta = beta;
    a.alpha = alpha;
    return kfac::conv_factor_launch(a, nullptr);
}

long long emu_factor_workspace(int D, int splits) { return kfac::factor_accumulate_workspace_floats(D, splits); }

// a_type: 0 fp32, 1 bf16, 2 fp16. tensor_cores: the sm_80+ paths (mma.sync bf16/fp16 for
// unweighted 16-bit rows, 3xTF32 otherwise); 0: the SIMT kernel used below sm_80.
int emu_factor(float* A, const void* a, int a_type, const float* w, float* ws, int n, int d, int bias,
               int tensor_cores, int splits, float beta, float alpha) {
    kfac::FactorArgs f;
    f.factor = A;
    f.a = a;
    f.a_type = static_cast<kfac::FactorInputType>(a_type);
    f.weights = w;
    f.workspace = ws;
    f.n = n;
    f.d = d;
    f.bias = bias != 0;
    f.tensor_cores = tensor_cores != 0;
    f.splits = splits;
    f.beta = beta;
    f.alpha = alpha;
    return kfac::factor_accumulate_launch(f, nullptr);
}

}  // extern "C"
