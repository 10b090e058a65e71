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

__all__ = ["block_adapters", "curvature_class"]


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


def curvature_class(adapter: LayerAdapter, method_class: type) -> type:
    """The curvature class of ``adapter`` under the method whose Linear curvature is ``method_class``."""
    if isinstance(adapter, NormAdapter):
        return DiagonalCurvature
    if isinstance(adapter, EmbeddingAdapter):
        method = next(m for m, cls in CURVATURES.items() if cls is method_class)
        return EMBEDDING_CURVATURES[method]
    return method_class
