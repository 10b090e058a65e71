"""Curvature blocks for transformer layers beyond nn.Linear: embeddings (K-FAC with a diagonal
input factor), LayerNorm / RMSNorm (exact Fisher diagonal) and nn.MultiheadAttention (its
projections as K-FAC blocks). ``block_adapters`` says which modules are handled here and
``curvature_class`` which curvature each adapter gets."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch.nn as nn

from ..curvature import CURVATURES
from ..layers import LayerAdapter
from .attention import attention_adapters
from .embedding import EMBEDDING_CURVATURES, EmbeddingAdapter, embedding_reason
from .norms import DiagonalCurvature, NormAdapter, is_rms_norm, norm_reason
from .wide import WIDE_CURVATURES, WIDE_SIDE, footprint

__all__ = ["block_adapters", "curvature_class", "wide_sides", "WIDE_SIDE", "footprint"]


def block_adapters(name: str, module: nn.Module, *args) -> Optional[Tuple[List[LayerAdapter], Optional[str]]]:
    """None for modules not handled here; else (adapters, reason the module is not preconditioned or None)."""
    if isinstance(module, nn.MultiheadAttention):
        return attention_adapters(name, module), None
    if isinstance(module, nn.Embedding):
        reason = embedding_reason(module)
        return ([] if reason else [EmbeddingAdapter(name, module, *args)]), reason
    if isinstance(module, nn.LayerNorm) or is_rms_norm(module):
        if getattr(module, "weight", None) is None and getattr(module, "bias", None) is None:
            return [], None  # elementwise_affine=False: no parameters
        reason = norm_reason(module)
        return ([] if reason else [NormAdapter(name, module, *args)]), reason
    return None


def wide_sides(adapter: LayerAdapter, max_factor_dim: int) -> Tuple[str, ...]:
    """The sides ("input", "output") of a Kronecker-factored layer wider than ``max_factor_dim``
    (embeddings and norms have their own fixed structure: none)."""
    if isinstance(adapter, (NormAdapter, EmbeddingAdapter)):
        return ()
    dims = (("input", adapter.d_in + int(adapter.has_bias)), ("output", adapter.d_out))
    return tuple(side for side, d in dims if d > max_factor_dim)


def curvature_class(adapter: LayerAdapter, method_class: type) -> type:
    """The curvature class of ``adapter`` under the method whose Linear curvature is ``method_class``
    (``adapter.wide_sides``, when set, selects the per-side policy of blocks/wide.py)."""
    if isinstance(adapter, NormAdapter):
        return DiagonalCurvature
    method = next(m for m, cls in CURVATURES.items() if cls is method_class)
    if isinstance(adapter, EmbeddingAdapter):
        return EMBEDDING_CURVATURES[method]
    if getattr(adapter, "wide_sides", ()):
        return WIDE_CURVATURES[method]
    return method_class
