"""Rotation into the Kronecker eigenbasis with per-element scaling:

    U = Q_G [ (Q_G^T V Q_A) / (S + damping) ] Q_A^T,      dot = <U, V>

V is the (d_out, d_in [+1]) gradient (bias as last column), Q_G and Q_A orthogonal
eigenbases, S either a stored (d_out, d_in [+1]) scale (EKFAC, TEKFAC) or the outer
product eig_g eig_a^T formed on the fly (K-FAC, TKFAC). ``dot`` is the sum KL-clipping
needs. Cost: 2*d_out*d_in*(d_out + d_in) multiply-adds (four GEMMs), d_out*d_in scaling.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._extension import extension
from ._checks import INPUT_DTYPES, STATE_DTYPES, check_scalar, check_tensor
from ._dispatch import select
from ._launch import MAX_KERNEL_DIM, stream_handle


def precondition_reference(
    grad: torch.Tensor,
    QG: torch.Tensor,
    QA: torch.Tensor,
    *,
    damping: float,
    scale: Optional[torch.Tensor] = None,
    eig_g: Optional[torch.Tensor] = None,
    eig_a: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    _check_args(grad, QG, QA, damping, scale, eig_g, eig_a)
    V = grad.to(QG.dtype)
    S = scale if scale is not None else torch.outer(eig_g, eig_a)
    U = QG @ ((QG.t() @ V @ QA) / (S + damping)) @ QA.t()
    return U, (U * V).sum()


def precondition_cuda(
    grad: torch.Tensor,
    QG: torch.Tensor,
    QA: torch.Tensor,
    *,
    damping: float,
    scale: Optional[torch.Tensor] = None,
    eig_g: Optional[torch.Tensor] = None,
    eig_a: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """CUDA kernel ``kfac_cuda._C.precondition`` on the current stream of QG's device.

    Same contract as the reference. U and the 0-d dot are float32; the dot is reduced
    deterministically (no atomics). Allocates U, the dot and a d_out*d_in float32 workspace
    with torch (so it is CUDA-graph capturable); non-contiguous inputs (e.g. eigenvectors
    straight from a batched ``torch.linalg.eigh``, which are column-major) are copied to
    contiguous ones first, so store the bases contiguous to avoid that copy per step.
    """
    _check_args(grad, QG, QA, damping, scale, eig_g, eig_a)
    d_out, d_in = grad.shape
    # detach: DLPack refuses tensors that require grad; contiguous: the kernel reads row-major
    grad, QG, QA = (t.detach().contiguous() for t in (grad, QG, QA))
    scale, eig_g, eig_a = (None if t is None else t.detach().contiguous() for t in (scale, eig_g, eig_a))
    ext = extension()
    out = torch.empty((d_out, d_in), dtype=torch.float32, device=QG.device)
    dot = torch.empty((), dtype=torch.float32, device=QG.device)
    workspace = torch.empty(ext.precondition_workspace_size(d_out, d_in), dtype=torch.float32, device=QG.device)
    ext.precondition(grad, QG, QA, scale, eig_g, eig_a, float(damping), out, dot, workspace,
                     stream_handle(QG.device))
    return out, dot


def _check_args(grad, QG, QA, damping, scale, eig_g, eig_a) -> None:
    """The argument check both implementations run (kfac_cuda.ops._checks)."""
    check_tensor("precondition", "grad", grad, INPUT_DTYPES, ndims=(2,))
    for name, t in (("QG", QG), ("QA", QA)):
        check_tensor("precondition", name, t, STATE_DTYPES, ndims=(2,))
    check_tensor("precondition", "scale", scale, STATE_DTYPES, ndims=(2,), optional=True)
    for name, t in (("eig_g", eig_g), ("eig_a", eig_a)):
        check_tensor("precondition", name, t, STATE_DTYPES, ndims=(1,), optional=True)
    if (scale is None) == (eig_g is None or eig_a is None):
        raise ValueError("precondition: pass either scale, or both eig_g and eig_a")
    check_scalar("precondition", "damping", damping)


def _cuda_supports(grad, QG, QA, scale, eig_g, eig_a) -> bool:
    """True when the kernel takes these arguments (otherwise "auto" uses the reference)."""
    others = [t for t in (QA, scale, eig_g, eig_a) if t is not None]
    return (
        grad.dim() == 2
        and grad.dtype in (torch.float32, torch.bfloat16)
        and 1 <= min(grad.shape) and max(grad.shape) < MAX_KERNEL_DIM
        and all(t.dtype == torch.float32 for t in [QG, *others])
        and all(t.device == QG.device for t in [grad, *others])
    )


def precondition(
    grad: torch.Tensor,
    QG: torch.Tensor,
    QA: torch.Tensor,
    *,
    damping: float,
    scale: Optional[torch.Tensor] = None,
    eig_g: Optional[torch.Tensor] = None,
    eig_a: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return (U, <U, grad>) for one layer; give either ``scale`` or both ``eig_g`` and ``eig_a``.

    U has the dtype of the bases (float32, or float64 on the reference path); ``grad``
    may be fp32 or bf16.
    """
    _check_args(grad, QG, QA, damping, scale, eig_g, eig_a)
    impl = select("precondition", backend, QG, precondition_reference, precondition_cuda,
                  lambda: _cuda_supports(grad, QG, QA, scale, eig_g, eig_a))
    return impl(grad, QG, QA, damping=damping, scale=scale, eig_g=eig_g, eig_a=eig_a)
