"""Adam's moments of a layer's gradient matrix, shared by step-size grafting
(:mod:`kfac_cuda.grafting`) and the eigenbasis moments (:mod:`kfac_cuda.eigen_moments`): one
step of the moments with bias correction, and the checkpoint check of their per-layer state
{"step": t >= 1, "m": tensor, "v": tensor >= 0}."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch


def adam_step(old: Optional[dict], G: torch.Tensor, betas: Tuple[float, float], eps: float,
              first_moment: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, dict]:
    """(m^ / (sqrt(v^) + eps), the new state) after m <- b1 m + (1 - b1) G, v <- b2 v + (1 - b2) G^2
    (m = v = 0 when ``old`` is None); ``first_moment`` replaces ``old["m"]`` (e.g. carried into a
    new basis)."""
    b1, b2 = betas
    if old is None:
        t, m, v = 1, (1 - b1) * G, (1 - b2) * G * G
    else:
        m = old["m"] if first_moment is None else first_moment
        t, m, v = old["step"] + 1, b1 * m + (1 - b1) * G, b2 * old["v"] + (1 - b2) * G * G
    direction = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
    return direction, {"step": t, "m": m, "v": v}


def check_moment_state(state, kind: str, option: str, shapes: Dict[str, Tuple[int, ...]]) -> None:
    """Raise (naming ``option`` and the layer) unless ``state`` is a state_dict of ``kind`` whose
    layers are among ``shapes`` with real, finite m and v of the layer's shape, v >= 0, step >= 1."""
    if not isinstance(state, dict) or state.get("kind") != kind or not isinstance(state.get("moments"), dict):
        got = state.get("kind") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"checkpoint {option} state is for {option}={got!r}, not {kind!r}")
    for n, s in state["moments"].items():
        where = f"checkpoint {option} state of layer {n!r}"
        if n not in shapes:
            raise KeyError(f"{where}: no such preconditioned layer")
        if not isinstance(s, dict) or set(s) != {"step", "m", "v"}:
            raise ValueError(f"{where}: expected a dict with 'step', 'm' and 'v'")
        if isinstance(s["step"], bool) or not isinstance(s["step"], int) or s["step"] < 1:
            raise ValueError(f"{where}: step must be a positive integer, got {s['step']!r}")
        for k in ("m", "v"):
            t = s[k]
            if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point or tuple(t.shape) != tuple(shapes[n]):
                raise ValueError(f"{where}: {k!r} must be a real tensor of shape {tuple(shapes[n])}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{where}: {k!r} is not finite")
        if bool((s["v"] < 0).any()):
            raise ValueError(f"{where}: 'v' (a second moment) has negative entries")
