"""Wide layers: a per-side policy instead of skipping the layer.

A Kronecker factor is d x d on its side: a 50k-vocabulary head's output factor alone is
10 GB in float32 and its eigendecomposition O(d^3). When a side's dimension exceeds
``max_factor_dim``, ``wide_side`` chooses for that side only (the other side stays full):
- "diagonal": the side's factor is kept as its diagonal (E[abar^2] or E[g^2]), with the
  identity as its basis and the diagonal as its eigenvalues -- the K-FAC block
  diag(A) (x) G (or A (x) diag(G)); the one-sided / diagonal treatment of wide dimensions that
  SOAP and Shampoo implementations use (Vyas et al. 2024; Anil et al. 2020, "Scalable second
  order optimization for deep learning", which precondition only the sides below a size);
- "identity": the side's factor is replaced by its mean eigenvalue times the identity
  (tr A / d_A), i.e. the layer is preconditioned on its other side only;
- "skip": the whole layer is left to the base optimizer (the behaviour before this policy).
EKFAC/TEKFAC scales are re-estimated as usual in the basis (identity on a diagonal side), from
per-example gradients formed in chunks. ``footprint`` gives the memory and eigendecomposition
work of a layer's curvature for ``summary()``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..curvature import CURVATURES
from ..exponent import powered
from .rows import example_blocks

WIDE_SIDE = ("diagonal", "identity", "skip")
_CHUNK_ELEMENTS = 1 << 24


def precondition_sides(V: torch.Tensor, QG: Optional[torch.Tensor], QA: Optional[torch.Tensor], *, damping: float,
                       scale: Optional[torch.Tensor] = None, eig_g: Optional[torch.Tensor] = None,
                       eig_a: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(U, <U, V>), U = Q_G [(Q_G^T V Q_A) / (S + damping)] Q_A^T where a basis given as None is
    the identity (never formed); S = ``scale`` or ``eig_g eig_a^T``."""
    dtype = (QG if QG is not None else QA if QA is not None else eig_g if eig_g is not None else scale).dtype
    R = V.to(dtype)
    if QG is not None:
        R = QG.t() @ R
    if QA is not None:
        R = R @ QA
    R = R / ((scale if scale is not None else torch.outer(eig_g, eig_a)) + damping)
    if QG is not None:
        R = QG @ R
    if QA is not None:
        R = R @ QA.t()
    return R, (R * V.to(dtype)).sum()


class SideRows:
    """A LayerBatch whose input and/or output factor is accumulated as its diagonal."""

    def __init__(self, batch, diagonal: Tuple[str, ...]):
        self.batch = batch
        self.diagonal = diagonal

    def __getattr__(self, name):
        return getattr(self.batch, name)

    @staticmethod
    def _diagonal(D: torch.Tensor, rows: torch.Tensor, beta: float, scale: float, weights) -> None:
        sq = rows.to(D.dtype).square()
        summed = sq.sum(0) if weights is None else weights.to(D.dtype) @ sq
        if beta == 0.0:
            D.copy_(summed).mul_(scale)
        else:
            D.mul_(beta).add_(summed, alpha=scale)

    def accumulate_input_factor(self, A: torch.Tensor, beta: float, scale: float, weights=None) -> None:
        if "input" not in self.diagonal:
            return self.batch.accumulate_input_factor(A, beta, scale, weights=weights)
        rows = self.batch.a_rows()
        if self.batch.bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        self._diagonal(A, rows, beta, scale, weights)

    def accumulate_output_factor(self, G: torch.Tensor, beta: float, scale: float, weights=None) -> None:
        if "output" not in self.diagonal:
            return self.batch.accumulate_output_factor(G, beta, scale, weights=weights)
        self._diagonal(G, self.batch.g_rows(), beta, scale, weights)


