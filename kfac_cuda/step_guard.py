"""What the Preconditioner's step checks before and after it changes anything: layers whose
parameters changed shape, non-finite gradients and activations, and curvature or
preconditioned gradients that an update would leave non-finite (then put back from a snapshot)."""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .batch import LayerBatch
from .registration import Layers


def check_shapes(layers: Layers, names: Sequence[str]) -> None:
    """Refuse layers whose parameters were replaced by ones of another shape."""
    for n in names:
        adapter, curvature = layers[n]
        want = curvature.grad_shape
        got = (adapter.d_out, adapter.d_in + int(adapter.has_bias))
        bias = getattr(adapter.module, "bias", None)
        bias_shape = getattr(adapter, "bias_shape", (adapter.d_out,))  # attention: the packed q/k/v bias
        if got != want or (adapter.has_bias and (bias is None or tuple(bias.shape) != bias_shape)):
            raise ValueError(f"kfac_cuda: layer {n!r} changed shape since the Preconditioner was built "
                             f"(weight {tuple(adapter.module.weight.shape)}, gradient matrix {got}, "
                             f"curvature for {want}): build a new optimizer for the new model")


def snapshot(layers: Layers, names: Sequence[str]) -> Dict[str, dict]:
    return {n: layers[n][1].snapshot() for n in names}


def restore(layers: Layers, snapshots: Dict[str, dict]) -> None:
    for n, snap in snapshots.items():
        layers[n][1].restore(snap)


def nonfinite_inputs(batches: Dict[str, LayerBatch], params: Iterable[Tuple[str, torch.Tensor]]) -> List[str]:
    """Names of the non-finite captured activations and gradients of the named ``params`` (one
    host sync). The layers' gradient matrices are not checked again: they are copies of their
    parameters' gradients, which ``params`` must hold (each is read once)."""
    items: Dict[str, List[torch.Tensor]] = {}
    for n, b in batches.items():
        items[f"activations or output gradients of {n!r}"] = b.tensors()
    seen = set()
    for name, p in params:
        if p.grad is not None and id(p) not in seen:
            seen.add(id(p))
            items[f"gradient of {name!r}"] = [p.grad]
    return nonfinite({k: torch.stack([torch.isfinite(t).all() for t in ts]).all() for k, ts in items.items() if ts})


def nonfinite_curvature(layers: Layers, updated: Sequence[str], results,
                        state: Optional[Dict[str, torch.Tensor]] = None) -> List[str]:
    """Layers whose updated curvature, whose (U, <U, V>) or whose pending optimizer ``state``
    (per-layer finiteness flags, e.g. eigenbasis moments) is not finite (one host sync)."""
    items = {n: layers[n][1].finite() for n in updated}
    for flags in ({n: torch.isfinite(U).all() & torch.isfinite(dot).all() for n, (U, dot) in results.items()},
                  state or {}):
        for n, finite in flags.items():
            items[n] = items[n] & finite if n in items else finite
    return nonfinite(items)


def nonfinite(flags: Dict[str, torch.Tensor]) -> List[str]:
    """The names whose flag is False (one host sync)."""
    if not flags:
        return []
    ok = torch.stack(list(flags.values())).tolist()
    return [name for name, good in zip(flags, ok) if not good]
