// Runtime queries: build information and a device count that explains a missing driver.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cuda_check.h"
#include "ops_registry.h"

namespace kfac {
namespace {

/// Number of visible CUDA devices; 0 when the driver reports none, RuntimeError when no
/// usable driver is installed (cudaGetDeviceCount's own message there is misleading).
int device_count() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status == cudaErrorNoDevice) return 0;
  if (status == cudaErrorInsufficientDriver) {
    int driver = 0;
    KFAC_CUDA_CHECK(cudaDriverGetVersion(&driver));
    if (driver == 0) throw std::runtime_error("kfac_cuda._C: no NVIDIA driver found");
    throw std::runtime_error("kfac_cuda._C: the NVIDIA driver (CUDA " + std::to_string(driver / 1000) +
                             "." + std::to_string(driver % 1000 / 10) + ") is older than the CUDA " +
                             std::to_string(CUDART_VERSION / 1000) + "." +
                             std::to_string(CUDART_VERSION % 1000 / 10) + " runtime this was built with");
  }
  KFAC_CUDA_CHECK(status);
  return count;
}

}  // namespace

void register_runtime(pybind11::module_& m) {
  m.attr("cuda_architectures") = KFAC_CUDA_ARCHS;
  m.attr("cuda_runtime_version") = CUDART_VERSION;
  m.def("device_count", &device_count,
        "Number of CUDA devices visible to the extension (RuntimeError when no driver is usable).");
}

}  // namespace kfac
