"""A token embedding tied with the output head (``head.weight is emb.weight``): one parameter,
one curvature block with both uses' statistics.

Write the shared parameter as M (vocab x d), the embedding's storage. The output head
(a Linear d -> vocab) sees M as its weight: its K-FAC block is A_h (x) G_h with A_h = E[h h^T]
over its inputs (d side) and G_h = E[g g^T] over the logits' gradients (vocab side). The
embedding sees M^T: its block (embedding.py) in M's orientation is G_e (x) D_e, with G_e over
the embedding outputs' gradients (d side) and D_e = diag(token frequencies) (vocab side). So
the embedding's input side is the head's output side, and the tied block is the sum

    F ~ A_h (x) G_h + G_e (x) D_e        (vec stacks the columns of M; left factor on the d side)

(the cross terms between the two uses are dropped, as K-FAC drops cross-layer terms). A sum of
two Kronecker products has no Kronecker inverse; the block uses the eigenbases of its two
partial traces, X = tr(G_h) A_h + tr(D_e) G_e (d side) and Y = tr(A_h) G_h + tr(G_e) D_e (vocab
side) -- for a single term these are K-FAC's own bases -- and the exact diagonal of the sum in
that basis, S = diag(Q_Y^T G_h Q_Y) diag(Q_X^T A_h Q_X)^T + diag(Q_Y^T D_e Q_Y) diag(Q_X^T G_e Q_X)^T,
as an EKFAC-style rescaling: U = Q_Y [(Q_Y^T V Q_X) / (S + damping)] Q_X^T, with V the tied
gradient (the sum of both uses' gradients, as autograd accumulates it). Where the two terms
share eigenbases (e.g. one use alone) this is the exact inverse of the damped sum. The block is
the same under every method (the factors are K-FAC's; TKFAC's trace weighting and EKFAC's
re-estimated scales are not applied to the tied parameter). A head bias is left to the base
optimizer. A vocabulary wider than ``max_factor_dim`` keeps G_h as its diagonal and the
vocabulary side's basis is the identity (the wide-side policy of wide.py).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..layers import LayerAdapter
from .embedding import EmbeddingAdapter, TokenRows
from .wide import SideRows


class TiedEmbeddingHead:
    """The shared state of a tied embedding/head parameter (see the module docstring)."""

    def __init__(self, vocab: int, d: int, dtype: torch.dtype, device: torch.device, vocab_diagonal: bool = False):
        zeros = dict(dtype=dtype, device=device)
        self.dtype = dtype
        self.vocab_diagonal = vocab_diagonal  # G_h kept as its diagonal (a vocabulary wider than max_factor_dim)
        self.exponent = 1.0  # the step is (F^ + damping I)^(-exponent) V (see kfac_cuda/exponent.py)
        self.buffers = {"A_h": torch.zeros(d, d, **zeros), "G_h": torch.zeros(vocab, *(() if vocab_diagonal else (vocab,)), **zeros),
                        "G_e": torch.zeros(d, d, **zeros), "D_e": torch.zeros(vocab, **zeros),
                        "QX": None, "QY": None, "S": None}
        self.initialized = {"head": False, "embedding": False}
        self.eigh_failures = 0

    @property
    def factors_initialized(self) -> bool:
        return all(self.initialized.values())

    def partial_traces(self) -> List[torch.Tensor]:
        """[X (d side), Y (vocab side)] whose eigenbases the block uses (X alone when the vocabulary
        side is diagonal: its basis is the identity)."""
        b = self.buffers
        trace_gh = b["G_h"].sum() if self.vocab_diagonal else b["G_h"].trace()
        X = b["A_h"] * trace_gh + b["G_e"] * b["D_e"].sum()
        if self.vocab_diagonal:
            return [X]
        return [X, b["G_h"] * b["A_h"].trace() + torch.diag(b["D_e"]) * b["G_e"].trace()]

    def set_bases(self, x_eig, y_eig=None) -> None:
        b = self.buffers
        QX, QY = x_eig[1], None if y_eig is None else y_eig[1]
        diag_in = lambda Q, M: (Q * (M @ Q)).sum(0)  # noqa: E731  diag(Q^T M Q)
        head_y = b["G_h"] if QY is None else diag_in(QY, b["G_h"])
        embedding_y = b["D_e"] if QY is None else (QY.square() * b["D_e"].unsqueeze(1)).sum(0)
        b["S"] = (torch.outer(head_y, diag_in(QX, b["A_h"])) + torch.outer(embedding_y, diag_in(QX, b["G_e"]))).clamp_min(0)
        b["QX"], b["QY"] = QX, QY

    def precondition(self, M: torch.Tensor, damping: float) -> torch.Tensor:
        """U for the tied gradient in M's orientation (vocab x d)."""
        b = self.buffers
        M = M.to(self.dtype)
        denominator = (b["S"] + damping).pow(self.exponent)
        if b["QY"] is None:  # identity basis on a diagonal vocabulary side
            return ((M @ b["QX"]) / denominator) @ b["QX"].t()
        return b["QY"] @ ((b["QY"].t() @ M @ b["QX"]) / denominator) @ b["QX"].t()


