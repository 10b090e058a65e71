"""nn.MultiheadAttention (and so nn.TransformerEncoderLayer / DecoderLayer): its projections
preconditioned as K-FAC blocks.

The module keeps the q, k, v projections as raw parameters (packed ``in_proj_weight`` /
``in_proj_bias``, or ``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight`` when kdim/vdim
differ) and calls them, and ``out_proj``, functionally inside
``F.multi_head_attention_forward``, so no module hook sees their inputs and output gradients.
Here each projection is a K-FAC block of its own (Martens & Grosse 2015 for a linear layer;
Eschenhagen et al. 2023 for the positions of a sequence), exactly as if the attention had been
written with four nn.Linear layers:
- q block: rows [0, E) of the packed weight (and bias), input = query;
- k block: rows [E, 2E), input = key;  v block: rows [2E, 3E), input = value;
- out_proj: the nn.Linear ``out_proj``, input = the heads' concatenated output.
(In self-attention the q, k and v blocks have the same input factor; it is accumulated once per
block, which costs three d x d factors instead of one.)

How the rows are captured: on steps that capture, a forward hook on the attention module
recomputes its output through hookable calls -- q = F.linear(query, W_q, b_q) (and k, v) as calls
of small view modules, ``F.multi_head_attention_forward`` on the projected q, k, v with identity
projection weights (``use_separate_proj_weight=True``, no bias; multiplying by an identity matrix
is exact) and identity output projection, then ``out_proj`` as a module call -- and returns that
output in place of the original one, so the gradients flow through the captured calls. Masks,
``is_causal``, dropout, ``bias_k``/``bias_v``, ``add_zero_attn``, ``need_weights`` and
batch-first layouts are handled by torch's own function, unchanged. Costs on a capturing step:
the attention forward runs twice (the first result is discarded) and four E x E identity
products are added; other steps use the module's own forward untouched. Dropout draws new
masks in the recomputation (the discarded output used others). ``bias_k``/``bias_v`` stay
with the base optimizer (reported).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import LinearAdapter

_PROJECTIONS = ("q", "k", "v")


class ProjectionView(nn.Module):
    """One of q, k, v of a MultiheadAttention as a callable module (not registered in the
    model): ``forward(x) = F.linear(x, W_rows, b_rows)``. ``weight``/``bias`` are the attention's
    own parameters (the packed ones), so ``.grad`` and param-group look-ups see the real tensors."""

    def __init__(self, attention: nn.MultiheadAttention, index: int):
        super().__init__()
        self._attention = [attention]  # a list: not a registered submodule
        self.index = index
        self.rows = slice(index * attention.embed_dim, (index + 1) * attention.embed_dim)

    @property
    def attention(self) -> nn.MultiheadAttention:
        return self._attention[0]

    @property
    def packed(self) -> bool:
        return self.attention._qkv_same_embed_dim

    @property
    def weight(self) -> nn.Parameter:
        a = self.attention
        return a.in_proj_weight if self.packed else getattr(a, f"{_PROJECTIONS[self.index]}_proj_weight")

    @property
    def bias(self) -> Optional[nn.Parameter]:
        return self.attention.in_proj_bias

    def weight_rows(self) -> torch.Tensor:
        return self.weight[self.rows] if self.packed else self.weight

    def bias_rows(self) -> Optional[torch.Tensor]:
        return None if self.bias is None else self.bias[self.rows]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_rows(), self.bias_rows())


class ProjectionAdapter(LinearAdapter):
    """The q, k or v block of a MultiheadAttention: V = [dW_rows | db_rows]."""

    module: ProjectionView

    @property
    def d_out(self) -> int:
        return self.module.attention.embed_dim

    @property
    def d_in(self) -> int:
        return self.module.weight_rows().shape[1]

    @property
    def bias_shape(self):
        """The packed q/k/v bias this block takes rows of."""
        return (3 * self.module.attention.embed_dim,)

    def grad_matrix(self) -> torch.Tensor:
        view = self.module
        w = view.weight.grad[view.rows] if view.packed else view.weight.grad
        if not self.has_bias:
            return w
        return torch.cat([w, view.bias.grad[view.rows].reshape(-1, 1)], dim=1)

    def set_grad_matrix(self, U: torch.Tensor) -> None:
        view = self.module
        w = view.weight.grad[view.rows] if view.packed else view.weight.grad
        w.copy_(U[:, : self.d_in])
        if self.has_bias:
            view.bias.grad[view.rows].copy_(U[:, self.d_in])

    def bind(self, active) -> None:
        """Reroute the attention's forward only while ``active()`` (the capturing steps)."""
        reroute = getattr(self.module.attention, "_kfac_reroute", None)
        if reroute is not None:
            reroute.active = active

    def remove(self) -> None:
        """Stop rerouting the attention's forward (called by ``Preconditioner.remove``)."""
        reroute = getattr(self.module.attention, "_kfac_reroute", None)
        if reroute is not None:
            reroute.remove()


