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
   nu = min(1, sqrt(kl_clip / sum_layers lr^2 <U, V>)), U <- nu U; with ``eigenbasis_moments``
   it is instead Adam's step in the layer's (possibly just refreshed) eigenbasis
   (kfac_cuda/eigen_moments.py).
Steps 2-5 are a transaction: the touched layers' curvature is snapshotted first and put back
when an update would leave a factor, scale, basis, U or a pending moment (grafting, eigenbasis
moments) non-finite, or when a layer's first eigendecomposition fails; the step is then skipped
with a warning naming the layers, and no moment changes.
Hooks capture inputs and output gradients only on steps that update factors or scales.
"""
from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .batch import SHARING, LayerBatch
from .capture import CaptureHooks
from .checkpoint import check_curvature_state, curvature_state
from .comm import LocalComm, OutputSpec
from .curvature import CURVATURES, ScaleMixin
from .distributed import default_comm
from .blocks import WIDE_SIDE
from .eigen_moments import check_compatible, make_moments
from .exponent import check_exponent
from .grafting import DAMPING_MODES, make_grafting, relative_damping
from .layers import Conv2dAdapter
from . import options
from .ops._dispatch import check_backend
from .estimation import update_curvature
from .registration import Layers, parameter_report, register_layers, summary, unwrap
from .schedule import Due, Schedule
from . import step_guard

METHODS = tuple(CURVATURES)
LrArg = options.LrArg
LOSS_TERMS = ("examples", "tokens")


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
        max_factor_dim, wide_side: a factor side wider than ``max_factor_dim`` is kept "diagonal"
            (default), replaced by a scaled "identity", or the layer is left out ("skip", listed);
            see kfac_cuda/blocks/wide.py. ``summary()`` gives each layer's curvature memory and
            eigendecomposition work.
        grad_scaler: the ``torch.amp.GradScaler`` scaling the loss, if any: captured output
            gradients are divided by its scale (call ``scaler.unscale_(optimizer)`` before
            ``step()`` for the parameter gradients, as for gradient clipping).
        check_finite: skip steps whose gradients or activations are not finite. The check
            reads a flag back to the host; pass False to capture a step in a CUDA graph.
        exponent: the step is (F^ + damping I)^(-exponent) V, 0 < exponent <= 1: 1 (default) is the
            natural gradient of the damped block, 0.5 the inverse square root of Shampoo/SOAP
            (kfac_cuda/exponent.py).
        grafting: None (default), "adam" or "sgd": each layer's preconditioned gradient U is
            rescaled to the norm of that optimizer's step on the layer's raw gradient, U <- U
            ||a|| / ||U|| (Shampoo/SOAP grafting; Adam's per-layer moments, with ``grafting_betas``
            and ``grafting_eps``, are kept in the state_dict). See kfac_cuda/grafting.py.
        damping_mode: "absolute" (default): ``damping`` is lambda; "relative": layer l uses
            lambda_l = damping * mean eigenvalue of its curvature block (replaces adaptive_damping).
        eigenbasis_moments: None (default) or "adam": SOAP's step in the curvature's eigenbasis,
            U = Q_G [m^ / (sqrt(v^) + moment_eps)] Q_A^T with Adam's moments m, v (``moment_betas``,
            default SOAP's (0.9, 0.95)) of the rotated gradient Q_G^T V Q_A, kept in the state_dict
            and carried through basis refreshes (see kfac_cuda/eigen_moments.py). The curvature
            gives only the basis: EKFAC/TEKFAC scales are not estimated (their steps equal
            K-FAC's/TKFAC's); exponent, grafting, damping_mode="relative", damping_style="factored"
            and kl_clip are refused. Follow it with plain SGD (the step's size is Adam's).
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
        wide_side: str = "diagonal",
        grad_scaler=None,
        check_finite: bool = True,
        comm: Optional[LocalComm] = None,
        parameters: Optional[Iterable[nn.Parameter]] = None,
        exponent: float = 1.0,
        grafting: Optional[str] = None,
        grafting_betas: Tuple[float, float] = (0.9, 0.999),
        grafting_eps: float = 1e-8,
        damping_mode: str = "absolute",
        eigenbasis_moments: Optional[str] = None,
        moment_betas: Tuple[float, float] = (0.9, 0.95),
        moment_eps: float = 1e-8,
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
        self.exponent = check_exponent(exponent)
        self.grafting = make_grafting(grafting, betas=grafting_betas, eps=grafting_eps)
        self.damping_mode = options.choice("damping_mode", damping_mode, DAMPING_MODES)
        self.moments = make_moments(eigenbasis_moments, betas=moment_betas, eps=moment_eps)
        self.wide_side = options.choice("wide_side", wide_side, WIDE_SIDE)
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
        if self.moments is not None:
            check_compatible(exponent=self.exponent, grafting=self.grafting, damping_mode=self.damping_mode,
                             damping_style=self.damping_style, kl_clip=self.kl_clip)
        self.adaptive_damping = options.flag("adaptive_damping", adaptive_damping)
        self.check_finite = options.flag("check_finite", check_finite)
        self.grad_scaler = grad_scaler
        self.comm = comm if comm is not None else default_comm()
        self.comm.attach(model)
        model = unwrap(model)  # layer names (and checkpoints) independent of DDP / torch.compile
        self.model_params: Dict[str, nn.Parameter] = dict(model.named_parameters())  # finiteness check
        self.steps = 0
        self._paused = False
        self.schedule = Schedule(self.factor_update_steps, self.inv_update_steps, self.scale_update_steps,
                                 issubclass(CURVATURES[self.method], ScaleMixin) and self.moments is None)
        self.layers: Layers
        self.unsupported: List[Tuple[str, str]]
        optimised = None if parameters is None else {id(p) for p in parameters}
        self.layers, self.unsupported = register_layers(
            model, CURVATURES[self.method], skip_modules=skip_modules, max_factor_dim=max_factor_dim,
            wide_side=self.wide_side, damping_style=self.damping_style, batch_dim=self.batch_dim, per_token=self.loss_terms == "tokens",
            parameters=optimised)
        self._parameter_report = parameter_report(model, self.layers, self.unsupported, optimised)
        me = weakref.ref(self)  # the hooks must not keep the Preconditioner alive
        self.hooks = CaptureHooks(model, {n: a for n, (a, _) in self.layers.items()},
                                  lambda: me() is not None and me().capturing, self.fisher, self.loss_reduction,
                                  per_token=self.loss_terms == "tokens")
        for _, curvature in self.layers.values():
            curvature.exponent = self.exponent
        for adapter, _ in self.layers.values():  # attention layers reroute their forward on capturing steps
            getattr(adapter, "bind", lambda active: None)(lambda: me() is not None and me().capturing)

    def remove(self) -> None:
        """Remove the module hooks (and the attention layers' capture hooks)."""
        self.hooks.remove()
        for adapter, _ in self.layers.values():
            getattr(adapter, "remove", lambda: None)()

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
        return not self._paused and self._due().capture

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Capture nothing inside the block (the quadratic model's extra passes over the batch)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

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
                                  dtypes={n: c.dtype for n, (_, c) in self.layers.items()},
                                  grad_scale=scaler.get_scale() if scaler is not None and scaler.is_enabled()
                                  else None)

    def _lr_of(self, param: nn.Parameter, lr: LrArg) -> float:
        lr = self.lr if lr is None else lr
        if lr is None:
            raise ValueError("kl_clip needs a learning rate: pass lr= to the Preconditioner or to step()")
        return options.real("lr", lr(param) if callable(lr) else lr, low=0.0)

    def _dampings(self, names: Sequence[str]) -> Dict[str, float]:
        """Per-layer damping: fixed, relative to the block's spectrum, or TKFAC/TEKFAC's adaptive conv damping."""
        if self.damping_mode == "relative":
            return {n: relative_damping(self.damping, self.layers[n][1]) for n in names}
        if not (self.adaptive_damping and self.method in ("tkfac", "tekfac")):
            return {n: self.damping for n in names}
        conv = {n: max(self.layers[n][1].natural_damping(), self.damping)
                for n in names if isinstance(self.layers[n][0], Conv2dAdapter)}
        dense = max(conv.values(), default=self.damping)
        return {n: conv.get(n, dense) for n in names}

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

        The finiteness checks are skipped with ``check_finite=False``. (With a DistributedComm
        that averages gradients, ``.grad`` holds the average over ranks even after a refusal.)

        Args:
            lr: learning rate(s) for KL-clipping (default: the constructor's ``lr``).
            params: further parameters whose gradients are checked for finiteness (the
                optimizers pass theirs).
        """
        self.hooks.check_attached()
        step_guard.check_shapes(self.layers, [n for n, (a, _) in self.layers.items() if a.module.weight.grad is not None])
        self.comm.average_gradients()  # may give a layer unused here the gradient of other ranks
        names = [n for n, (a, _) in self.layers.items() if a.module.weight.grad is not None]
        lrs = ({n: self._lr_of(self.layers[n][0].module.weight, lr) for n in names}
               if self.kl_clip is not None else {})
        due = self._due()
        try:
            batches = self._batches(names) if due.capture else {}
            grads = {n: self.layers[n][0].grad_matrix() for n in names}
            if self.check_finite:
                bad = step_guard.nonfinite_inputs(batches, list(self.model_params.items()) +  # every layer's too
                                                  [(f"param #{i}", p) for i, p in enumerate(params or ())])
                if not self.comm.all_true(not bad):
                    warnings.warn(f"kfac_cuda: non-finite gradient or activation at step {self.steps}"
                                  f"{' (' + ', '.join(bad) + ')' if bad else ' on another rank'}; "
                                  "step skipped, curvature left untouched", RuntimeWarning)
                    return False
            touched = (any(due)
                       or any(not self.layers[n][1].has_basis for n in names))  # else the curvature is read only
            snapshots = step_guard.snapshot(self.layers, names if touched else [])
            bases_before = self.moments.bases(self.layers, names) if self.moments is not None else {}
            try:
                without_basis = update_curvature(self.layers, names, batches, due, self.comm,
                                                 factor_decay=self.factor_decay, scale_decay=self.scale_decay,
                                                 scale_restart=self.scale_restart)
            except BaseException:
                step_guard.restore(self.layers, snapshots)
                raise
            if without_basis:
                step_guard.restore(self.layers, snapshots)
                warnings.warn(f"kfac_cuda: the first eigendecomposition of layer(s) {without_basis} failed, so "
                              f"there is no basis to precondition with: step {self.steps} skipped, curvature "
                              "and gradients left untouched (retried on the next step)", RuntimeWarning)
                return False
            pending_moments = {}
            if self.moments is not None:
                results, pending_moments = self.moments.propose(self.layers, names, grads, bases_before)
            else:
                results = self._precondition(names, grads)
            if self.grafting is not None:
                results, grafted_moments = self.grafting.propose(results, grads)
            if self.check_finite:
                bad = step_guard.nonfinite_curvature(self.layers, list(snapshots), results,
                                                     self.moments.finite(pending_moments) if pending_moments else None)
                if not self.comm.all_true(not bad):
                    step_guard.restore(self.layers, snapshots)
                    warnings.warn(f"kfac_cuda: the curvature or preconditioned gradient of layer(s) "
                                  f"{bad or 'on another rank'} would become non-finite at step {self.steps} "
                                  "(e.g. activations too large for the factors' dtype): step skipped, "
                                  "curvature left untouched", RuntimeWarning)
                    return False
            self._write_back(results, lrs)
            if self.grafting is not None:
                self.grafting.commit(grafted_moments)
            if self.moments is not None:
                self.moments.commit(pending_moments)
            self.steps += 1
            return True
        finally:
            self.hooks.clear()

    def _precondition(self, names, grads) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """(U, <U, V>) of every layer that has a basis."""
        ready = [n for n in names if self.layers[n][1].has_basis]
        damping = self._dampings(ready)
        jobs = [(lambda n=n: self.layers[n][1].precondition(grads[n], damping[n], self.backend)) for n in ready]
        costs = [float(grads[n].numel() * sum(grads[n].shape)) for n in ready]  # GEMM multiply-adds / 2
        specs = [OutputSpec(grads[n].shape, self.layers[n][1].dtype, grads[n].device) for n in ready]
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
        """Everything needed to resume exactly: factors, bases, scales, counters (and the grafted
        optimizer's moments with ``grafting``, the eigenbasis moments with ``eigenbasis_moments``)."""
        state = curvature_state(self.method, self.steps, {n: c for n, (_, c) in self.layers.items()})
        if self.grafting is not None:
            state["grafting"] = self.grafting.state_dict()
        if self.moments is not None:
            state["eigenbasis_moments"] = self.moments.state_dict()
        return state

    def prepare_load(self, state: dict) -> Callable[[], None]:
        """Validate a checkpoint entirely (method, layer names, buffer shapes and dtypes,
        counters; raises naming what is wrong) and return the function that loads it."""
        load = check_curvature_state(self.method, {n: c for n, (_, c) in self.layers.items()}, state)
        load_grafting = lambda: None  # noqa: E731
        if self.grafting is not None:
            if "grafting" not in state:
                raise ValueError(f"checkpoint has no grafting state, the Preconditioner grafts {self.grafting.kind!r}")
            load_grafting = self.grafting.prepare_load(
                state["grafting"], {n: tuple(c.grad_shape) for n, (_, c) in self.layers.items()})
        elif "grafting" in state:
            raise ValueError("checkpoint has a grafting state, the Preconditioner has grafting=None")
        load_moments = lambda: None  # noqa: E731
        if self.moments is not None:
            if "eigenbasis_moments" not in state:
                raise ValueError(f"checkpoint has no eigenbasis_moments state, the Preconditioner has "
                                 f"eigenbasis_moments={self.moments.kind!r}")
            load_moments = self.moments.prepare_load(state["eigenbasis_moments"], self.layers)
        elif "eigenbasis_moments" in state:
            raise ValueError("checkpoint has an eigenbasis_moments state, the Preconditioner has eigenbasis_moments=None")

        def apply() -> None:
            self.steps = load()
            load_grafting()
            load_moments()

        return apply

    def load_state_dict(self, state: dict) -> None:
        """Load a checkpoint of :meth:`state_dict`; nothing changes when it is refused."""
        self.prepare_load(state)()
