"""Peer optimizers from PyPI for ``bench/e2e.py``, each used only when it imports.

``PEERS`` maps a method name to a factory ``(model, lr) -> torch.optim.Optimizer`` and
``peer_status()`` says, per name, "ok" or why the peer is left out ("not installed: …").
Installing the peers must never replace torch: ``pip install --no-deps heavyball
opt-einsum nngeometry`` (heavyball 3.2.1 and nngeometry 0.4 were checked).

- ``soap`` and ``psgd``: heavyball's ``SOAP`` and ``PSGDKron``. heavyball compiles its
  update with ``torch.compile`` by default; that is switched off here (minutes of
  autotuning on a CPU, and compile time would count as training time) unless
  :func:`set_heavyball_compile` is called with True.
- ``nngeometry-ekfac``: nngeometry's ``PMatEKFAC`` drives training through
  :class:`NNGeometryEKFAC`: every ``update_every`` steps the EKFAC Fisher of the current
  batch is rebuilt (closed-form expectation over the softmax, i.e. the true Fisher), and
  every step the gradient is replaced by ``(F + damping I)^-1 g`` before momentum SGD;
  layers nngeometry does not support (embeddings, ...) get the plain gradient. Its
  ``torch.linalg.eigh`` of the Kronecker factors fails now and then on the digits CNN
  (rank-deficient factors, finite weights); the adapter then keeps the previous Fisher,
  as our library does, and counts the failures in ``eigh_failures`` (in the JSON).
  nngeometry's Fisher helpers need 2-D class logits, so it runs on classification tasks
  only (the autoencoder is skipped; on the transformer's 3-D logits the run fails and is
  reported as such).
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Optional

import torch
from torch import nn

PeerFactory = Callable[[nn.Module, float], torch.optim.Optimizer]

#: Import each peer needs, by method name.
PEER_MODULES: Dict[str, str] = {"soap": "heavyball", "psgd": "heavyball", "nngeometry-ekfac": "nngeometry"}
#: What to install for each of those imports (never with dependencies: they would pull a torch).
PIP_INSTALL: Dict[str, str] = {"heavyball": "heavyball opt-einsum", "nngeometry": "nngeometry"}


def _import(module: str):
    """Import ``module``; None when it is missing or fails to import."""
    try:
        return importlib.import_module(module)
    except Exception:  # a broken install is as good as none
        return None


def peer_status() -> Dict[str, str]:
    """'ok' or the reason each peer is unavailable, by method name."""
    status = {}
    for name, module in PEER_MODULES.items():
        if _import(module) is None:
            status[name] = f"not installed (pip install --no-deps {PIP_INSTALL[module]})"
        else:
            status[name] = "ok"
    return status


def set_heavyball_compile(enabled: bool) -> None:
    """Let heavyball compile its updates (its default) or run them eagerly (ours)."""
    heavyball = _import("heavyball")
    if heavyball is not None:
        import heavyball.utils

        heavyball.utils.compile_mode = "max-autotune-no-cudagraphs" if enabled else None


class NNGeometryEKFAC(torch.optim.Optimizer):
    """Momentum SGD on nngeometry's EKFAC natural gradient, for classifiers.

    The model's inputs are captured by a forward pre-hook, so the usual
    ``zero_grad(); loss.backward(); step()`` loop drives it unchanged.
    """

    def __init__(self, model: nn.Module, lr: float, momentum: float = 0.9, damping: float = 0.1,
                 update_every: int = 10):
        from nngeometry.layercollection import LayerCollection

        super().__init__(model.parameters(), dict(lr=lr, momentum=momentum))
        self.model, self.damping, self.update_every = model, damping, update_every
        self.layers = LayerCollection.from_model(model, ignore_unsupported_layers=True)
        self._inputs: Optional[torch.Tensor] = None
        self._fisher = None
        self._steps = 0
        self.eigh_failures = 0
        model.register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple) -> None:
        if module.training and torch.is_grad_enabled():
            self._inputs = args[0].detach()

    def _refresh_fisher(self) -> None:
        from nngeometry.metrics import FIM
        from nngeometry.object import PMatEKFAC

        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self._inputs),
                                             batch_size=len(self._inputs))
        self._fisher = FIM(self.model, loader, PMatEKFAC, variant="classif_logits",
                           device=self._inputs.device, layer_collection=self.layers)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """Replace the supported layers' gradients by the damped EKFAC natural gradient,
        then take a momentum-SGD step on every parameter."""
        from nngeometry.object import PVector

        if self._steps % self.update_every == 0:
            try:
                with torch.enable_grad():
                    self._refresh_fisher()
            except torch.linalg.LinAlgError:
                if self._fisher is None:
                    raise
                self.eigh_failures += 1
        self._steps += 1
        natural = self._fisher.solvePVec(PVector.from_model_grad(self.model), regul=self.damping).to_dict()
        grads = PVector.from_model_grad(self.model).to_dict()
        for layer_id, tensors in natural.items():
            for grad, new in zip(grads[layer_id], tensors):
                grad.copy_(new)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = p.grad.clone()
                else:
                    buf.mul_(group["momentum"]).add_(p.grad)
                p.add_(buf, alpha=-group["lr"])
        return None


def _heavyball(name: str) -> PeerFactory:
    def factory(model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return getattr(importlib.import_module("heavyball"), name)(model.parameters(), lr=lr)
    return factory


PEERS: Dict[str, PeerFactory] = {
    "soap": _heavyball("SOAP"),
    "psgd": _heavyball("PSGDKron"),
    "nngeometry-ekfac": lambda model, lr: NNGeometryEKFAC(model, lr),
}

#: Peers that model a categorical output (skipped on the autoencoder).
CLASSIFICATION_ONLY = {"nngeometry-ekfac"}

#: Learning rates of the peers, one per peer for every task, tuned as the demo's methods
#: (seed 0, default steps; final training loss, autoencoder | classifier):
#: soap {1e-3: 18.4 | 0.42, 3e-3: 14.8 | 0.0064, 1e-2: 14.7 | 1.5e-5, 3e-2: 16.6 | 2.5e-5};
#: psgd {3e-4: 27.9 | 1.33, 1e-3: 17.1 | 0.035, 3e-3: 16.4 | 0.0035, 1e-2: 29.7 | 0.020};
#: nngeometry-ekfac (damping 0.1, classifier) {0.01: 0.0031, 0.03: 0.21, 0.1: diverged}.
PEER_LR: Dict[str, float] = {"soap": 1e-2, "psgd": 3e-3, "nngeometry-ekfac": 0.01}
