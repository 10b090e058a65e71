"""The preconditioner's exponent: U = (F^ + damping I)^(-p) V for 0 < p <= 1.

p = 1 is the natural-gradient step of the damped curvature block F^; p = 1/2 is the inverse
square root used by Shampoo and SOAP (Gupta et al. 2018; Vyas et al. 2024), which in the
block's eigenbasis divides each coordinate by the square root of its second moment, as Adam
does coordinate-wise. In the Kronecker eigenbasis every method's step is
U = Q_G [(Q_G^T V Q_A) / d] Q_A^T with d the damped spectrum (l_G l_A^T + damping, or the
eigenvalue-corrected S + damping); the exponent replaces d by d^p, which is exactly
(F^ + damping I)^(-p) for the Kronecker-structured F^ (tested against a dense matrix power).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch


def check_exponent(exponent: float) -> float:
    if not 0.0 < float(exponent) <= 1.0:
        raise ValueError(f"exponent must be in (0, 1], got {exponent!r}")
    return float(exponent)


def powered(exponent: float, *, damping: float, scale: Optional[torch.Tensor] = None,
            eig_g: Optional[torch.Tensor] = None, eig_a: Optional[torch.Tensor] = None) -> Dict:
    """``ops.precondition`` scaling arguments for exponent p: unchanged for p = 1, else the
    explicit denominator (S + damping)^p (S = scale, or eig_g eig_a^T) with no further damping."""
    if exponent == 1.0:
        return dict(damping=damping, scale=scale, eig_g=eig_g, eig_a=eig_a)
    S = scale if scale is not None else torch.outer(eig_g, eig_a)
    return dict(damping=0.0, scale=(S + damping).clamp_min(0).pow(exponent))
