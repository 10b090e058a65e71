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

from ._dispatch import select


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
    V = grad.to(QG.dtype)
    S = scale if scale is not None else torch.outer(eig_g, eig_a)
    U = QG @ ((QG.t() @ V @ QA) / (S + damping)) @ QA.t()
    return U, (U * V).sum()


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
    if (scale is None) == (eig_g is None or eig_a is None):
        raise ValueError("precondition: pass either scale, or both eig_g and eig_a")
    impl = select("precondition", backend, QG, precondition_reference, None)
    return impl(grad, QG, QA, damping=damping, scale=scale, eig_g=eig_g, eig_a=eig_a)
