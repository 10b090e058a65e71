"""The Preconditioner's checkpoint: method, step counter and every layer's curvature."""
from __future__ import annotations

from typing import Dict

from .curvature import KFACCurvature


def curvature_state(method: str, steps: int, curvatures: Dict[str, KFACCurvature]) -> dict:
    """Everything needed to resume exactly: factors, bases, scales and counters."""
    return {"method": method, "steps": steps, "layers": {n: c.state_dict() for n, c in curvatures.items()}}


def load_curvature_state(method: str, curvatures: Dict[str, KFACCurvature], state: dict) -> int:
    """Load ``state`` into the curvatures; return the step counter."""
    if state["method"] != method:
        raise ValueError(f"checkpoint is for method {state['method']!r}, not {method!r}")
    missing = set(curvatures) ^ set(state["layers"])
    if missing:
        raise KeyError(f"checkpoint layers differ from the model's: {sorted(missing)}")
    for n, s in state["layers"].items():
        curvatures[n].load_state_dict(s)
    return int(state["steps"])
