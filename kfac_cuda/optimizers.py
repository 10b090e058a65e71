"""KFAC, EKFAC, TKFAC and TEKFAC as ``torch.optim.Optimizer``s.

Each is momentum SGD (with decoupled-from-curvature L2 weight decay, as in the papers'
setting and alecwangcq/KFAC-Pytorch) applied to the preconditioned gradient:
    d = U + weight_decay * p;   buf = momentum * buf + d;   p <- p - lr * buf
where U is the Preconditioner's output for supported layers (KL-clipped when ``kl_clip``)
and the raw gradient for every other parameter (listed in ``summary()``). Param groups,
LR schedulers and ``state_dict``/``load_state_dict`` behave as in torch.optim; the state
dict also carries the curvature (factors, bases, scales, counters).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
from torch.optim import Optimizer

from .adaptive_step import check_supported, martens_grosse_step
from .options import sgd_hyperparameters
from .preconditioner import Preconditioner
from .registration import unwrap
from .quadratic_model import QuadraticModel


class _KroneckerOptimizer(Optimizer):
    method: str = ""

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        kl_clip: Optional[float] = 1e-3,
        quadratic_model: Optional[QuadraticModel] = None,
        params=None,
        **options: Any,
    ):
        """Args:
            model: the model to train; its Linear/Conv2d layers are preconditioned.
            lr, momentum, weight_decay: the SGD update applied to the preconditioned gradient.
            kl_clip: KL-clipping radius (None disables; must be None with ``quadratic_model``).
            quadratic_model: a :class:`kfac_cuda.QuadraticModel` to take Martens & Grosse's step
                (learning rate, momentum and Levenberg-Marquardt damping from the exact quadratic
                model; needs ``step(closure)``; see kfac_cuda/adaptive_step.py), or None.
            params: parameters or param groups (default: ``model.parameters()``); layers whose
                weight is in none of them are not preconditioned (listed by ``summary()``).
            **options: passed to :class:`kfac_cuda.Preconditioner` (damping, factor_decay,
                factor_update_steps, inv_update_steps, scale_update_steps, damping_style,
                fisher, weight_sharing, loss_reduction, backend, skip_modules, ...).
                ``eigenbasis_moments="adam"`` (SOAP's Adam step in the curvature's eigenbasis,
                kfac_cuda/eigen_moments.py) needs ``kl_clip=None``; with ``momentum=0`` the
                optimizer's step is exactly lr * U, SOAP's (Adam's first moment already is a
                momentum); a momentum > 0 adds a second one.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"kfac_cuda.{type(self).__name__} takes the model, not {type(model).__name__}: "
                            f"{type(self).__name__}(model, lr=...) (the layers' hooks need the modules); to optimise "
                            "a subset of the parameters pass params=[...] or param groups as well")
        super().__init__(model.parameters() if params is None else params,
                         sgd_hyperparameters(lr, momentum, weight_decay))
        if quadratic_model is not None:
            check_supported(quadratic_model, kl_clip, options)
        optimised = [p for group in self.param_groups for p in group["params"]]
        self.preconditioner = Preconditioner(model, self.method, kl_clip=kl_clip, parameters=optimised, **options)
        self.quadratic_model = quadratic_model
        self._model = unwrap(model)

    def _lr_of(self, param: nn.Parameter) -> float:
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group["lr"]
        raise KeyError("a preconditioned parameter is in no param group")

    def summary(self) -> str:
        return self.preconditioner.summary()

    def sample_fisher(self, outputs: torch.Tensor, loss: str = "cross_entropy") -> None:
        """See :meth:`kfac_cuda.Preconditioner.sample_fisher` (``fisher="mc"``)."""
        self.preconditioner.sample_fisher(outputs, loss)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """Precondition, then take the momentum-SGD step. A step whose gradients or captured
        activations are not finite changes nothing (parameters, momentum, curvature).
        With ``quadratic_model`` the closure is required and the step is Martens & Grosse's."""
        if self.quadratic_model is not None:
            return martens_grosse_step(self, self._model, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hyper = [sgd_hyperparameters(g["lr"], g["momentum"], g["weight_decay"]) for g in self.param_groups]
        if not self.preconditioner.step(lr=self._lr_of, params=[p for g in self.param_groups for p in g["params"]]):
            return loss
        for group, h in zip(self.param_groups, hyper):
            lr, momentum, wd = h["lr"], h["momentum"], h["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=wd) if wd else p.grad
                if momentum:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(momentum).add_(d)
                    d = buf
                p.add_(d, alpha=-lr)
        return loss

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state["curvature"] = self.preconditioner.state_dict()
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load the SGD state and the curvature; everything is checked before anything changes."""
        state_dict = dict(state_dict)
        if "curvature" not in state_dict:
            raise KeyError("optimizer checkpoint has no 'curvature' entry (not from a kfac_cuda optimizer)")
        curvature = state_dict.pop("curvature")
        load_curvature = self.preconditioner.prepare_load(curvature)  # raises before any change
        for group in state_dict.get("param_groups", []):
            sgd_hyperparameters(group.get("lr", 0.0), group.get("momentum", 0.0), group.get("weight_decay", 0.0))
        super().load_state_dict(state_dict)
        load_curvature()


class KFAC(_KroneckerOptimizer):
    """K-FAC (Martens & Grosse 2015): F ~ A (x) G per layer."""

    method = "kfac"


class EKFAC(_KroneckerOptimizer):
    """EKFAC (George et al. 2018): K-FAC eigenbasis, per-element rescaling re-estimated from gradients."""

    method = "ekfac"


class TKFAC(_KroneckerOptimizer):
    """TKFAC (Gao et al. 2021): F ~ delta Phi (x) Psi with tr preserved."""

    method = "tkfac"


class TEKFAC(_KroneckerOptimizer):
    """TEKFAC (Gao et al., arXiv 2011.13609): TKFAC eigenbasis with eigenvalue-corrected scales."""

    method = "tekfac"
