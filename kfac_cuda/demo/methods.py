"""The optimizers the demo compares, with tuned default learning rates.

Every method is a factory ``(model, lr, kfac_options) -> torch.optim.Optimizer``; the
Kronecker methods take their options from ``kfac_options``, by default
:data:`KFAC_OPTIONS`: curvature refreshed often (the demo runs a few hundred steps on
small layers, where an eigendecomposition costs well under a millisecond) and the MC
("true") Fisher, as in Martens & Grosse (2015). With the empirical Fisher the deep
autoencoder stays on or near its mean-image plateau (loss ~27; best of 36 damping ×
KL-clip settings after 300 steps: 21.4), while with the MC Fisher all four methods
reach ~16 in 600 steps (SGD's best: 17.1).

Tuning (seed 0, batch 64, default steps: autoencoder 600, classifier 300; criterion: final
full training loss; momentum 0.9 everywhere):

- K-FAC family, first damping × KL-clip × lr for KFAC and TEKFAC: damping {0.01, 0.1, 1},
  kl_clip {1e-3, 1e-2}, lr {0.03, 0.1, 0.3}. damping 0.1 with kl_clip 1e-3 was best or
  close to best for both methods on both tasks (damping 0.01 stays on the autoencoder's
  plateau; kl_clip 1e-2 is unstable on the CNN), so all four methods use it. Then lr
  {0.03, 0.1, 0.3} for each method. On the autoencoder the KL clip binds, so the rate
  barely matters (KFAC: 15.53 at all three).
- SGD: lr {0.003, 0.01, 0.03, 0.1, 0.3}; AdamW: lr {3e-4, 1e-3, 3e-3, 1e-2, 3e-2}.

Final training loss at the chosen rate (autoencoder | classifier):
SGD 17.1 | 0.0019, AdamW 18.5 | 0.0010, KFAC 15.5 | 0.00096, EKFAC 16.3 | 0.0031,
TKFAC 16.1 | 0.0012, TEKFAC 16.7 | 0.0041.

``curves`` (the CURVES deep autoencoder): SGD's and AdamW's rates are the winners of
bench/deep_autoencoder.py's grids; the KL-clipped K-FAC family keeps lr 0.1 untuned (the
clip binds, as on the digits autoencoder). ``kfac-mg`` and ``tekfac-mg`` run Martens &
Grosse's full algorithm (:data:`MARTENS_GROSSE_OPTIONS`): no learning rate to tune, the
initial damping from the benchmark's grid. On ``classifier`` they run with the default initial
damping 1 (untuned), step rejection on (:class:`kfac_cuda.QuadraticModel`'s default; without it
kfac-mg and tekfac-mg diverged on the CNN on some seeds once lambda had fallen below ~1e-4).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

import kfac_cuda

OptimizerFactory = Callable[[nn.Module, float, Dict[str, Any]], torch.optim.Optimizer]

#: Options shared by KFAC, EKFAC, TKFAC and TEKFAC in the demo.
KFAC_OPTIONS: Dict[str, Any] = dict(momentum=0.9, damping=0.1, factor_decay=0.95,
                                    factor_update_steps=1, inv_update_steps=5, kl_clip=1e-3,
                                    fisher="mc")


#: The full Martens-Grosse algorithm (quadratic-model learning rate and momentum, Levenberg-
#: Marquardt damping every 5 steps with omega = (19/20)^5, MC Fisher, factors every step, bases
#: every 20 steps as the paper's T_3); the initial damping is tuned per task (see bench/deep_autoencoder.py).
MARTENS_GROSSE_OPTIONS: Dict[str, Any] = dict(momentum=0.0, damping=1.0, factor_decay=0.95,
                                              factor_update_steps=1, inv_update_steps=20, kl_clip=None,
                                              fisher="mc")


def _martens_grosse(cls: type) -> OptimizerFactory:
    """Factory for the full algorithm: ``lr`` is ignored (the quadratic model chooses it),
    ``options["loss"]`` names the task's loss and ``options["damping"]``, if given, is the
    initial damping."""
    def factory(model: nn.Module, lr: float, options: Dict[str, Any]) -> torch.optim.Optimizer:
        del lr
        merged = dict(MARTENS_GROSSE_OPTIONS, damping=options.get("damping", MARTENS_GROSSE_OPTIONS["damping"]))
        return cls(model, lr=0.0, quadratic_model=kfac_cuda.QuadraticModel(loss=options["loss"]), **merged)
    return factory


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
    "kfac-mg": _martens_grosse(kfac_cuda.KFAC),
    "tekfac-mg": _martens_grosse(kfac_cuda.TEKFAC),
}
#: The methods that take Martens & Grosse's full step (they need the task's loss).
MARTENS_GROSSE = ("kfac-mg", "tekfac-mg")

#: Default learning rate per (task, method), from the grid search in the module docstring.
DEFAULT_LR: Dict[str, Dict[str, float]] = {
    "autoencoder": {"sgd": 0.03, "adamw": 1e-2, "kfac": 0.1, "ekfac": 0.03, "tkfac": 0.03, "tekfac": 0.3,
                    "kfac-mg": 0.0, "tekfac-mg": 0.0},
    "classifier": {"sgd": 0.1, "adamw": 1e-2, "kfac": 0.03, "ekfac": 0.3, "tkfac": 0.03, "tekfac": 0.1,
                   "kfac-mg": 0.0, "tekfac-mg": 0.0},
    "curves": {"sgd": 0.003, "adamw": 1e-3, "kfac": 0.1, "ekfac": 0.1, "tkfac": 0.1, "tekfac": 0.1,
               "kfac-mg": 0.0, "tekfac-mg": 0.0},
}


def make_optimizer(method: str, model: nn.Module, lr: float,
                   kfac_options: Optional[Dict[str, Any]] = None, *, loss: Optional[str] = None
                   ) -> torch.optim.Optimizer:
    """Build the optimizer registered as ``method`` (a key of :data:`METHODS`) for ``model``;
    ``kfac_options`` (default :data:`KFAC_OPTIONS`; for the Martens-Grosse methods only their
    ``damping``, the initial one, is read) configure the Kronecker methods; ``loss`` (the task's
    ``fisher_loss``) is required by the Martens-Grosse methods."""
    try:
        factory = METHODS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}") from None
    if method in MARTENS_GROSSE:
        if loss is None:
            raise ValueError(f"method {method!r} needs the task's loss (loss=...)")
        return factory(model, lr, dict(kfac_options or {}, loss=loss))
    return factory(model, lr, KFAC_OPTIONS if kfac_options is None else kfac_options)
