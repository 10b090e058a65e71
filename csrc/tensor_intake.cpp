// Implementation of tensor_intake.h: DLPack export, capsule ownership, validation.
#include "tensor_intake.h"

#include <Python.h>

#include <utility>

namespace py = pybind11;

namespace kfac {
namespace {

constexpr const char* kVersionedName = "dltensor_versioned";
constexpr const char* kLegacyName = "dltensor";
constexpr int kMaxDims = 64;                      // far above any op's ndim; bounds the shape read
constexpr int64_t kMaxElements = int64_t{1} << 48;  // 1 PiB of bytes: beyond any device

std::string arg_error(const TensorSpec& spec, const std::string& message) {
  return std::string(spec.name) + ": " + message;
}

const char* device_type_name(int type) {
  switch (type) {
    case kDLCPU: return "cpu";
    case kDLCUDA: return "cuda";
    case kDLCUDAHost: return "cuda pinned host memory";
    case kDLCUDAManaged: return "cuda managed memory";
    case kDLROCM: return "rocm";
    case kDLMetal: return "metal";
    default: return "a non-CUDA device";
  }
}

std::optional<DType> to_dtype(const DLDataType& t) {
  if (t.lanes != 1) return std::nullopt;
  if (t.code == kDLFloat && t.bits == 32) return DType::Float32;
  if (t.code == kDLFloat && t.bits == 16) return DType::Float16;
  if (t.code == kDLBfloat && t.bits == 16) return DType::BFloat16;
  return std::nullopt;
}

std::string dl_dtype_name(const DLDataType& t) {
  static const char* codes[] = {"int", "uint", "float", "opaque", "bfloat", "complex", "bool"};
  std::string name = t.code < 7 ? codes[t.code] : "code" + std::to_string(t.code);
  name += std::to_string(t.bits);
  if (t.lanes != 1) name += "x" + std::to_string(t.lanes);
  return name;
}

std::string allowed_names(const std::vector<DType>& dtypes) {
  std::string out;
  for (DType d : dtypes) out += (out.empty() ? "" : ", ") + std::string(dtype_name(d));
  return out;
}

// C-contiguous, ignoring strides of extent-1 dimensions (torch reports arbitrary ones there).
bool is_c_contiguous(const DLTensor& t) {
  if (t.strides == nullptr) return true;
  int64_t expected = 1;
  for (int i = t.ndim - 1; i >= 0; --i) {
    if (t.shape[i] == 0) return true;
    if (t.shape[i] != 1 && t.strides[i] != expected) return false;
    expected *= t.shape[i];
  }
  return true;
}

// A malformed capsule must raise, never crash: the declared ndim, shape and strides are read
// only once they are known to be consistent, and sizes are checked for sign and overflow.
void check_layout(const DLTensor& t, const TensorSpec& spec) {
  if (t.ndim < 0 || t.ndim > kMaxDims) {
    throw py::value_error(arg_error(spec, "malformed DLPack tensor: ndim " + std::to_string(t.ndim) +
                                              " outside [0, " + std::to_string(kMaxDims) + "]"));
  }
  if (t.ndim > 0 && t.shape == nullptr) {
    throw py::value_error(arg_error(spec, "malformed DLPack tensor: " + std::to_string(t.ndim) +
                                              " dimensions but no shape"));
  }
  int64_t elements = 1;
  for (int i = 0; i < t.ndim; ++i) {
    if (t.shape[i] < 0) {
      throw py::value_error(arg_error(spec, "malformed DLPack tensor: size " + std::to_string(t.shape[i]) +
                                                " of dimension " + std::to_string(i) + " is negative"));
    }
    if (t.shape[i] != 0 && elements > kMaxElements / t.shape[i]) {
      throw py::value_error(arg_error(spec, "malformed DLPack tensor: more than 2^48 elements"));
    }
    elements *= t.shape[i];
  }
  if (t.data == nullptr && elements > 0) {
    throw py::value_error(arg_error(spec, "malformed DLPack tensor: no data pointer"));
  }
}

// (device_type, device_id) from __dlpack_device__(), without exporting anything.
std::pair<int, int> dlpack_device(py::handle obj, const TensorSpec& spec) {
  try {
    return obj.attr("__dlpack_device__")().cast<std::pair<int, int>>();
  } catch (const py::cast_error&) {
    throw py::type_error(arg_error(spec, "__dlpack_device__() did not return (device_type, device_id)"));
  }
}

py::object export_capsule(py::handle obj, std::uintptr_t stream) {
  py::int_ dl_stream(stream == 0 ? std::uintptr_t{1} : stream);  // 0 is ambiguous in DLPack
  try {
    return obj.attr("__dlpack__")(py::arg("stream") = dl_stream,
                                  py::arg("max_version") = py::make_tuple(1, 1));
  } catch (py::error_already_set& e) {
    if (!e.matches(PyExc_TypeError)) throw;  // a producer predating max_version
  }
  return obj.attr("__dlpack__")(py::arg("stream") = dl_stream);
}

// Take ownership of the capsule's tensor (renaming the capsule to used_* so its destructor
// leaves the tensor to us).
CudaTensor consume_capsule(py::handle capsule, const TensorSpec& spec) {
  PyObject* cap = capsule.ptr();
  if (PyCapsule_IsValid(cap, kVersionedName)) {
    auto* managed = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(cap, kVersionedName));
    if (managed->version.major != 1) {  // unnamed capsule: its destructor still frees it
      PyErr_SetString(PyExc_BufferError,
                      arg_error(spec, "unsupported DLPack major version " +
                                          std::to_string(managed->version.major)).c_str());
      throw py::error_already_set();
    }
    if (PyCapsule_SetName(cap, "used_dltensor_versioned") != 0) throw py::error_already_set();
    return CudaTensor(managed, nullptr);
  }
  if (PyCapsule_IsValid(cap, kLegacyName)) {
    auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, kLegacyName));
    if (PyCapsule_SetName(cap, "used_dltensor") != 0) throw py::error_already_set();
    return CudaTensor(nullptr, managed);
  }
  throw py::type_error(arg_error(spec, "__dlpack__() did not return an unused DLPack capsule"));
}

}  // namespace

