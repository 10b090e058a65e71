"""nn.Embedding: K-FAC with a diagonal input factor.

An embedding is a linear layer on one-hot inputs, y = E^T e_tok (E: num_embeddings x
embedding_dim), so its K-FAC block is A (x) G with A = E[abar abar^T] over one-hot rows:
A is diagonal -- the token frequencies -- and storing its diagonal loses nothing
(no num_embeddings^2 matrix is ever formed). G = E[g g^T] over the output gradients is a
full factor, exactly as for nn.Linear (Martens & Grosse 2015; the diagonal input factor of
embeddings as in kfac-jax's dense/embedding blocks and in Eschenhagen et al. 2023 for
weight sharing). The layer's gradient matrix is V = dE^T (embedding_dim x num_embeddings),
so the input side is the vocabulary and the output side the embedding dimension.

With weight sharing (T tokens per example) the rows follow batch.py: ``expand`` counts
every token, A = diag(count_k) / (n T); ``reduce`` averages the one-hot rows over positions,
abar_i = c_i / T, and keeps the (exact) diagonal of A = E_i[abar_i abar_i^T]. With one token
per example and one example, A (x) G is the dense Fisher block itself (tested). An embedding
called on indices without the batch dimension and broadcast over the batch afterwards (a
position embedding called on ``arange(T)``) only ever sees the batch-summed output gradient:
its statistics are those of one example carrying that sum (the per-example gradients are
gone before the layer). Pass the indices with the batch dimension (``arange(T).expand(n, T)``)
for the per-example statistics.

Methods: K-FAC / TKFAC use the diagonal input factor with the output factor's eigenbasis
(the input basis is the identity); EKFAC / TEKFAC re-estimate the scales in that basis,
S = E_i[(Q_G^T dW_i^T)^2] with dW_i^T = sum_t g_it e_tok_it^T formed by scatter-add per
example (in chunks), which is the diagonal of the dense Fisher in the basis (tested).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from ..curvature import CURVATURES
from ..exponent import powered
from ..layers import TransposedLinearAdapter
from .rows import example_blocks
from .wide import precondition_sides

_CHUNK_ELEMENTS = 1 << 24  # per-example gradients materialised at once for the scales


class EmbeddingAdapter(TransposedLinearAdapter):
    """nn.Embedding (dense gradients): V = dE^T of shape (embedding_dim, num_embeddings) -- its
    weight is stored (d_in, d_out) = (num_embeddings, embedding_dim), as transformers' Conv1D."""

    def __init__(self, name: str, module: nn.Embedding, *args):
        super().__init__(name, module, *args)
        self.has_bias = False

    @property
    def full_factor_side(self) -> int:
        """The only full factor is the output side (embedding_dim)."""
        return self.d_out

    def batch_size(self, x: torch.Tensor) -> int:
        """Examples in an index tensor: its ``batch_dim`` (a 1-D input is one sequence)."""
        return x.shape[self.batch_dim] if x.dim() > 1 else 1

    def token_count(self, x: torch.Tensor) -> int:
        """Tokens in an index tensor (the loss terms of a per-token loss)."""
        return x.numel()

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """Token indices as (n, T, 1) rows."""
        if x.dim() > 1 and self.batch_dim:
            x = x.movedim(self.batch_dim, 0)
        return x.reshape(x.shape[0] if x.dim() > 1 else 1, -1, 1)

    def output_grads(self, g: torch.Tensor) -> torch.Tensor:
        """(n, T, d) rows, n following the indices (one more dim than them): an index tensor
        without a batch dim is one example."""
        if g.dim() > 2 and self.batch_dim:
            g = g.movedim(self.batch_dim, 0)
        return g.reshape(g.shape[0] if g.dim() > 2 else 1, -1, g.shape[-1])


