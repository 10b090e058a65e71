"""A fake DLPack producer that claims its memory is on a CUDA device.

It lets the CPU machine exercise the extension's tensor intake (capsule names, versions,
dtype/shape/stride/read-only checks, deleter calls) without a GPU. The data pointer is host
memory, so only use it where the intake must reject the arguments before any launch.
"""
import ctypes

KDL_CPU, KDL_CUDA = 1, 2
FLOAT32, FLOAT64, BFLOAT16, FLOAT16, INT32 = (2, 32), (2, 64), (4, 16), (2, 16), (0, 32)
READ_ONLY = 1


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    pass


class DLManagedTensor(ctypes.Structure):
    pass


VERSIONED_DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(DLManagedTensorVersioned))
LEGACY_DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(DLManagedTensor))
DLManagedTensorVersioned._fields_ = [("version", DLPackVersion), ("manager_ctx", ctypes.c_void_p),
                                     ("deleter", VERSIONED_DELETER), ("flags", ctypes.c_uint64),
                                     ("dl_tensor", DLTensor)]
DLManagedTensor._fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p),
                            ("deleter", LEGACY_DELETER)]

_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_capsule_valid = ctypes.pythonapi.PyCapsule_IsValid
_capsule_valid.restype = ctypes.c_int
_capsule_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]


def capsule_has_name(capsule, name: bytes) -> bool:
    return bool(_capsule_valid(capsule, name))


class FakeCudaTensor:
    """Exports a DLPack capsule describing `shape`/`dtype` on cuda:`device_id`."""

    def __init__(self, shape, dtype=FLOAT32, strides=None, *, versioned=True, flags=0, device_id=0,
                 device_type=KDL_CUDA, major=1, accepts_max_version=True, ndim=None, null_shape=False):
        """``ndim`` declares another number of dimensions than ``len(shape)`` and ``null_shape``
        exports a NULL shape pointer: malformed capsules the intake must refuse."""
        self.shape, self.dtype, self.strides = list(shape), dtype, strides
        self.ndim, self.null_shape = len(self.shape) if ndim is None else ndim, null_shape
        self.versioned, self.flags, self.major = versioned, flags, major
        self.device = (device_type, device_id)
        self.accepts_max_version = accepts_max_version
        self.deleted = 0
        self.streams = []
        self.capsule = None
        self._keep = []

    def __dlpack_device__(self):
        return self.device

    def __dlpack__(self, stream=None, max_version=None):
        if max_version is not None and not self.accepts_max_version:
            raise TypeError("__dlpack__() got an unexpected keyword argument 'max_version'")
        self.streams.append(stream)
        numel = 1
        for s in self.shape:
            numel *= s
        buffer = (ctypes.c_char * max(8, min(numel, 1 << 20) * self.dtype[1] // 8))()
        shape = None if self.null_shape else (ctypes.c_int64 * len(self.shape))(*self.shape)
        strides = None if self.strides is None else (ctypes.c_int64 * len(self.strides))(*self.strides)
        tensor = DLTensor(ctypes.cast(buffer, ctypes.c_void_p), DLDevice(*self.device), self.ndim,
                          DLDataType(self.dtype[0], self.dtype[1], 1), ctypes.cast(shape, ctypes.POINTER(ctypes.c_int64)),
                          ctypes.cast(strides, ctypes.POINTER(ctypes.c_int64)), 0)

        def on_delete(_):
            self.deleted += 1

        if self.versioned:
            deleter = VERSIONED_DELETER(on_delete)
            managed = DLManagedTensorVersioned(DLPackVersion(self.major, 1), None, deleter, self.flags, tensor)
            name = b"dltensor_versioned"
        else:
            deleter = LEGACY_DELETER(on_delete)
            managed = DLManagedTensor(tensor, None, deleter)
            name = b"dltensor"
        self._keep += [buffer, shape, strides, deleter, managed, name]
        self.capsule = _capsule_new(ctypes.addressof(managed), name, None)
        return self.capsule