const std::vector<DType> kFloatingTypes = {DType::Float32, DType::BFloat16, DType::Float16};

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
  }
  return "unknown";
}

CudaTensor::CudaTensor(DLManagedTensorVersioned* versioned, DLManagedTensor* legacy)
    : versioned_(versioned), legacy_(legacy) {}

CudaTensor::CudaTensor(CudaTensor&& other) noexcept
    : versioned_(std::exchange(other.versioned_, nullptr)),
      legacy_(std::exchange(other.legacy_, nullptr)),
      dtype_(other.dtype_) {}

CudaTensor::~CudaTensor() {
  if (versioned_ && versioned_->deleter) versioned_->deleter(versioned_);
  if (legacy_ && legacy_->deleter) legacy_->deleter(legacy_);
}

int64_t CudaTensor::numel() const {
  int64_t n = 1;
  for (int i = 0; i < ndim(); ++i) n *= size(i);
  return n;
}

void* CudaTensor::data() const {
  return static_cast<char*>(tensor().data) + tensor().byte_offset;
}

CudaTensor take_cuda_tensor(py::handle obj, const TensorSpec& spec, std::uintptr_t stream) {
  if (!py::hasattr(obj, "__dlpack__") || !py::hasattr(obj, "__dlpack_device__")) {
    throw py::type_error(arg_error(spec, std::string("expected a CUDA tensor supporting DLPack "
                                                     "(torch.Tensor, cupy.ndarray), got ") +
                                             Py_TYPE(obj.ptr())->tp_name));
  }
  const auto [device_type, device_id] = dlpack_device(obj, spec);
  if (device_type != kDLCUDA) {
    throw py::value_error(arg_error(spec, std::string("expected a CUDA tensor, got one on ") +
                                              device_type_name(device_type)));
  }
  if (spec.device >= 0 && device_id != spec.device) {
    throw py::value_error(arg_error(spec, "expected a tensor on cuda:" + std::to_string(spec.device) +
                                              ", got one on cuda:" + std::to_string(device_id)));
  }

  py::object capsule = export_capsule(obj, stream);
  CudaTensor out = consume_capsule(capsule, spec);  // from here on the deleter always runs
  const DLTensor& t = out.tensor();
  if (t.device.device_type != kDLCUDA) {
    throw py::value_error(arg_error(spec, "exported tensor is not on a CUDA device"));
  }
  check_layout(t, spec);  // before anything reads shape or strides
  const std::optional<DType> dtype = to_dtype(t.dtype);
  bool allowed = false;
  for (DType d : spec.dtypes) allowed = allowed || (dtype && *dtype == d);
  if (!allowed) {
    throw py::type_error(arg_error(spec, "expected dtype " + allowed_names(spec.dtypes) + ", got " +
                                             dl_dtype_name(t.dtype)));
  }
  out.dtype_ = *dtype;
  if (t.ndim != spec.ndim) {
    throw py::value_error(arg_error(spec, "expected " + std::to_string(spec.ndim) + " dimensions, got " +
                                              std::to_string(t.ndim) + " (shape " + shape_string(out) + ")"));
  }
  if (!is_c_contiguous(t)) {
    throw py::value_error(arg_error(spec, "must be C-contiguous (call .contiguous())"));
  }
  if (spec.writable && out.versioned_ && (out.versioned_->flags & DLPACK_FLAG_BITMASK_READ_ONLY)) {
    throw py::value_error(arg_error(spec, "is read-only but is written in place"));
  }
  return out;
}

std::optional<CudaTensor> take_optional_cuda_tensor(py::handle obj, const TensorSpec& spec,
                                                    std::uintptr_t stream) {
  if (obj.is_none()) return std::nullopt;
  return take_cuda_tensor(obj, spec, stream);
}

void require_shape(bool ok, const char* name, const std::string& message) {
  if (!ok) throw py::value_error(std::string(name) + ": " + message);
}

std::string shape_string(const CudaTensor& t) {
  std::string out = "(";
  for (int i = 0; i < t.ndim(); ++i) out += (i ? ", " : "") + std::to_string(t.size(i));
  return out + (t.ndim() == 1 ? ",)" : ")");
}

}  // namespace kfac