class TokenRows:
    """A LayerBatch of an embedding seen through one-hot rows: the input-side factor is
    accumulated as its diagonal (token counts); the output side is the LayerBatch's own."""

    def __init__(self, batch, vocab: int):
        self.batch = batch
        self.vocab = vocab
        self.n = batch.n
        self.backend = batch.backend
        self.blocks: List[Tuple[torch.Tensor, torch.Tensor]] = [(g, a[..., 0]) for g, a in example_blocks(batch)]
        self.reduce = batch.sharing == "reduce"

    @property
    def a_norm(self) -> float:
        return self.batch.a_norm

    def _reduced_rows(self) -> torch.Tensor:
        """(n, vocab): abar_i = c_i / T, the one-hot rows averaged over positions."""
        rows = []
        for _, tok in self.blocks:
            counts = torch.zeros(tok.shape[0], self.vocab, dtype=self.batch.dtype, device=tok.device)
            counts.scatter_add_(1, tok, torch.ones_like(tok, dtype=counts.dtype))
            rows.append(counts / tok.shape[1])
        return torch.cat(rows)

    def _tokens(self) -> torch.Tensor:
        return torch.cat([tok.reshape(-1) for _, tok in self.blocks])

    def accumulate_input_factor(self, A: torch.Tensor, beta: float, scale: float,
                                weights: Optional[torch.Tensor] = None) -> None:
        """diag(A) <- beta diag(A) + scale * sum_r w_r abar_r^2 (A is stored as its diagonal)."""
        if beta == 0.0:
            A.zero_()
        else:
            A.mul_(beta)
        if self.reduce:
            rows = self._reduced_rows().square()
            w = torch.ones(rows.shape[0], dtype=A.dtype, device=A.device) if weights is None else weights.to(A.dtype)
            A.add_(w @ rows, alpha=scale)
        else:
            tok = self._tokens()
            w = torch.ones(tok.shape[0], dtype=A.dtype, device=A.device) if weights is None else weights.to(A.dtype)
            A.index_add_(0, tok, w, alpha=scale)

    def accumulate_output_factor(self, G: torch.Tensor, beta: float, scale: float,
                                 weights: Optional[torch.Tensor] = None) -> None:
        self.batch.accumulate_output_factor(G, beta, scale, weights=weights)

    def g_row_sq_norms(self) -> torch.Tensor:
        return self.batch.g_row_sq_norms()

    def a_row_sq_norms(self) -> torch.Tensor:
        """|abar_r|^2: 1 for an expanded one-hot row, |c_i / T|^2 for a reduced one."""
        if self.reduce:
            return self._reduced_rows().square().sum(-1)
        return torch.ones(self._tokens().shape[0], dtype=self.batch.dtype, device=self._tokens().device)

    def scale_sums(self, QG: torch.Tensor) -> torch.Tensor:
        """sum_i (Q_G^T dW_i^T)^2, shape (embedding_dim, vocab), dW_i^T = sum_t g_it e_tok_it^T."""
        d = QG.shape[0]
        out = torch.zeros(d, self.vocab, dtype=QG.dtype, device=QG.device)
        step = max(1, _CHUNK_ELEMENTS // (d * self.vocab))
        for g, tok in self.blocks:
            projected = g.to(QG.dtype) @ QG  # (n, T, d): (Q_G^T g_it) as rows
            for start in range(0, g.shape[0], step):
                p, t = projected[start:start + step], tok[start:start + step]
                per_example = torch.zeros(p.shape[0], self.vocab, d, dtype=QG.dtype, device=QG.device)
                per_example.scatter_add_(1, t.unsqueeze(-1).expand(-1, -1, d), p)
                out += per_example.square().sum(0).t()
        return out


class DiagonalInputMixin:
    """A K-FAC-family curvature whose input-side factor is stored as its diagonal: the input
    basis is the identity and the input eigenvalues are the diagonal itself."""

    basis_sides = ("output",)
    buffers: dict

    def __init__(self, adapter: EmbeddingAdapter, dtype: torch.dtype, device: torch.device, **options):
        super().__init__(adapter, dtype, device, **options)
        self.buffers["A"] = torch.zeros(adapter.d_in, dtype=dtype, device=device)

    def update_factors(self, batch, decay: float) -> None:
        super().update_factors(TokenRows(batch, self.adapter.d_in), decay)

    def basis_sources(self) -> List[torch.Tensor]:
        return [super().basis_sources()[1]]

    basis_keys = ("eA", "QG", "eG")  # no input basis: the identity

    def buffer_shapes(self):
        shapes = super().buffer_shapes()
        shapes["A"] = (self.adapter.d_in,)
        return shapes

    def set_bases(self, output_eig) -> None:
        super().set_bases((self.buffers["A"].clamp_min(0), None), output_eig)

    @property
    def has_basis(self) -> bool:
        return self.buffers["QG"] is not None

    def _rotate(self, V: torch.Tensor, backend: str, **scaling) -> Tuple[torch.Tensor, torch.Tensor]:
        return precondition_sides(V, self.buffers["QG"], None, **powered(self.exponent, **scaling))

    def _accumulate_scales(self, batch, beta: float, alpha: float) -> None:
        S = self.buffers["S"]
        sums = TokenRows(batch, self.adapter.d_in).scale_sums(self.buffers["QG"])
        if beta == 0.0:
            S.copy_(sums).mul_(alpha)
        else:
            S.mul_(beta).add_(sums, alpha=alpha)


EMBEDDING_CURVATURES = {method: type(f"Embedding{cls.__name__}", (DiagonalInputMixin, cls), {})
                        for method, cls in CURVATURES.items()}


def embedding_reason(module: nn.Embedding) -> Optional[str]:
    """Why an embedding cannot be preconditioned, or None."""
    if module.sparse:
        return "nn.Embedding(sparse=True) has sparse gradients, which are not supported"
    return None