class AttentionReroute:
    """The forward hook that recomputes a MultiheadAttention's output through hookable calls
    while any of its projection views is hooked and ``active()`` (see the module docstring)."""

    def __init__(self, attention: nn.MultiheadAttention, views: List[ProjectionView]):
        self.attention = attention
        self.views = views
        self.active = lambda: True
        self._handle = attention.register_forward_hook(self._hook, with_kwargs=True)
        attention._kfac_reroute = self

    def remove(self) -> None:
        self._handle.remove()
        if getattr(self.attention, "_kfac_reroute", None) is self:
            del self.attention._kfac_reroute

    def _hook(self, module: nn.MultiheadAttention, args, kwargs, output):
        if (module is not self.attention or not torch.is_grad_enabled() or not any(v._forward_hooks for v in self.views)
                or not isinstance(output[0], torch.Tensor) or not output[0].requires_grad):
            return None
        bound = dict(zip(("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                          "average_attn_weights", "is_causal"), args))
        bound.update(kwargs)
        query = bound["query"]
        if torch._C._functorch.is_functorch_wrapped_tensor(query) or not self.active():
            return None
        return self.recompute(module, **bound)

    def recompute(self, m: nn.MultiheadAttention, query, key, value, key_padding_mask=None, need_weights=True,
                  attn_mask=None, average_attn_weights=True, is_causal=False):
        """The module's output through hookable projection calls, whose inputs are always
        batch-first (n, T, E): sequence-first inputs are transposed, an unbatched one is one example."""
        batched = query.dim() == 3
        if not batched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not m.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = (view(x).transpose(0, 1) for view, x in zip(self.views, (query, key, value)))  # sequence-first
        E = m.embed_dim
        eye = torch.eye(E, dtype=q.dtype, device=q.device)
        heads, weights = F.multi_head_attention_forward(
            q, k, v, E, m.num_heads, None, None, m.bias_k, m.bias_v, m.add_zero_attn, m.dropout, eye, None,
            training=m.training, key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        out = m.out_proj(heads.transpose(0, 1))  # batch-first rows for out_proj too
        if not batched:
            return out.squeeze(0), (None if weights is None else weights.squeeze(0))
        return (out if m.batch_first else out.transpose(0, 1)), weights


def attention_adapters(name: str, module: nn.MultiheadAttention) -> List[LinearAdapter]:
    """The q, k, v blocks and out_proj of a MultiheadAttention (rerouting hook installed). Their
    rows are batch-first whatever the module's layout (the recomputation transposes)."""
    existing = getattr(module, "_kfac_reroute", None)
    if existing is not None:
        existing.remove()
    views = [ProjectionView(module, i) for i in range(3)]
    AttentionReroute(module, views)
    prefix = f"{name}." if name else ""
    adapters: List[LinearAdapter] = [ProjectionAdapter(f"{prefix}in_proj.{p}", v) for p, v in zip(_PROJECTIONS, views)]
    for adapter in adapters:
        adapter.owner = name  # the module that owns the packed parameters
    adapters.append(LinearAdapter(f"{prefix}out_proj", module.out_proj))
    return adapters
