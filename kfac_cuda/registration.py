"""Which of a model's modules are preconditioned, and why the others are not."""
from __future__ import annotations

import warnings
from typing import Dict, Iterable, List, Tuple

import torch
import torch.nn as nn

from .blocks import block_adapters, curvature_class
from .blocks.tied import tie_reason, tied_uses
from .curvature import KFACCurvature
from .layers import LayerAdapter, adapter_for

Layers = Dict[str, Tuple[LayerAdapter, KFACCurvature]]


def register_layers(model: nn.Module, curvature_cls: type, *, skip_modules: Iterable, max_factor_dim: int,
                    damping_style: str) -> Tuple[Layers, List[Tuple[str, str]]]:
    """Return ({name: (adapter, curvature)} for each supported layer, [(name, reason)] for
    each module with parameters that is not preconditioned)."""
    skip = list(skip_modules)

    def skipped(name: str, module: nn.Module) -> bool:
        return any(s == name or s is module or (isinstance(s, type) and isinstance(module, s)) for s in skip)

    def under(name: str, prefixes: List[str]) -> bool:
        return any(p == "" or name.startswith(p + ".") for p in prefixes)

    owners: Dict[int, List[str]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name or "<model>")
    layers: Layers = {}
    unsupported: List[Tuple[str, str]] = []
    tied: Dict[int, List[LayerAdapter]] = {}  # id(weight) -> the layers sharing it
    attention = [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    skipped_trees: List[str] = []
    for name, module in model.named_modules():
        if name not in attention and under(name, attention):
            continue  # e.g. out_proj: reported with its nn.MultiheadAttention
        if under(name, skipped_trees) or skipped(name, module):
            skipped_trees.append(name)
            if any(True for _ in module.parameters(recurse=False)):
                unsupported.append((name, "skipped by skip_modules"))
            continue
        blocks = block_adapters(name, module)
        if blocks is None:
            adapter, reason = adapter_for(name, module)
            blocks = ([] if adapter is None else [adapter]), reason
        adapters, reason = blocks
        if reason:
            unsupported.append((name, reason))
        for adapter in adapters:
            weight = adapter.module.weight
            if not weight.requires_grad:
                continue
            if len(owners[id(weight)]) > 1:  # e.g. a token embedding shared with the output head
                tied.setdefault(id(weight), []).append(adapter)
                continue
            side = getattr(adapter, "full_factor_side", max(adapter.d_in + int(adapter.has_bias), adapter.d_out))
            if side > max_factor_dim:
                unsupported.append((adapter.name, f"factor side {side} > max_factor_dim={max_factor_dim}"))
                continue
            dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
            layers[adapter.name] = (adapter, curvature_class(adapter, curvature_cls)(
                adapter, dtype, weight.device, damping_style=damping_style))
    for key, uses in tied.items():
        reason = tie_reason(uses, max_factor_dim) if len(uses) == len(owners[key]) else "not every use is a layer"
        if reason is not None:
            unsupported.extend((a.name, f"weight tied ({', '.join(owners[key])}): left to the base optimizer "
                                        f"({reason})") for a in uses)
            continue
        weight = uses[0].module.weight
        for use in tied_uses(uses, torch.float64 if weight.dtype == torch.float64 else torch.float32, weight.device):
            layers[use.adapter.name] = (use.adapter, use)
            if use.role == "head" and getattr(use.adapter.module, "bias", None) is not None:
                unsupported.append((use.adapter.name, "its bias is left to the base optimizer (tied weight)"))
    if not layers:
        warnings.warn("kfac_cuda: the model has no supported layer (nn.Linear, nn.Conv2d)", RuntimeWarning)
    return layers, unsupported


def summary(method: str, layers: Layers, unsupported: List[Tuple[str, str]]) -> str:
    """A table of the preconditioned layers and of those left to the plain optimizer."""
    lines = [f"kfac_cuda.Preconditioner(method={method!r}): {len(layers)} layers preconditioned"]
    for name, (adapter, _) in layers.items():
        lines.append(f"  + {name or '<model>'}: {type(adapter.module).__name__} "
                     f"{adapter.d_out}x{adapter.d_in}{' +bias' if adapter.has_bias else ''}")
    for name, reason in unsupported:
        lines.append(f"  - {name or '<model>'}: not preconditioned ({reason})")
    return "\n".join(lines)
