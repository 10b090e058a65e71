// RAII: make a device current for the duration of a scope (kernels launch on the device
// that owns the tensors, whatever device the caller had current).
#pragma once

#include "cuda_check.h"

namespace kfac {

class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    KFAC_CUDA_CHECK(cudaGetDevice(&previous_));
    if (device != previous_) {
      KFAC_CUDA_CHECK(cudaSetDevice(device));
      switched_ = true;
    }
  }
  // A destructor cannot throw; restoring a device that was current a moment ago cannot fail.
  ~DeviceGuard() {
    if (switched_) (void)cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

}  // namespace kfac
