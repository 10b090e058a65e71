"""The Preconditioner: captures activations and output gradients with module hooks,
keeps each supported layer's curvature, and rewrites ``.grad`` with the preconditioned
gradient, so it composes with any torch optimizer.

Order within ``step()`` (TEKFAC paper, Algorithm 1, and George et al. 2018):
1. every gradient (of every parameter of the model, not only the preconditioned layers) and
   captured tensor is checked; a non-finite one skips the whole step (factors, scales, bases,
   counters and ``.grad`` untouched) with a warning;
2. on factor-update steps (and basis-refresh steps) the factors' EMAs take the batch;
3. on basis-refresh steps (``inv_update_steps``) the eigenbases are recomputed, then the
   scales (EKFAC, TEKFAC) are re-estimated in the NEW basis: from this batch, on top of the
   new basis' Kronecker spectrum (``scale_restart``), never from scales of the old basis;
4. on other scale-update steps (``scale_update_steps``) the scales' EMAs take the batch;
5. each layer's gradient is preconditioned, optionally KL-clipped (Ba et al. 2017):
   nu = min(1, sqrt(kl_clip / sum_layers lr^2 <U, V>)), U <- nu U.
Steps 2-5 are a transaction: the touched layers' curvature is snapshotted first and put back
when an update would leave a factor, scale, basis or U non-finite, or when a layer's first
eigendecomposition fails; the step is then skipped with a warning naming the layers.
Hooks capture inputs and output gradients only on steps that update factors or scales.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from .batch import SHARING, LayerBatch
from .capture import CaptureHooks
from .checkpoint import check_curvature_state, curvature_state
from .comm import LocalComm, OutputSpec
from .curvature import CURVATURES, ScaleMixin
from .distributed import DistributedComm
from .layers import Conv2dAdapter
from . import options
from .ops._dispatch import check_backend
from .registration import Layers, parameter_report, register_layers, summary
from .schedule import Due, Schedule

METHODS = tuple(CURVATURES)
MAX_EIGH_FAILURES = 3
LrArg = options.LrArg
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



class Preconditioner:
    """Kronecker-factored preconditioning of a model's Linear and Conv2d layers.

    Args:
        model: the module whose layers are preconditioned.
        method: "kfac" | "ekfac" | "tkfac" | "tekfac".
        damping: Tikhonov damping lambda > 0 (the floor of the adaptive conv damping of TKFAC/TEKFAC).
            Every option is checked by :mod:`kfac_cuda.options` (finite, in range, integer
            intervals >= 1); a bad one raises ValueError naming it.
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
        self.method = options.choice("method", method.lower() if isinstance(method, str) else method, METHODS)
        self.damping_style = options.choice("damping_style", damping_style, ("eigen", "factored"))
        if self.damping_style == "factored" and self.method != "kfac":
            raise ValueError("damping_style='factored' applies to method='kfac' only")
        self.fisher = options.choice("fisher", fisher, ("empirical", "mc"))
        self.weight_sharing = options.choice("weight_sharing", weight_sharing, SHARING)
        self.loss_reduction = options.choice("loss_reduction", loss_reduction, ("mean", "sum"))
        self.loss_terms = options.choice("loss_terms", loss_terms, LOSS_TERMS)
        if batch_dim not in (0, 1) or isinstance(batch_dim, bool):
            raise ValueError(f"batch_dim must be 0 (batch-first) or 1 (sequence-first), got {batch_dim!r}")
        self.batch_dim = int(batch_dim)
        self.backend = check_backend(backend)
        self.damping = options.damping(damping)
        self.factor_decay = options.decay("factor_decay", factor_decay)
        self.scale_decay = self.factor_decay if scale_decay is None else options.decay("scale_decay", scale_decay)
        self.factor_update_steps = options.positive_int("factor_update_steps", factor_update_steps)
        self.inv_update_steps = options.positive_int("inv_update_steps", inv_update_steps)
        self.scale_update_steps = (self.factor_update_steps if scale_update_steps is None
                                   else options.positive_int("scale_update_steps", scale_update_steps))
        self.scale_restart = options.choice("scale_restart", scale_restart, ("kronecker", "batch"))
        self.kl_clip = options.optional(options.real, "kl_clip", kl_clip, low=0.0, low_open=True)
        max_factor_dim = options.positive_int("max_factor_dim", max_factor_dim)
        self.lr = options.learning_rate(lr)
        self.adaptive_damping = options.flag("adaptive_damping", adaptive_damping)
        self.check_finite = options.flag("check_finite", check_finite)
        self.grad_scaler = grad_scaler
        self.comm = comm if comm is not None else default_comm()
        self.comm.attach(model)
        model = unwrap(model)  # layer names (and checkpoints) independent of DDP / torch.compile
        self.model_params: Dict[str, nn.Parameter] = dict(model.named_parameters())  # finiteness check
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
        return options.real("lr", lr(param) if callable(lr) else lr, low=0.0)

    def _dampings(self, names: Sequence[str]) -> Dict[str, float]:
        """Per-layer damping: fixed, or TKFAC/TEKFAC's adaptive conv damping."""
        if not (self.adaptive_damping and self.method in ("tkfac", "tekfac")):
            return {n: self.damping for n in names}
        conv = {n: max(self.layers[n][1].natural_damping(), self.damping)
                for n in names if isinstance(self.layers[n][0], Conv2dAdapter)}
        dense = max(conv.values(), default=self.damping)
        return {n: conv.get(n, dense) for n in names}

    def _refresh_bases(self, names: Sequence[str]) -> List[str]:
        """Recompute the eigenbases of ``names``. A layer whose decomposition fails keeps its
        previous basis (warned); returns the layers that failed and have no basis at all."""
        mats, labels, costs = [], [], []
        for n in names:
            for side, m in zip(("input", "output"), self.layers[n][1].basis_sources()):
                mats.append(m)
                labels.append(f"{n or '<model>'} {side} factor")
                costs.append(float(m.shape[0]) ** 3)
        eigs = self.comm.eigh_many(mats, labels, costs)
        without_basis = []
        for i, n in enumerate(names):
            curvature = self.layers[n][1]
            inp, out = eigs[2 * i], eigs[2 * i + 1]
            if inp is None or out is None:
                curvature.eigh_failures += 1
                if curvature.eigh_failures >= MAX_EIGH_FAILURES:
                    raise RuntimeError(f"kfac_cuda: eigendecomposition of layer {n!r} failed "
                                       f"{curvature.eigh_failures} times in a row")
                if curvature.has_basis:
                    warnings.warn(f"kfac_cuda: eigendecomposition of layer {n!r} failed; keeping its previous "
                                  "basis", RuntimeWarning)
                else:
                    without_basis.append(n)
                continue
            curvature.eigh_failures = 0
            curvature.set_bases(inp, out)
        return without_basis

    @torch.no_grad()
    def step(self, lr: LrArg = None, *, params: Optional[Iterable[torch.Tensor]] = None) -> bool:
        """Update the curvature as scheduled and replace each layer's ``.grad`` by its
        preconditioned gradient. Returns True when it did; returns False, with a warning, and
        changes nothing (curvature, counters, ``.grad``) when the step is refused:

        - a gradient (of any parameter of the model, or of ``params``) or a captured activation
          is not finite;
        - a factor, scale, basis or preconditioned gradient would become non-finite (e.g. one
          batch of huge activations overflowing a float32 factor);
        - the first eigendecomposition of a layer failed on every rung of the eigh ladder (there
          is no basis to precondition with; retried on the next step, an error after
          ``MAX_EIGH_FAILURES`` consecutive failures).

        The finiteness checks are skipped with ``check_finite=False``.

        Args:
            lr: learning rate(s) for KL-clipping (default: the constructor's ``lr``).
            params: further parameters whose gradients are checked for finiteness (the
                optimizers pass theirs).
        """
        self.hooks.check_attached()
        self._check_shapes([n for n, (a, _) in self.layers.items() if a.module.weight.grad is not None])
        self.comm.average_gradients()  # may give a layer unused here the gradient of other ranks
        names = [n for n, (a, _) in self.layers.items() if a.module.weight.grad is not None]
        lrs = ({n: self._lr_of(self.layers[n][0].module.weight, lr) for n in names}
               if self.kl_clip is not None else {})
        factors_due, bases_due, scales_due = self._due()
        try:
            batches = self._batches(names) if (factors_due or scales_due) else {}
            grads = {n: self.layers[n][0].grad_matrix() for n in names}
            if self.check_finite:
                bad = self._nonfinite_inputs(grads, batches, params)
                if not self.comm.all_true(not bad):
                    warnings.warn(f"kfac_cuda: non-finite gradient or activation at step {self.steps}"
                                  f"{' (' + ', '.join(bad) + ')' if bad else ' on another rank'}; "
                                  "step skipped, curvature left untouched", RuntimeWarning)
                    return False
            snapshots = {n: self.layers[n][1].snapshot() for n in names}
            try:
                without_basis = self._update_curvature(names, batches, factors_due, bases_due, scales_due)
            except BaseException:
                self._restore(snapshots)
                raise
            if without_basis:
                self._restore(snapshots)
                warnings.warn(f"kfac_cuda: the first eigendecomposition of layer(s) {without_basis} failed, so "
                              f"there is no basis to precondition with: step {self.steps} skipped, curvature "
                              "and gradients left untouched (retried on the next step)", RuntimeWarning)
                return False
            results = self._precondition(names, grads)
            if self.check_finite:
                bad = self._nonfinite_curvature(names, results)
                if not self.comm.all_true(not bad):
                    self._restore(snapshots)
                    warnings.warn(f"kfac_cuda: the curvature or preconditioned gradient of layer(s) "
                                  f"{bad or 'on another rank'} would become non-finite at step {self.steps} "
                                  "(e.g. activations too large for the factors' dtype): step skipped, "
                                  "curvature left untouched", RuntimeWarning)
                    return False
            self._write_back(results, lrs)
            self.steps += 1
            return True
        finally:
            self.hooks.clear()

    def _check_shapes(self, names: Sequence[str]) -> None:
        """Refuse layers whose parameters were replaced by ones of another shape."""
        for n in names:
            adapter, curvature = self.layers[n]
            want = (curvature.buffers["G"].shape[0], curvature.buffers["A"].shape[0])
            got = (adapter.d_out, adapter.d_in + int(adapter.has_bias))
            bias = getattr(adapter.module, "bias", None)
            if got != want or (adapter.has_bias and (bias is None or bias.shape != (adapter.d_out,))):
                raise ValueError(f"kfac_cuda: layer {n!r} changed shape since the Preconditioner was built "
                                 f"(weight {tuple(adapter.module.weight.shape)}, gradient matrix {got}, "
                                 f"curvature for {want}): build a new optimizer for the new model")

    def _restore(self, snapshots: Dict[str, dict]) -> None:
        for n, snap in snapshots.items():
            self.layers[n][1].restore(snap)

    def _nonfinite_inputs(self, grads: Dict[str, torch.Tensor], batches: Dict[str, LayerBatch],
                          params: Optional[Iterable[torch.Tensor]]) -> List[str]:
        """Names of the non-finite gradients and captured activations (one host sync)."""
        items: Dict[str, List[torch.Tensor]] = {f"gradient of {n!r}": [g] for n, g in grads.items()}
        for n, b in batches.items():
            items[f"activations or output gradients of {n!r}"] = b.tensors()
        seen = set()
        for name, p in list(self.model_params.items()) + [(f"param #{i}", p) for i, p in enumerate(params or ())]:
            if p.grad is not None and id(p) not in seen:
                seen.add(id(p))
                items[f"gradient of {name!r}"] = [p.grad]
        return self._nonfinite({k: torch.stack([torch.isfinite(t).all() for t in ts]).all()
                                for k, ts in items.items() if ts})

    def _nonfinite_curvature(self, names: Sequence[str], results) -> List[str]:
        items = {n: self.layers[n][1].finite() for n in names}
        for n, (U, dot) in results.items():
            items[n] = items[n] & torch.isfinite(U).all() & torch.isfinite(dot).all()
        return self._nonfinite(items)

    @staticmethod
    def _nonfinite(flags: Dict[str, torch.Tensor]) -> List[str]:
        """The names whose flag is False (one host sync)."""
        if not flags:
            return []
        ok = torch.stack(list(flags.values())).tolist()
        return [name for name, good in zip(flags, ok) if not good]

    def _update_curvature(self, names, batches, factors_due, bases_due, scales_due) -> List[str]:
        """Update factors, bases and scales as due; returns the layers left without a basis.

        Across ranks, a layer's factors and scales are averaged over the ranks whose batch used
        it: the estimate those ranks' batches give together. A rank whose batch did not use
        the layer contributes zeros to the sum, which is then divided by the number of ranks
        that used it, so every collective has the same shape on every rank."""
        curvatures = [self.layers[n][1] for n in names]
        used = self.comm.count_true([n in batches for n in names]) if (factors_due or scales_due) else []
        if factors_due:
            for n, c, count in zip(names, curvatures, used):
                if n in batches:
                    c.update_factors(batches[n], self.factor_decay)
                elif count:
                    c.zero_synced_factors()
            self._average_where_used(curvatures, used, lambda c: c.synced_factors())
        without_basis: List[str] = []
        if bases_due or any(not c.has_basis for c in curvatures):
            without_basis = self._refresh_bases([n for n, c in zip(names, curvatures)
                                                 if c.factors_initialized and (bases_due or not c.has_basis)])
        if scales_due and not without_basis:
            for n, c, count in zip(names, curvatures, used):
                if c.has_basis and n in batches:
                    c.update_scales(batches[n], self.scale_decay, fresh=bases_due, restart=self.scale_restart)
                elif c.has_basis and count:
                    c.zero_synced_scales()
            self._average_where_used(curvatures, [count if c.has_basis else 0 for c, count in zip(curvatures, used)],
                                     lambda c: c.synced_scales())
        return without_basis

    def _average_where_used(self, curvatures, used: List[int], tensors_of) -> None:
        """Average ``tensors_of(c)`` of every layer used on ``used[i]`` > 0 ranks over those ranks."""
        world = self.comm.world_size
        self.comm.average_([t for c, count in zip(curvatures, used) if count for t in tensors_of(c)])
        for c, count in zip(curvatures, used):
            if 0 < count < world:  # the average counted the ranks that did not use the layer
                for t in tensors_of(c):
                    t.mul_(world / count)

    def _precondition(self, names, grads) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """(U, <U, V>) of every layer that has a basis."""
        ready = [n for n in names if self.layers[n][1].has_basis]
        damping = self._dampings(ready)
        jobs = [(lambda n=n: self.layers[n][1].precondition(grads[n], damping[n], self.backend)) for n in ready]
        costs = [float(grads[n].numel() * sum(grads[n].shape)) for n in ready]  # GEMM multiply-adds / 2
        specs = [OutputSpec(grads[n].shape, self.layers[n][1].buffers["QA"].dtype, grads[n].device) for n in ready]
        return dict(zip(ready, self.comm.precondition_all(jobs, costs, specs)))

    def _write_back(self, results: Dict[str, Tuple[torch.Tensor, torch.Tensor]], lrs: Dict[str, float]) -> None:
        """Write each U (KL-clipped when ``kl_clip``) into the layers' ``.grad``."""
        if self.kl_clip is not None and results:
            # nu stays on the device (no host sync): nu = 1 where sum lr^2 <U, V> <= 0
            vg = sum(lrs[n] ** 2 * dot for n, (_, dot) in results.items())
            nu = torch.where(vg > 0, (self.kl_clip / vg.clamp_min(torch.finfo(vg.dtype).tiny)).sqrt().clamp(max=1.0),
                             torch.ones_like(vg))
        else:
            nu = None
        for n, (U, _) in results.items():
            self.layers[n][0].set_grad_matrix(U if nu is None else U.mul_(nu))

    # --- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume exactly: factors, bases, scales and counters."""
        return curvature_state(self.method, self.steps, {n: c for n, (_, c) in self.layers.items()})

    def prepare_load(self, state: dict) -> Callable[[], None]:
        """Validate a checkpoint entirely (method, layer names, buffer shapes and dtypes,
        counters; raises naming what is wrong) and return the function that loads it."""
        load = check_curvature_state(self.method, {n: c for n, (_, c) in self.layers.items()}, state)

        def apply() -> None:
            self.steps = load()

        return apply

    def load_state_dict(self, state: dict) -> None:
        """Load a checkpoint of :meth:`state_dict`; nothing changes when it is refused."""
        self.prepare_load(state)()
