"""The Preconditioner's checkpoint: method, step counter and every layer's curvature.

Loading is two-phase: :func:`check_curvature_state` validates the whole checkpoint (method,
layer names, every buffer's presence, shape, dtype and finiteness, the counters) and only
then returns the function that loads it, so a bad checkpoint raises with nothing changed.
"""
from __future__ import annotations

import numbers
from typing import Callable, Dict

import torch

from .curvature import KFACCurvature


def curvature_state(method: str, steps: int, curvatures: Dict[str, KFACCurvature]) -> dict:
    """Everything needed to resume exactly: factors, bases, scales and counters."""
    return {"method": method, "steps": steps, "layers": {n: c.state_dict() for n, c in curvatures.items()}}


def _count(what: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"checkpoint {what} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_layer(name: str, curvature: KFACCurvature, state) -> None:
    where = f"checkpoint layer {name!r}"
    if not isinstance(state, dict) or not {"buffers", "factors_initialized", "eigh_failures"} <= set(state):
        raise ValueError(f"{where}: expected a dict with 'buffers', 'factors_initialized' and 'eigh_failures'")
    buffers = state["buffers"]
    if not isinstance(buffers, dict) or set(buffers) != set(curvature.buffers):
        got = sorted(buffers) if isinstance(buffers, dict) else type(buffers).__name__
        raise ValueError(f"{where}: buffers {got} differ from the {type(curvature).__name__}'s "
                         f"{sorted(curvature.buffers)} (a checkpoint of another method?)")
    shapes = curvature.buffer_shapes()
    for key, value in buffers.items():
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
            kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{where}: buffer {key!r} must be a real floating-point tensor, got {kind}")
        if tuple(value.shape) != shapes[key]:
            raise ValueError(f"{where}: buffer {key!r} has shape {tuple(value.shape)}, the model's layer needs "
                             f"{shapes[key]} (a checkpoint of a model of another width?)")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{where}: buffer {key!r} is not finite")
    if not isinstance(state["factors_initialized"], bool):
        raise ValueError(f"{where}: factors_initialized must be a bool")
    _count(f"layer {name!r} eigh_failures", state["eigh_failures"])
    basis_keys = getattr(curvature, "basis_keys", ("QA", "eA", "QG", "eG"))  # set together by set_bases
    bases = {k: buffers[k] is None for k in basis_keys}
    if len(set(bases.values())) > 1:
        raise ValueError(f"{where}: eigenbases only partly present ({[k for k, none in bases.items() if none]} missing)")


def check_curvature_state(method: str, curvatures: Dict[str, KFACCurvature], state) -> Callable[[], int]:
    """Validate ``state`` entirely; return the function that loads it into the curvatures
    and returns the step counter."""
    if not isinstance(state, dict) or not {"method", "steps", "layers"} <= set(state):
        raise ValueError("not a kfac_cuda Preconditioner checkpoint: expected a dict with 'method', 'steps', 'layers'")
    if state["method"] != method:
        raise ValueError(f"checkpoint is for method {state['method']!r}, not {method!r}")
    steps = _count("steps", state["steps"])
    layers = state["layers"]
    if not isinstance(layers, dict) or set(layers) != set(curvatures):
        names = set(layers) if isinstance(layers, dict) else set()
        raise KeyError(f"checkpoint layers differ from the model's: only in the checkpoint "
                       f"{sorted(names - set(curvatures))}, only in the model {sorted(set(curvatures) - names)}")
    for n, s in layers.items():
        _check_layer(n, curvatures[n], s)

    def load() -> int:
        for n, s in layers.items():
            curvatures[n].load_state_dict(s)
        return steps

    return load
