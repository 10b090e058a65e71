// The subset of the DLPack C ABI (https://dmlc.github.io/dlpack/latest/c_api.html) that
// kfac_cuda consumes, declared from the published specification. Only the layout matters:
// these structs must match the producer's (torch, CuPy, NumPy) byte for byte.
#pragma once

#include <cstdint>

extern "C" {

/// ABI version a versioned capsule carries; we understand major version 1.
struct DLPackVersion {
  uint32_t major;
  uint32_t minor;
};

enum DLDeviceType : int32_t {
  kDLCPU = 1,
  kDLCUDA = 2,
  kDLCUDAHost = 3,
  kDLOpenCL = 4,
  kDLVulkan = 7,
  kDLMetal = 8,
  kDLVPI = 9,
  kDLROCM = 10,
  kDLROCMHost = 11,
  kDLExtDev = 12,
  kDLCUDAManaged = 13,
  kDLOneAPI = 14,
  kDLWebGPU = 15,
  kDLHexagon = 16,
  kDLMAIA = 17,
};

struct DLDevice {
  DLDeviceType device_type;
  int32_t device_id;
};

enum DLDataTypeCode : uint8_t {
  kDLInt = 0,
  kDLUInt = 1,
  kDLFloat = 2,
  kDLOpaqueHandle = 3,
  kDLBfloat = 4,
  kDLComplex = 5,
  kDLBool = 6,
};

struct DLDataType {
  uint8_t code;   // a DLDataTypeCode
  uint8_t bits;
  uint16_t lanes;
};

struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; NULL means compact row-major
  uint64_t byte_offset;
};

/// Payload of a capsule named "dltensor" (pre-1.0 protocol).
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};

/// Flag bits of DLManagedTensorVersioned::flags.
constexpr uint64_t DLPACK_FLAG_BITMASK_READ_ONLY = 1ULL << 0;
constexpr uint64_t DLPACK_FLAG_BITMASK_IS_COPIED = 1ULL << 1;

/// Payload of a capsule named "dltensor_versioned" (protocol 1.x).
struct DLManagedTensorVersioned {
  DLPackVersion version;
  void* manager_ctx;
  void (*deleter)(DLManagedTensorVersioned* self);
  uint64_t flags;
  DLTensor dl_tensor;
};

}  // extern "C"