class TiedUse:
    """One use (``role`` "head" or "embedding") of a tied parameter, as the Preconditioner sees a
    layer: the use's own factors are accumulated from its own captured batch; the basis, the
    scales and the step come from the shared :class:`TiedEmbeddingHead`. The head use owns the
    basis refresh and the KL-clipping sum (the embedding use reports <U, V> = 0, its U is the same)."""

    def __init__(self, shared: TiedEmbeddingHead, role: str, adapter: LayerAdapter):
        self.shared = shared
        self.role = role
        self.adapter = adapter
        self.dtype = shared.dtype
        self.dim = shared.buffers["A_h"].shape[0] * shared.buffers["D_e"].shape[0]
        self.grad_shape = (adapter.d_out, adapter.d_in)
        self.basis_sides = ("input (d side)", "output (vocab side)") if role == "head" else ()
        self.diagonal = ("output",) if role == "head" and shared.vocab_diagonal else ()
        self.identity = False

    @property
    def buffers(self) -> dict:
        """The shared block's buffers, held (checkpointed, snapshotted) by the head use alone."""
        return self.shared.buffers if self.role == "head" else {}

    @property
    def exponent(self) -> float:
        return self.shared.exponent

    @exponent.setter
    def exponent(self, value: float) -> None:
        self.shared.exponent = value

    @property
    def factors_initialized(self) -> bool:
        return self.shared.factors_initialized

    @property
    def eigh_failures(self) -> int:
        return self.shared.eigh_failures

    @eigh_failures.setter
    def eigh_failures(self, value: int) -> None:
        self.shared.eigh_failures = value

    def _names(self) -> Tuple[str, str]:
        return ("A_h", "G_h") if self.role == "head" else ("D_e", "G_e")

    def update_factors(self, batch, decay: float) -> None:
        beta = decay if self.shared.initialized[self.role] else 0.0
        inp, out = (self.shared.buffers[k] for k in self._names())
        if self.role == "embedding":
            batch = TokenRows(batch, self.adapter.d_in)
        elif self.diagonal:
            batch = SideRows(batch, self.diagonal)
        batch.accumulate_input_factor(inp, beta, (1 - beta) * batch.a_norm)
        batch.accumulate_output_factor(out, beta, (1 - beta) / batch.n)
        self.shared.initialized[self.role] = True

    def synced_factors(self) -> List[torch.Tensor]:
        return [self.shared.buffers[k] for k in self._names()]

    def zero_synced_factors(self) -> None:
        for t in self.synced_factors():
            t.zero_()
        self.shared.initialized[self.role] = True

    def zero_synced_scales(self) -> None:
        """The scales follow the factors."""

    def basis_sources(self) -> List[torch.Tensor]:
        return self.shared.partial_traces() if self.role == "head" else []

    def set_bases(self, *eigs) -> None:
        if self.role == "head":
            self.shared.set_bases(*eigs)

    @property
    def has_basis(self) -> bool:
        return self.shared.buffers["QX"] is not None

    def eigenbasis(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(output side, input side) of this use's gradient: (Q_Y, Q_X) for the head (vocab x d),
        (Q_X, Q_Y) for the embedding (d x vocab); Q_Y is None (identity) on a diagonal vocabulary side."""
        b = self.shared.buffers
        return (b["QY"], b["QX"]) if self.role == "head" else (b["QX"], b["QY"])

    def update_scales(self, batch, decay: float, fresh: bool, restart: str = "kronecker") -> None:
        """The scales follow the factors (set with the bases)."""

    def synced_scales(self) -> List[torch.Tensor]:
        return []

    def natural_damping(self) -> Optional[float]:
        return self.shared.buffers["S"].mean().item()

    def precondition(self, V: torch.Tensor, damping: float, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.role == "head":
            U = self.shared.precondition(V, damping)
            return U, (U * V.to(U.dtype)).sum()
        U = self.shared.precondition(V.t(), damping).t()
        return U, U.new_zeros(())

    # --- transactions and checkpoints (the head use holds the shared state) --------------------
    @property
    def basis_keys(self) -> Tuple[str, ...]:
        if self.role != "head":
            return ()
        return ("QX", "S") if self.shared.vocab_diagonal else ("QX", "QY", "S")

    def snapshot(self) -> dict:
        if self.role != "head":
            return {}
        return {"buffers": {k: (v if v is None or k in ("QX", "QY", "S") else v.clone()) for k, v in self.buffers.items()},
                "initialized": dict(self.shared.initialized)}

    def restore(self, snapshot: dict) -> None:
        if self.role == "head":
            self.shared.buffers = dict(snapshot["buffers"])
            self.shared.initialized = dict(snapshot["initialized"])

    def finite(self) -> torch.Tensor:
        flags = [torch.isfinite(v).all() for v in self.buffers.values() if v is not None]
        return torch.stack(flags).all() if flags else torch.tensor(True)

    def buffer_shapes(self) -> dict:
        if self.role != "head":
            return {}
        vocab, d = self.shared.buffers["D_e"].shape[0], self.shared.buffers["A_h"].shape[0]
        return {"A_h": (d, d), "G_h": tuple(self.shared.buffers["G_h"].shape), "G_e": (d, d), "D_e": (vocab,),
                "QX": (d, d), "QY": (vocab, vocab), "S": (vocab, d)}

    def state_dict(self) -> dict:
        return {"buffers": {k: (None if v is None else v.clone()) for k, v in self.buffers.items()},
                "factors_initialized": self.factors_initialized, "initialized": dict(self.shared.initialized),
                "eigh_failures": self.shared.eigh_failures}

    def load_state_dict(self, state: dict) -> None:
        """Load a state validated by :func:`kfac_cuda.checkpoint.check_curvature_state`."""
        if self.role != "head":
            return
        like = self.shared.buffers["A_h"]
        for k, v in state["buffers"].items():
            self.shared.buffers[k] = None if v is None else v.to(device=like.device, dtype=like.dtype).clone()
        self.shared.initialized.update(state.get("initialized", {}))
        self.shared.eigh_failures = state["eigh_failures"]


def tie_reason(adapters: List[LayerAdapter]) -> Optional[str]:
    """Why the adapters sharing one weight cannot form a tied embedding/head block, or None."""
    kinds = sorted(type(a).__name__ for a in adapters)
    if len(adapters) != 2 or not any(isinstance(a, EmbeddingAdapter) for a in adapters) or \
            not any(type(a).__name__ == "LinearAdapter" for a in adapters):
        return f"weight tied between {kinds}: only an embedding tied with one Linear head is supported"
    return None


def tied_uses(adapters: List[LayerAdapter], dtype: torch.dtype, device: torch.device,
              max_factor_dim: int) -> List[TiedUse]:
    """The two uses of one tied embedding/head parameter, sharing one block (the head first); a
    vocabulary wider than ``max_factor_dim`` keeps the vocabulary side diagonal (blocks/wide.py)."""
    embedding = next(a for a in adapters if isinstance(a, EmbeddingAdapter))
    head = next(a for a in adapters if a is not embedding)
    head.has_bias = False  # the shared weight alone; a head bias goes to the base optimizer
    shared = TiedEmbeddingHead(embedding.d_in, embedding.d_out, dtype, device,
                               vocab_diagonal=embedding.d_in > max_factor_dim)
    return [TiedUse(shared, "head", head), TiedUse(shared, "embedding", embedding)]
