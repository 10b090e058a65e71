"""Which of a model's modules are preconditioned, and why the others are not.

Policies (reported by ``summary()``, one line per parameter):
- frozen parameters (``requires_grad=False``) are left alone; a layer with a frozen weight is not
  preconditioned; a frozen bias is left out of its layer's block (the weight alone is preconditioned);
- with ``parameters`` (the optimizer's param groups), a layer whose weight is in none of them is not
  preconditioned, and a bias in none of them is left out of its layer's block;
- a tied parameter (the same tensor owned by two modules, e.g. a token embedding shared with the
  output head) is never preconditioned with one module's factors alone: its layer is left to the base
  optimizer and reported as tied (a bias tied elsewhere is left out of its block).
"""
from __future__ import annotations

import warnings
from typing import Dict, Iterable, List, Optional, Set, Tuple

import torch
import torch.nn as nn

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
                    damping_style: str, batch_dim: int = 0, per_token: bool = False,
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
    attention = [name for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    skipped_trees: List[str] = []
    for name, module in model.named_modules():
        if under(name, attention):
            continue  # e.g. out_proj: reported with its nn.MultiheadAttention
        if under(name, skipped_trees) or skipped(name, module):
            skipped_trees.append(name)
            if any(True for _ in module.parameters(recurse=False)):
                unsupported.append((name, "skipped by skip_modules"))
            continue
        adapter, reason = adapter_for(name, module, batch_dim)
        if adapter is None:
            if reason:
                unsupported.append((name, reason))
            continue
        weight_reason = why_not(module.weight, name)
        if weight_reason is not None:
            unsupported.append((name, f"weight {weight_reason}"))
            continue
        if per_token and isinstance(adapter, Conv2dAdapter):
            unsupported.append((name, "loss_terms='tokens' applies to sequence layers; a Conv2d's positions "
                                      "are not loss terms"))
            continue
        if module.bias is not None and why_not(module.bias, name) is not None:
            adapter.has_bias = False  # the weight alone; the bias goes to the base optimizer
        side = max(adapter.d_in + int(adapter.has_bias), adapter.d_out)
        if side > max_factor_dim:
            unsupported.append((name, f"factor side {side} > max_factor_dim={max_factor_dim}"))
            continue
        dtype = torch.float64 if module.weight.dtype == torch.float64 else torch.float32
        layers[name] = (adapter, curvature_cls(adapter, dtype, module.weight.device, damping_style=damping_style))
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
    for name, (adapter, _) in layers.items():
        lines.append(f"  + {name or '<model>'}: {type(adapter.module).__name__} "
                     f"{adapter.d_out}x{adapter.d_in}{' +bias' if adapter.has_bias else ''}")
    for name, reason in unsupported:
        lines.append(f"  - {name or '<model>'}: not preconditioned ({reason})")
    lines.append("parameters:")
    lines.extend(f"  {pname}: {status}" for pname, status in report)
    return "\n".join(lines)
