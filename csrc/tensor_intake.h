// Tensor intake: borrow CUDA tensors from any Python object that speaks DLPack
// (torch.Tensor, cupy.ndarray, ...) and validate them, without linking against PyTorch.
//
// Usage in an op binding (see factor_accumulate.cu):
//
//   kfac::CudaTensor A = kfac::take_cuda_tensor(A_obj, {"A", {kfac::DType::Float32}, 2, true}, stream);
//   kfac::CudaTensor a = kfac::take_cuda_tensor(a_obj, {"a", kfac::kFloatingTypes, 2, false, A.device()}, stream);
//   auto w = kfac::take_optional_cuda_tensor(w_obj, {"weights", {kfac::DType::Float32}, 1, false, A.device()}, stream);
//   kfac::require_shape(a.size(0) == w->size(0), "weights", "...");
//
// Every check raises a Python exception naming the argument:
//   TypeError  - not a DLPack object, or a dtype outside spec.dtypes;
//   ValueError - not on a CUDA device (checked via __dlpack_device__ BEFORE exporting, so no
//                memory is touched), wrong device index, wrong ndim, not C-contiguous,
//                read-only when spec.writable;
//   BufferError - a DLPack ABI major version we do not understand.
// The tensor is exported with __dlpack__(stream=<caller's stream>) so the producer orders its
// pending work before ours; the stream is the integer from torch.cuda.current_stream().cuda_stream
// (0, the legacy default stream, is sent as 1 as the DLPack spec requires).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "dlpack.h"

namespace kfac {

enum class DType { Float32, Float16, BFloat16 };

/// "float32", "float16" or "bfloat16".
const char* dtype_name(DType dtype);

/// fp32, fp16 and bf16: the activation/gradient dtypes the kernels accept.
extern const std::vector<DType> kFloatingTypes;

/// What an argument must be. Shapes beyond ndim are checked by the op (require_shape).
struct TensorSpec {
  const char* name;           // the Python argument name used in every error message
  std::vector<DType> dtypes;  // allowed dtypes
  int ndim;                   // required number of dimensions
  bool writable = false;      // reject read-only exports (outputs)
  int device = -1;            // required CUDA device index, -1 for any
};

/// A CUDA tensor borrowed through DLPack; always C-contiguous. Move-only. Its destructor
/// calls the producer's deleter; the data pointer is valid while this object lives.
class CudaTensor {
 public:
  CudaTensor(DLManagedTensorVersioned* versioned, DLManagedTensor* legacy);
  CudaTensor(CudaTensor&& other) noexcept;
  CudaTensor& operator=(CudaTensor&&) = delete;
  CudaTensor(const CudaTensor&) = delete;
  CudaTensor& operator=(const CudaTensor&) = delete;
  ~CudaTensor();

  DType dtype() const { return dtype_; }
  int device() const { return tensor().device.device_id; }
  int ndim() const { return tensor().ndim; }
  int64_t size(int dim) const { return tensor().shape[dim]; }
  int64_t numel() const;
  /// First element (DLTensor::data plus byte_offset).
  void* data() const;
  template <typename T>
  T* data_as() const { return static_cast<T*>(data()); }

 private:
  friend CudaTensor take_cuda_tensor(pybind11::handle, const TensorSpec&, std::uintptr_t);
  const DLTensor& tensor() const { return versioned_ ? versioned_->dl_tensor : legacy_->dl_tensor; }
  DLManagedTensorVersioned* versioned_;
  DLManagedTensor* legacy_;
  DType dtype_ = DType::Float32;
};

/// Borrow `obj` as a CUDA tensor satisfying `spec`, exported on `stream` (see file comment).
CudaTensor take_cuda_tensor(pybind11::handle obj, const TensorSpec& spec, std::uintptr_t stream);

/// As take_cuda_tensor, but None gives an empty optional.
std::optional<CudaTensor> take_optional_cuda_tensor(pybind11::handle obj, const TensorSpec& spec,
                                                    std::uintptr_t stream);

/// Raise ValueError("<name>: <message>") unless ok (shape relations between arguments).
void require_shape(bool ok, const char* name, const std::string& message);

/// "(2, 3)"-style rendering of a tensor's shape for error messages.
std::string shape_string(const CudaTensor& t);

}  // namespace kfac