class WideSidesMixin:
    """A K-FAC-family curvature with some sides diagonal (or identity): ``adapter.wide_sides``
    and ``adapter.wide_policy`` are set at registration."""

    buffers: dict

    def __init__(self, adapter, dtype: torch.dtype, device: torch.device, **options):
        super().__init__(adapter, dtype, device, **options)
        self.diagonal: Tuple[str, ...] = tuple(adapter.wide_sides)
        self.identity = adapter.wide_policy == "identity"
        if "input" in self.diagonal:
            self.buffers["A"] = torch.zeros(adapter.d_in + int(adapter.has_bias), dtype=dtype, device=device)
        if "output" in self.diagonal:
            self.buffers["G"] = torch.zeros(adapter.d_out, dtype=dtype, device=device)
        self.basis_sides = tuple(s for s in ("input", "output") if s not in self.diagonal)

    def update_factors(self, batch, decay: float) -> None:
        super().update_factors(SideRows(batch, self.diagonal), decay)

    @property
    def basis_keys(self) -> Tuple[str, ...]:
        """The buffers set_bases sets (no basis on a diagonal side)."""
        return tuple(k for side, keys in (("input", ("QA", "eA")), ("output", ("QG", "eG"))) for k in keys
                     if not (side in self.diagonal and k.startswith("Q")))

    def buffer_shapes(self):
        shapes = super().buffer_shapes()
        for side, key in (("input", "A"), ("output", "G")):
            if side in self.diagonal:
                shapes[key] = tuple(self.buffers[key].shape)
        return shapes

    def basis_sources(self) -> List[torch.Tensor]:
        return [m for side, m in zip(("input", "output"), super().basis_sources()) if side not in self.diagonal]

    def set_bases(self, *eigs) -> None:
        full = iter(eigs)
        sides = []
        for side, key in (("input", "A"), ("output", "G")):
            if side in self.diagonal:
                d = self.buffers[key].clamp_min(0)
                sides.append((d.mean().expand_as(d).clone() if self.identity else d, None))
            else:
                sides.append(next(full))
        super().set_bases(*sides)

    @property
    def has_basis(self) -> bool:
        return self.buffers["eA"] is not None

    def _rotate(self, V: torch.Tensor, backend: str, **scaling) -> Tuple[torch.Tensor, torch.Tensor]:
        return precondition_sides(V, self.buffers["QG"], self.buffers["QA"], **powered(self.exponent, **scaling))

    def _accumulate_scales(self, batch, beta: float, alpha: float) -> None:
        """S <- beta S + alpha sum_i (Q_G^T dW_i Q_A)^2, per-example gradients in chunks."""
        S, QG, QA = self.buffers["S"], self.buffers["QG"], self.buffers["QA"]
        total = torch.zeros_like(S)
        step = max(1, _CHUNK_ELEMENTS // S.numel())
        for g, a in example_blocks(batch):
            g, a = g.to(S.dtype), a.to(S.dtype)
            if batch.bias:
                a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
            for start in range(0, g.shape[0], step):
                per_example = torch.einsum("ntg,nta->nga", g[start:start + step], a[start:start + step])
                if QG is not None:
                    per_example = QG.t() @ per_example
                if QA is not None:
                    per_example = per_example @ QA
                total += per_example.square().sum(0)
        if beta == 0.0:
            S.copy_(total).mul_(alpha)
        else:
            S.mul_(beta).add_(total, alpha=alpha)


WIDE_CURVATURES = {method: type(f"Wide{cls.__name__}", (WideSidesMixin, cls), {}) for method, cls in CURVATURES.items()}


def footprint(curvature) -> str:
    """'<sides>, <MB> MB, eigh <work>' of one layer's curvature (for ``summary()``)."""
    tensors = {id(t): t for t in curvature.buffers.values() if isinstance(t, torch.Tensor)}
    mb = sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20
    sources = curvature.basis_sources() if hasattr(curvature, "basis_sources") else []
    work = sum(float(m.shape[0]) ** 3 for m in sources)
    sides = getattr(curvature, "diagonal", ())
    kind = "" if not sides else f"{'/'.join(sides)} side {'identity' if curvature.identity else 'diagonal'}, "
    return f"{kind}{mb:.3g} MB, eigh {work / 1e6:.3g} Mflop"
