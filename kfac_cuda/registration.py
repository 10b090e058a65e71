"""Which of a model's modules are preconditioned, and why the others are not.

Policies (reported by ``summary()``, one line per parameter):
- frozen parameters (``requires_grad=False``) are left alone; a layer with a frozen weight is not
  preconditioned; a frozen bias is left out of its layer's block (the weight alone is preconditioned);
- with ``parameters`` (the optimizer's param groups), a layer whose weight is in none of them is not
  preconditioned, and a bias in none of them is left out of its layer's block;
- a tied parameter (the same tensor owned by two modules) is never preconditioned with one module's
  factors alone: a token embedding tied with one Linear output head gets one block with both uses'
  statistics (kfac_cuda/blocks/tied.py); any other tie is left to the base optimizer and reported
  as tied (a bias tied elsewhere is left out of its block).
"""
from __future__ import annotations

import warnings
from typing import Dict, Iterable, List, Optional, Set, Tuple

import torch
import torch.nn as nn

from .blocks import block_adapters, curvature_class, footprint, wide_sides
from .blocks.tied import tie_reason, tied_uses
from .curvature import KFACCurvature
from .layers import Conv2dAdapter, LayerAdapter, adapter_for

Layers = Dict[str, Tuple[LayerAdapter, KFACCurvature]]


def parameter_owners(model: nn.Module) -> Dict[int, List[str]]:
    """id(parameter) -> the names of the distinct modules that own it (more than one: tied)."""
    owners: Dict[int, List[str]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name or "<model>")
    return owners


def register_layers(model: nn.Module, curvature_cls: type, *, skip_modules: Iterable, max_factor_dim: int,
                    damping_style: str, wide_side: str = "diagonal", batch_dim: int = 0, per_token: bool = False,
                    parameters: Optional[Set[int]] = None) -> Tuple[Layers, List[Tuple[str, str]]]:
    """Return ({name: (adapter, curvature)} for each supported layer, [(name, reason)] for
    each module with parameters that is not preconditioned).

    Args:
        parameters: ids of the parameters being optimised (None: all of the model's).
    """
    skip = list(skip_modules)

    def skipped(name: str, module: nn.Module) -> bool:
        return any(s == name or s is module or (isinstance(s, type) and isinstance(module, s)) for s in skip)

    def under(name: str, prefixes: List[str]) -> bool:
        return any(p == "" or name.startswith(p + ".") for p in prefixes)

    owners = parameter_owners(model)

    def why_not(p: nn.Parameter, name: str) -> Optional[str]:
        """Why parameter ``p`` of layer ``name`` cannot be in its layer's block, or None."""
        if not p.requires_grad:
            return "frozen"
        if parameters is not None and id(p) not in parameters:
            return "in no param group of the optimizer"
        tied = [o for o in owners[id(p)] if o != (name or "<model>")]
        if tied:
            return f"tied with {', '.join(tied)}; left to the base optimizer"
        return None

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
        blocks = block_adapters(name, module, batch_dim)
        if blocks is None:
            adapter, reason = adapter_for(name, module, batch_dim)
            blocks = ([] if adapter is None else [adapter]), reason
        adapters, reason = blocks
        if reason:
            unsupported.append((name, reason))
        for adapter in adapters:
            weight, owner = adapter.module.weight, getattr(adapter, "owner", adapter.name)
            if weight.requires_grad and (parameters is None or id(weight) in parameters) and len(owners[id(weight)]) > 1:
                tied.setdefault(id(weight), []).append(adapter)  # e.g. a token embedding shared with the output head
                continue
            weight_reason = why_not(weight, owner)
            if weight_reason is not None:
                unsupported.append((adapter.name, f"weight {weight_reason}"))
                continue
            if per_token and isinstance(adapter, Conv2dAdapter):
                unsupported.append((name, "loss_terms='tokens' applies to sequence layers; a Conv2d's positions "
                                          "are not loss terms"))
                continue
            bias = getattr(adapter.module, "bias", None)
            if adapter.has_bias and bias is not None and why_not(bias, owner) is not None:
                adapter.has_bias = False  # the weight alone; the bias goes to the base optimizer
            side = getattr(adapter, "full_factor_side", max(adapter.d_in + int(adapter.has_bias), adapter.d_out))
            wide = wide_sides(adapter, max_factor_dim)
            if side > max_factor_dim and (wide_side == "skip" or not wide):
                unsupported.append((adapter.name, f"factor side {side} > max_factor_dim={max_factor_dim}"))
                continue
            if wide:  # a diagonal (or identity) factor on each wide side, the other side full
                adapter.wide_sides, adapter.wide_policy = wide, wide_side
            dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
            layers[adapter.name] = (adapter, curvature_class(adapter, curvature_cls)(
                adapter, dtype, weight.device, damping_style=damping_style))
    for key, uses in tied.items():
        reason = tie_reason(uses) if len(uses) == len(owners[key]) else "not every use is a layer"
        if reason is not None:
            others = lambda a: ", ".join(o for o in owners[key] if o != a.name)  # noqa: E731
            unsupported.extend((a.name, f"weight tied with {others(a)}; left to the base optimizer ({reason})")
                               for a in uses)
            continue
        weight = uses[0].module.weight
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        for use in tied_uses(uses, dtype, weight.device, max_factor_dim):
            layers[use.adapter.name] = (use.adapter, use)
            if use.role == "head" and getattr(use.adapter.module, "bias", None) is not None:
                unsupported.append((use.adapter.name, "its bias is left to the base optimizer (tied weight)"))
    if not layers:
        warnings.warn("kfac_cuda: the model has no supported layer (nn.Linear, nn.Conv2d)", RuntimeWarning)
    return layers, unsupported


