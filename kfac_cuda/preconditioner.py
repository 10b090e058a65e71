"""The Preconditioner: captures activations and output gradients with module hooks,
keeps each supported layer's curvature, and rewrites ``.grad`` with the preconditioned
gradient, so it composes with any torch optimizer.

Order within ``step()`` (TEKFAC paper, Algorithm 1, and George et al. 2018):
1. every gradient and captured tensor is checked; a non-finite one skips the whole step
   (factors, scales, bases, counters and ``.grad`` untouched) with a warning;
2. on factor-update steps (and basis-refresh steps) the factors' EMAs take the batch;
3. on basis-refresh steps (``inv_update_steps``) the eigenbases are recomputed, then the
   scales (EKFAC, TEKFAC) are re-estimated in the NEW basis: from this batch, on top of the
   new basis' Kronecker spectrum (``scale_restart``), never from scales of the old basis;
4. on other scale-update steps (``scale_update_steps``) the scales' EMAs take the batch;
5. each layer's gradient is preconditioned, optionally KL-clipped (Ba et al. 2017):
   nu = min(1, sqrt(kl_clip / sum_layers lr^2 <U, V>)), U <- nu U.
Hooks capture inputs and output gradients only on steps that update factors or scales.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from .batch import SHARING, LayerBatch
from .capture import CaptureHooks
from .checkpoint import curvature_state, load_curvature_state
from .comm import LocalComm, OutputSpec
from .curvature import CURVATURES, ScaleMixin
from .distributed import DistributedComm
from .layers import Conv2dAdapter
from .ops._dispatch import check_backend
from .registration import Layers, parameter_report, register_layers, summary
from .schedule import Due, Schedule

METHODS = tuple(CURVATURES)
MAX_EIGH_FAILURES = 3
LrArg = Union[None, float, Callable[[nn.Parameter], float]]
LOSS_TERMS = ("examples", "tokens")


def default_comm() -> LocalComm:
    """``DistributedComm()`` when torch.distributed is initialised with more than one rank (a
    model trained on several ranks must not keep each rank's own curvature), else ``LocalComm()``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistributedComm()
    return LocalComm()


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


def _choice(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


class Preconditioner:
    """Kronecker-factored preconditioning of a model's Linear and Conv2d layers.

    Args:
        model: the module whose layers are preconditioned.
        method: "kfac" | "ekfac" | "tkfac" | "tekfac".
        damping: Tikhonov damping lambda (the floor of the adaptive conv damping of TKFAC/TEKFAC).
        factor_decay: EMA weight of the old factors (0 = this batch only).
        scale_decay: EMA weight of the old scales (EKFAC, TEKFAC); defaults to ``factor_decay``.
        factor_update_steps, inv_update_steps, scale_update_steps: update intervals in steps
            (``scale_update_steps`` defaults to ``factor_update_steps``).
        scale_restart: how the scales (EKFAC, TEKFAC) restart after a basis refresh, where the
            old scales belong to the old basis: "kronecker" (default) starts the EMA from the
            Kronecker spectrum of the new basis (l_G l_A^T, or delta l_Psi l_Phi^T) and takes the
            batch with weight 1 - scale_decay; "batch" restarts from this batch's estimate alone.
        kl_clip: KL-clipping radius kappa, or None to disable.
        lr: learning rate used by KL-clipping (the KFAC optimizers pass theirs).
        damping_style: "eigen" (exact inverse of A(x)G + lambda I) or "factored" (K-FAC only).
        adaptive_damping: TKFAC/TEKFAC conv-layer damping lambda_l = max(tr F_l / dim F_l, damping),
            with the dense layers of a CNN raised to the largest conv lambda_l (TEKFAC Eq. 3.5).
        fisher: "empirical" (gradients of the training loss) or "mc" (call ``sample_fisher``).
        weight_sharing: "expand" or "reduce" for inputs with positions (sequences, conv).
        loss_reduction: how the training loss combines its terms: "mean" (captured output
            gradients are multiplied by the number of loss terms of the step, over all its
            accumulated micro-batches) or "sum".
        loss_terms: what one term of the loss is: "examples" (default; a sequence's positions
            share one term, K-FAC-expand/reduce over positions) or "tokens" (a per-token loss,
            e.g. a language model's cross-entropy over all B*T tokens: every position of a
            Linear/Conv1D input is an example of its own, as per-token K-FAC in curvlinops).
        batch_dim: the dim of 3-D and larger Linear/Conv1D inputs that holds the examples: 0
            (batch-first, default) or 1 (sequence-first, e.g. ``batch_first=False`` models).
        backend: "auto" | "torch" | "cuda" for the hot ops.
        skip_modules: module names, types or instances left alone, with everything inside them.
        max_factor_dim: layers whose factor side exceeds this are skipped (listed).
        grad_scaler: the ``torch.amp.GradScaler`` scaling the loss, if any: captured output
            gradients are divided by its scale (call ``scaler.unscale_(optimizer)`` before
            ``step()`` for the parameter gradients, as for gradient clipping).
        check_finite: skip steps whose gradients or activations are not finite. The check
            reads a flag back to the host; pass False to capture a step in a CUDA graph.
        comm: what the step asks of the process group: ``kfac_cuda.DistributedComm(...)`` (see
            kfac_cuda.distributed) or ``kfac_cuda.LocalComm()`` (this process alone). Default:
            ``DistributedComm()`` when torch.distributed is initialised with more than one rank
            (construct the optimizer on every rank), else ``LocalComm()``.
        parameters: the parameters being optimised (the optimizers pass their param groups'):
            layers whose weight is not among them are not preconditioned (listed by ``summary()``).
    """

    def __init__(
        self,
        model: nn.Module,
        method: str = "kfac",
        *,
        damping: float = 1e-3,
        factor_decay: float = 0.95,
        scale_decay: Optional[float] = None,
        factor_update_steps: int = 10,
        inv_update_steps: int = 100,
        scale_update_steps: Optional[int] = None,
        scale_restart: str = "kronecker",
        kl_clip: Optional[float] = None,
        lr: LrArg = None,
        damping_style: str = "eigen",
        adaptive_damping: bool = True,
        fisher: str = "empirical",
        weight_sharing: str = "expand",
        loss_reduction: str = "mean",
        loss_terms: str = "examples",
        batch_dim: int = 0,
        backend: str = "auto",
        skip_modules: Iterable = (),
        max_factor_dim: int = 8192,
        grad_scaler=None,
        check_finite: bool = True,
        comm: Optional[LocalComm] = None,
        parameters: Optional[Iterable[nn.Parameter]] = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"kfac_cuda: the first argument must be the model (an nn.Module), got "
                            f"{type(model).__name__}: pass the model, e.g. Preconditioner(model) or KFAC(model, "
                            "lr=...), and a subset of parameters with parameters=/params=")
        self.method = _choice("method", method.lower(), METHODS)
        self.damping_style = _choice("damping_style", damping_style, ("eigen", "factored"))
        if self.damping_style == "factored" and self.method != "kfac":
            raise ValueError("damping_style='factored' applies to method='kfac' only")
        self.fisher = _choice("fisher", fisher, ("empirical", "mc"))
        self.weight_sharing = _choice("weight_sharing", weight_sharing, SHARING)
        self.loss_reduction = _choice("loss_reduction", loss_reduction, ("mean", "sum"))
        self.loss_terms = _choice("loss_terms", loss_terms, LOSS_TERMS)
        if batch_dim not in (0, 1) or isinstance(batch_dim, bool):
            raise ValueError(f"batch_dim must be 0 (batch-first) or 1 (sequence-first), got {batch_dim!r}")
        self.batch_dim = int(batch_dim)
        self.backend = check_backend(backend)
        for name, v in (("factor_update_steps", factor_update_steps), ("inv_update_steps", inv_update_steps),
                        ("scale_update_steps", scale_update_steps or 1)):
            if int(v) != v or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name, v in (("factor_decay", factor_decay), ("scale_decay", scale_decay or 0.0)):
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v!r}")
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping!r}")
        if kl_clip is not None and kl_clip <= 0:
            raise ValueError(f"kl_clip must be positive or None, got {kl_clip!r}")
        self.damping = float(damping)
        self.factor_decay = float(factor_decay)
        self.scale_decay = float(factor_decay if scale_decay is None else scale_decay)
        self.factor_update_steps = int(factor_update_steps)
        self.inv_update_steps = int(inv_update_steps)
        self.scale_update_steps = int(scale_update_steps or factor_update_steps)
        self.scale_restart = _choice("scale_restart", scale_restart, ("kronecker", "batch"))
        self.kl_clip = kl_clip
        self.lr = lr
        self.adaptive_damping = adaptive_damping
        self.check_finite = check_finite
        self.grad_scaler = grad_scaler
        self.comm = comm if comm is not None else default_comm()
        self.comm.attach(model)
        model = unwrap(model)  # layer names (and checkpoints) independent of DDP / torch.compile
        self.steps = 0
        self.schedule = Schedule(self.factor_update_steps, self.inv_update_steps, self.scale_update_steps,
                                 issubclass(CURVATURES[self.method], ScaleMixin))
        self.layers: Layers
        self.unsupported: List[Tuple[str, str]]
        optimised = None if parameters is None else {id(p) for p in parameters}
        self.layers, self.unsupported = register_layers(
            model, CURVATURES[self.method], skip_modules=skip_modules, max_factor_dim=max_factor_dim,
            damping_style=self.damping_style, batch_dim=self.batch_dim, per_token=self.loss_terms == "tokens",
            parameters=optimised)
        self._parameter_report = parameter_report(model, self.layers, self.unsupported, optimised)
        me = weakref.ref(self)  # the hooks must not keep the Preconditioner alive
        self.hooks = CaptureHooks(model, {n: a for n, (a, _) in self.layers.items()},
                                  lambda: me() is not None and me().capturing, self.fisher, self.loss_reduction,
                                  per_token=self.loss_terms == "tokens")

    def remove(self) -> None:
        """Remove the module hooks."""
        self.hooks.remove()

    def summary(self) -> str:
        """A table of the preconditioned layers, of those left to the plain optimizer (why), and
        of what happens to every parameter: preconditioned, left to the base optimizer, tied, frozen."""
        return summary(self.method, self.layers, self.unsupported, self._parameter_report)

    def _due(self) -> Due:
        """(factors, bases, scales) due at the current step."""
        return self.schedule.due(self.steps)

    @property
    def capturing(self) -> bool:
        """Whether the hooks capture on the current step."""
        return self._due().capture

    def sample_fisher(self, outputs: torch.Tensor, loss: str = "cross_entropy") -> None:
        """MC ("true") Fisher: sample targets from the model's predictive distribution and
        capture the output gradients of their summed loss (one extra backward through the
        layer outputs; parameter ``.grad`` untouched). Call after the forward pass and before
        ``loss.backward()`` on every step (a no-op on steps that do not capture).

        Args:
            outputs: the model's outputs: logits (..., classes) for ``loss="cross_entropy"``,
                independent Bernoulli logits (any shape) for ``loss="bernoulli"`` (BCE with
                logits), predictions for ``loss="mse"`` (Gaussian with unit variance, loss
                0.5*|y - f|^2).
        """
        self.hooks.sample_fisher(outputs, loss)

    # --- the step ---------------------------------------------------------------------------
    def _batches(self, names: Sequence[str]) -> Dict[str, LayerBatch]:
        scaler = self.grad_scaler
        return self.hooks.batches(names, sharing=self.weight_sharing, backend=self.backend,
                                  dtypes={n: c.buffers["A"].dtype for n, (_, c) in self.layers.items()},
                                  grad_scale=scaler.get_scale() if scaler is not None and scaler.is_enabled()
                                  else None)

    def _lr_of(self, param: nn.Parameter, lr: LrArg) -> float:
        lr = self.lr if lr is None else lr
        if lr is None:
            raise ValueError("kl_clip needs a learning rate: pass lr= to the Preconditioner or to step()")
        return float(lr(param)) if callable(lr) else float(lr)

    def _dampings(self, names: Sequence[str]) -> Dict[str, float]:
        """Per-layer damping: fixed, or TKFAC/TEKFAC's adaptive conv damping."""
        if not (self.adaptive_damping and self.method in ("tkfac", "tekfac")):
            return {n: self.damping for n in names}
        conv = {n: max(self.layers[n][1].natural_damping(), self.damping)
                for n in names if isinstance(self.layers[n][0], Conv2dAdapter)}
        dense = max(conv.values(), default=self.damping)
        return {n: conv.get(n, dense) for n in names}

    def _refresh_bases(self, names: Sequence[str]) -> None:
        mats, labels, costs = [], [], []
        for n in names:
            for side, m in zip(("input", "output"), self.layers[n][1].basis_sources()):
                mats.append(m)
                labels.append(f"{n or '<model>'} {side} factor")
                costs.append(float(m.shape[0]) ** 3)
        eigs = self.comm.eigh_many(mats, labels, costs)
        for i, n in enumerate(names):
            curvature = self.layers[n][1]
            inp, out = eigs[2 * i], eigs[2 * i + 1]
            if inp is None or out is None:
                curvature.eigh_failures += 1
                if curvature.eigh_failures >= MAX_EIGH_FAILURES:
                    raise RuntimeError(f"kfac_cuda: eigendecomposition of layer {n!r} failed "
                                       f"{curvature.eigh_failures} times in a row")
                warnings.warn(f"kfac_cuda: eigendecomposition of layer {n!r} failed; keeping its previous basis",
                              RuntimeWarning)
                continue
            curvature.eigh_failures = 0
            curvature.set_bases(inp, out)

    @torch.no_grad()
    def step(self, lr: LrArg = None) -> bool:
        """Update the curvature as scheduled and replace each layer's ``.grad`` by its
        preconditioned gradient. Returns False (and changes nothing) when a gradient or a
        captured activation is not finite."""
        self.hooks.check_attached()
        names = [n for n, (a, _) in self.layers.items() if a.module.weight.grad is not None]
        self.comm.average_gradients()
        factors_due, bases_due, scales_due = self._due()
        try:
            batches = self._batches(names) if (factors_due or scales_due) else {}
            grads = {n: self.layers[n][0].grad_matrix() for n in names}
            if self.check_finite and not self.comm.all_true(self._all_finite(grads, batches)):
                warnings.warn(f"kfac_cuda: non-finite gradient or activation at step {self.steps}; "
                              "step skipped, curvature left untouched", RuntimeWarning)
                return False
            self._update_curvature(names, batches, factors_due, bases_due, scales_due)
            self._apply(names, grads, lr)
            self.steps += 1
            return True
        finally:
            self.hooks.clear()

    @staticmethod
    def _all_finite(grads: Dict[str, torch.Tensor], batches: Dict[str, LayerBatch]) -> bool:
        tensors = list(grads.values()) + [t for b in batches.values() for t in b.tensors()]
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True

    def _update_curvature(self, names, batches, factors_due, bases_due, scales_due) -> None:
        curvatures = [self.layers[n][1] for n in names]
        if factors_due:
            for n, c in zip(names, curvatures):
                if n in batches:
                    c.update_factors(batches[n], self.factor_decay)
            self.comm.average_([t for c in curvatures for t in c.synced_factors()])
        if bases_due or any(not c.has_basis for c in curvatures):
            self._refresh_bases([n for n, c in zip(names, curvatures)
                                 if c.factors_initialized and (bases_due or not c.has_basis)])
        if scales_due:
            for n, c in zip(names, curvatures):
                if c.has_basis and n in batches:
                    c.update_scales(batches[n], self.scale_decay, fresh=bases_due, restart=self.scale_restart)
            self.comm.average_([t for c in curvatures if c.has_basis for t in c.synced_scales()])

    def _apply(self, names, grads, lr: LrArg) -> None:
        ready = [n for n in names if self.layers[n][1].has_basis]
        damping = self._dampings(ready)
        jobs = [(lambda n=n: self.layers[n][1].precondition(grads[n], damping[n], self.backend)) for n in ready]
        costs = [float(grads[n].numel() * sum(grads[n].shape)) for n in ready]  # GEMM multiply-adds / 2
        specs = [OutputSpec(grads[n].shape, self.layers[n][1].buffers["QA"].dtype, grads[n].device) for n in ready]
        results = self.comm.precondition_all(jobs, costs, specs)
        if self.kl_clip is not None and ready:
            # nu stays on the device (no host sync): nu = 1 where sum lr^2 <U, V> <= 0
            vg = sum(self._lr_of(self.layers[n][0].module.weight, lr) ** 2 * dot
                     for n, (_, dot) in zip(ready, results))
            nu = torch.where(vg > 0, (self.kl_clip / vg.clamp_min(torch.finfo(vg.dtype).tiny)).sqrt().clamp(max=1.0),
                             torch.ones_like(vg))
        else:
            nu = None
        for n, (U, _) in zip(ready, results):
            self.layers[n][0].set_grad_matrix(U if nu is None else U.mul_(nu))

    # --- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume exactly: factors, bases, scales and counters."""
        return curvature_state(self.method, self.steps, {n: c for n, (_, c) in self.layers.items()})

    def load_state_dict(self, state: dict) -> None:
        self.steps = load_curvature_state(self.method, {n: c for n, (_, c) in self.layers.items()}, state)
