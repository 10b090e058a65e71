"""ctypes front end to the CPU emulation of the kernels (tests only): same arguments as the
raw launchers, CPU torch tensors in and out. See build.py."""
from __future__ import annotations

import ctypes
from typing import Optional, Sequence

import torch

from build import build

_lib = None
_c_float_p = ctypes.c_void_p


def lib() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        _lib = build()
        _lib.emu_precondition_workspace.restype = ctypes.c_longlong
        _lib.emu_scale_workspace.restype = ctypes.c_longlong
        _lib.emu_conv_workspace.restype = ctypes.c_longlong
        _lib.emu_factor_workspace.restype = ctypes.c_longlong
        _lib.emu_factor.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [
            ctypes.c_int] * 5 + [ctypes.c_float, ctypes.c_float]
        _lib.emu_precondition.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 5 + [
            ctypes.c_float] + [ctypes.c_void_p] * 3 + [ctypes.c_int, ctypes.c_int]
        _lib.emu_scale.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 8 + [ctypes.c_float] * 2
        _lib.emu_conv.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 4 + [
            ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_float, ctypes.c_float]
    return _lib


def _ptr(t: Optional[torch.Tensor], *dtypes: torch.dtype):
    if t is None:
        return None
    assert t.is_contiguous() and t.device.type == "cpu"
    assert t.dtype in (dtypes or (torch.float32,)), f"unexpected dtype {t.dtype}"
    return t.data_ptr()


def poisoned(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype)


def precondition(grad, QG, QA, damping, scale=None, eig_g=None, eig_a=None):
    grad, QG, QA = grad.contiguous(), QG.contiguous(), QA.contiguous()
    scale, eig_g, eig_a = (None if t is None else t.contiguous() for t in (scale, eig_g, eig_a))
    d_out, d_in = grad.shape
    out = poisoned(d_out, d_in)
    dot = poisoned(1)
    ws = poisoned(lib().emu_precondition_workspace(d_out, d_in))
    rc = lib().emu_precondition(_ptr(grad, torch.float32, torch.bfloat16), int(grad.dtype == torch.bfloat16), _ptr(QG), _ptr(QA), _ptr(scale),
                                _ptr(eig_g), _ptr(eig_a), float(damping), _ptr(out), _ptr(dot), _ptr(ws),
                                d_out, d_in)
    assert rc == 0
    return out, dot[0]


def scale_accumulate(S, gt, at, splits=1, beta=0.0, alpha=1.0, tensor_cores=True):
    """gt: (n, d_out) or (n, K, d_out); at: (n, d_in), (n, K, d_in), or (K, d_in) for every
    example (the rotate order). Updates S in place. tensor_cores: the sm_80+ 3xTF32 kernels,
    else the SIMT kernels."""
    gt, at = gt.contiguous(), at.contiguous()
    d_out, d_in = S.shape
    n = gt.shape[0]
    shared = gt.dim() == 3
    broadcast = shared and at.dim() == 2
    positions = gt.shape[1] if shared else 0
    need = lib().emu_scale_workspace(d_out, d_in, splits)
    ws = poisoned(need) if need else None
    rc = lib().emu_scale(_ptr(gt), _ptr(at), _ptr(S), _ptr(ws), n, int(shared), int(broadcast), positions, d_out, d_in,
                         splits, int(tensor_cores), beta, alpha)
    assert rc == 0
    return S


_X_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def conv_factor(A, x, kernel_size: Sequence[int], stride, padding, dilation, bias, weights=None, splits=1,
                beta=0.0, alpha=1.0, tensor_cores=True, chunk_elements=0):
    """A <- beta A + alpha sum w abar abar^T over the im2col patches of x, in place, with the emulated
    conv_factor_accumulate.cu. tensor_cores: the sm_80+ kernels (3xTF32; mma.sync bf16/fp16 for
    unweighted 16-bit x), else the SIMT kernel. chunk_elements > 0: at most that many elements of x
    per tensor-core launch (the chunking that x of 2^31 elements or more takes; 0: the default)."""
    x = x.contiguous()
    weights = None if weights is None else weights.contiguous()
    n, C, H, W = x.shape
    geometry = (ctypes.c_int * 12)(n, C, H, W, *kernel_size, *stride, *padding, *dilation)
    need = lib().emu_conv_workspace(A.shape[0], splits)
    ws = poisoned(need) if need else None
    rc = lib().emu_conv(_ptr(x, *_X_TYPES), _X_TYPES[x.dtype], _ptr(weights), _ptr(A), _ptr(ws), geometry, int(bias), splits,
                        int(tensor_cores), chunk_elements, beta, alpha)
    assert rc == 0
    return A


def factor(A, a, bias: bool, weights=None, splits=1, beta=0.0, alpha=1.0, tensor_cores=True):
    """A <- beta A + alpha abar^T diag(w) abar in place with the emulated factor_accumulate.cu.
    tensor_cores: the sm_80+ paths (mma.sync for unweighted 16-bit rows, 3xTF32 otherwise), else
    the SIMT kernel; ``splits`` cuts the rows as the caller would."""
    a = a.contiguous()
    weights = None if weights is None else weights.contiguous()
    n, d = a.shape
    need = lib().emu_factor_workspace(A.shape[0], splits)
    ws = poisoned(need) if need else None
    rc = lib().emu_factor(_ptr(A), _ptr(a, *_X_TYPES) if a.numel() else None, _X_TYPES[a.dtype], _ptr(weights),
                          _ptr(ws), n, d, int(bias), int(tensor_cores), splits, beta, alpha)
    assert rc == 0
    return A


def fast_divmod(d: int, n: int):
    """(n // d, n % d) through csrc/fast_divmod.cuh's magic-number division (1 <= d, 0 <= n < 2^31)."""
    q, r = ctypes.c_int(), ctypes.c_int()
    lib().emu_fast_divmod(d, n, ctypes.byref(q), ctypes.byref(r))
    return q.value, r.value