def parameter_report(model: nn.Module, layers: Layers, unsupported: List[Tuple[str, str]],
                     parameters: Optional[Set[int]] = None) -> List[Tuple[str, str]]:
    """(parameter name, what happens to it) for every parameter of the model."""
    preconditioned = {id(p): name for name, (a, _) in layers.items() for p in a.parameters}
    reasons = dict(unsupported)
    owners = parameter_owners(model)
    report = []
    for pname, p in model.named_parameters():
        module = pname.rpartition(".")[0]
        if id(p) in preconditioned:
            status = f"preconditioned (layer {preconditioned[id(p)] or '<model>'})"
        elif not p.requires_grad:
            status = "frozen"
        elif parameters is not None and id(p) not in parameters:
            status = "not optimised (in no param group)"
        elif len(owners[id(p)]) > 1:
            status = f"tied ({', '.join(owners[id(p)])}): left to the base optimizer"
        elif _reason_of(module, reasons) is not None:
            status = f"left to the base optimizer ({_reason_of(module, reasons)})"
        elif module in layers:
            status = "left to the base optimizer (its layer is preconditioned without it)"
        else:
            status = "left to the base optimizer"
        report.append((pname, status))
    return report


def _reason_of(module: str, reasons: Dict[str, str]) -> Optional[str]:
    """The reason recorded for ``module`` or for the nearest module containing it (e.g. the
    nn.MultiheadAttention or skipped subtree an inner module belongs to)."""
    while True:
        if module in reasons:
            return reasons[module]
        if not module:
            return None
        module = module.rpartition(".")[0]


def summary(method: str, layers: Layers, unsupported: List[Tuple[str, str]],
            report: List[Tuple[str, str]]) -> str:
    """A table of the preconditioned layers, of those left to the plain optimizer, and of
    what happens to every parameter."""
    lines = [f"kfac_cuda.Preconditioner(method={method!r}): {len(layers)} layers preconditioned"]
    for name, (adapter, curvature) in layers.items():
        lines.append(f"  + {name or '<model>'}: {type(adapter.module).__name__} "
                     f"{adapter.d_out}x{adapter.d_in}{' +bias' if adapter.has_bias else ''} ({footprint(curvature)})")
    for name, reason in unsupported:
        lines.append(f"  - {name or '<model>'}: not preconditioned ({reason})")
    lines.append("parameters:")
    lines.extend(f"  {pname}: {status}" for pname, status in report)
    return "\n".join(lines)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / torch.compile wrappers (in any nesting), so that
    layer names, and checkpoints, do not depend on the wrapper."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
            model = model._orig_mod
        else:
            return model
