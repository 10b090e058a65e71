// Checking every CUDA runtime return code: failures become Python RuntimeErrors
// (pybind11 translates std::runtime_error) that name the call site.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace kfac {

/// Throws std::runtime_error("<what> failed at file:line: <CUDA message>") unless ok.
inline void cuda_check(cudaError_t status, const char* what, const char* file, int line) {
  if (status == cudaSuccess) return;
  throw std::runtime_error(std::string(what) + " failed at " + file + ":" + std::to_string(line) +
                           ": " + cudaGetErrorName(status) + ": " + cudaGetErrorString(status));
}

}  // namespace kfac

/// Wrap every CUDA runtime call: KFAC_CUDA_CHECK(cudaMemsetAsync(...)).
#define KFAC_CUDA_CHECK(expr) ::kfac::cuda_check((expr), #expr, __FILE__, __LINE__)

/// Right after every kernel launch: reports bad launch configurations and earlier async errors.
#define KFAC_CUDA_CHECK_LAUNCH(kernel_name) \
  ::kfac::cuda_check(cudaGetLastError(), "launch of " kernel_name, __FILE__, __LINE__)
