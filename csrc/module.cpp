// The extension module kfac_cuda._C: each op file registers its own functions.
#include "ops_registry.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "kfac_cuda CUDA kernels; tensors are taken through DLPack, never through libtorch.";
  kfac::register_runtime(m);
  kfac::register_factor_accumulate(m);
  kfac::register_precondition(m);
  kfac::register_scale_accumulate(m);
  kfac::register_conv_factor_accumulate(m);
}
