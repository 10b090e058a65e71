"""Module hooks that capture each layer's forward inputs and output gradients (or, for the MC
("true") Fisher, the output gradients of a sampled loss), and their assembly into one batch
per layer.

What counts (checked by tests/test_training_loops.py):
- A forward pass contributes only when its output gradients arrive: the layer input is kept
  in the closure of a gradient hook on the layer output, and (input, gradient) is recorded
  when the gradient arrives. A forward with grad enabled that is never followed by a
  backward (validation loss, logging) contributes nothing, and its memory goes with its graph.
- Every forward pass of the root model that reached a backward before ``step()`` is part of
  the step's batch (gradient accumulation: k micro-batches, each loss divided by k): the
  per-example scaling of a mean-reduced loss multiplies by the number of examples of the
  whole step, so k micro-batches give the curvature of their concatenated batch. Layer calls
  outside a forward pass of the root model (a loop that calls submodules itself, or the
  recomputation of reentrant activation checkpointing) add rows but count examples only where
  no forward pass of the root model reached a backward: then each layer counts its own calls.
- With ``fisher="mc"`` only gradients of ``sample_fisher``'s sampled loss are recorded: a
  layer output outside the graph of the given outputs receives none and is not counted.
- Under torch.compile the layer hooks are traced into the graph (no graph break, no guard on
  the capture state): the layer output passes through an identity autograd.Function whose
  backward calls the opaque custom op ``kfac_cuda::capture_output_grad``; its Python body,
  run with the real tensors during backward, decides whether the step captures and records
  copies of (input, gradient). Each compiled call counts as its own forward pass (a layer
  called twice in one compiled forward counts its examples twice).
- The hooks hold the CaptureHooks (and so the Preconditioner) only weakly: a Preconditioner
  that is dropped removes its hooks and stops capturing. One Preconditioner per layer: a new
  one on layers that a live one hooks takes them over with a warning, and the old one's
  ``step()`` then raises.
"""
from __future__ import annotations

import gc
import itertools
import warnings
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .batch import Call, LayerBatch
from .layers import LayerAdapter

_OWNERS: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()
_TAPS: Dict[int, Tuple[weakref.ref, str]] = {}  # compiled-graph token -> (CaptureHooks, layer name)
_TOKENS = itertools.count()
_SINK = torch.zeros(1)  # what the capture op declares it mutates, so that no compiler drops it


@torch.library.custom_op("kfac_cuda::capture_output_grad", mutates_args=("sink",))
def _capture_output_grad(sink: torch.Tensor, x: torch.Tensor, g: torch.Tensor, token: int) -> None:
    """Backward of a compiled layer output: hand (input, output gradient) to the layer's CaptureHooks."""
    ref, name = _TAPS.get(token, (None, ""))
    hooks = ref() if ref is not None else None
    if hooks is not None:
        hooks._on_compiled_grad(name, x, g)


@_capture_output_grad.register_fake
def _(sink: torch.Tensor, x: torch.Tensor, g: torch.Tensor, token: int) -> None:
    return None


class _CompiledTap(torch.autograd.Function):
    """Identity on a layer output whose backward passes (input, output gradient) to the capture op."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, x: torch.Tensor, token: int) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.token = token
        return output.view_as(output)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (x,) = ctx.saved_tensors
        torch.ops.kfac_cuda.capture_output_grad(_SINK, x, g, ctx.token)
        return g, None, None


def _remove_handles(handles: list, tokens: Sequence[int] = ()) -> None:
    for h in handles:
        h.remove()
    handles.clear()
    for t in tokens:
        _TAPS.pop(t, None)


class CaptureHooks:
    """Forward hooks on the preconditioned modules (and on the root model, to tell forward
    passes apart), active while ``active()`` is true.

    Args:
        model: the root model (unwrapped from DDP / torch.compile).
        adapters: the preconditioned layers by name.
        active: whether the current step captures (the schedule's answer).
        fisher: "empirical" (output gradients of the training loss) or "mc" (``sample_fisher``).
        loss_reduction: "mean" (captured output gradients are multiplied by the number of
            examples of the step) or "sum".
        per_token: every position of a sequence is an example (a per-token loss): the
            examples counted are tokens.
    """

    def __init__(self, model: nn.Module, adapters: Dict[str, LayerAdapter], active: Callable[[], bool], fisher: str,
                 loss_reduction: str, per_token: bool = False):
        self.fisher = fisher
        self.loss_reduction = loss_reduction
        self.per_token = per_token
        self.adapters = adapters
        self._active = active
        self._ids = itertools.count()
        self._forward: Optional[int] = None  # id of the root forward pass in progress
        self._forward_examples: Optional[int] = None  # its examples (those of its first captured call)
        # filled as gradients arrive, so that only forward passes that reached a backward are held:
        self._examples: Dict[int, int] = {}  # forward id whose gradients arrived -> examples (tokens) in it
        self._orphans: Dict[int, str] = {}  # forward id of a layer call outside a root forward -> layer
        self.captures: Dict[str, Dict[int, List[Call]]] = {name: {} for name in adapters}
        self._unsampled: Set[str] = set()  # MC: layers that got a training backward
        self._compiled_calls: Set[Tuple[int, str]] = set()  # (autograd graph task, layer) seen compiled
        self._sampling = False
        self.superseded = False
        self._handles: list = []
        self._take_over([a.module for a in adapters.values()])
        ref = weakref.ref(self)
        self._tokens: List[int] = []
        for name, adapter in adapters.items():
            token = next(_TOKENS)
            _TAPS[token] = (ref, name)
            self._tokens.append(token)
            self._handles.append(adapter.module.register_forward_hook(self._layer_hook(ref, name, token)))
            _OWNERS[adapter.module] = ref
        if adapters:
            self._handles.append(model.register_forward_pre_hook(self._root_hook(ref, True)))
            self._handles.append(model.register_forward_hook(self._root_hook(ref, False), always_call=True))
        weakref.finalize(self, _remove_handles, self._handles, self._tokens)

    # --- lifetime --------------------------------------------------------------------------
    @staticmethod
    def _live_owners(modules: Sequence[nn.Module]) -> Dict["CaptureHooks", List[nn.Module]]:
        owners: Dict[CaptureHooks, List[nn.Module]] = {}
        for m in modules:
            ref = _OWNERS.get(m)
            owner = ref() if ref is not None else None
            if owner is not None and owner._handles:
                owners.setdefault(owner, []).append(m)
        return owners

    def _take_over(self, modules: Sequence[nn.Module]) -> None:
        """Hooks of a live CaptureHooks on the same modules are removed, with a warning."""
        if not self._live_owners(modules):
            return
        gc.collect()  # a dropped optimizer waiting in a reference cycle is not a conflict
        for owner, taken in self._live_owners(modules).items():
            owner.remove()
            owner.superseded = True
            warnings.warn(f"kfac_cuda: a new Preconditioner takes over {len(taken)} layer(s) that another live "
                          "Preconditioner (optimizer) hooks; the old one stops capturing and its step() raises. "
                          "Use one Preconditioner per model, or call old.remove() first.", RuntimeWarning,
                          stacklevel=4)

    def check_attached(self) -> None:
        if self.superseded:
            raise RuntimeError("kfac_cuda: this Preconditioner's hooks were taken over by a newer Preconditioner "
                               "on the same model; step() the new one (one Preconditioner per model)")

    def remove(self) -> None:
        """Remove the module hooks."""
        _remove_handles(self._handles, self._tokens)

    def clear(self) -> None:
        for c in self.captures.values():
            c.clear()
        self._examples.clear()
        self._orphans.clear()
        self._unsampled.clear()
        self._compiled_calls.clear()

    # --- hooks ---------------------------------------------------------------------------
    @staticmethod
    def _root_hook(ref: weakref.ref, starting: bool):
        def hook(*_) -> None:
            if torch.compiler.is_compiling():
                return  # compiled calls are forward passes of their own
            hooks = ref()
            if hooks is not None:
                hooks._forward = next(hooks._ids) if starting else None
                hooks._forward_examples = None

        return hook

    @staticmethod
    def _layer_hook(ref: weakref.ref, name: str, token: int):
        def hook(module: nn.Module, inputs, output):
            if torch.compiler.is_compiling():  # traced: nothing here depends on the capture state
                if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
                    return _CompiledTap.apply(output, inputs[0].detach(), token)
                return None
            hooks = ref()
            if hooks is not None:
                hooks._on_forward(name, inputs, output)
            return None

        return hook

    def _on_forward(self, name: str, inputs, output) -> None:
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad
                and self._active()):
            return
        if torch._C._functorch.is_functorch_wrapped_tensor(inputs[0]):
            return  # a torch.func transform (vmap/grad) of the model, not a training step
        x = inputs[0].detach()
        adapter = self.adapters[name]
        tokens = getattr(adapter, "token_count", lambda t: t[..., 0].numel())  # an embedding's input: indices
        examples = tokens(x) if self.per_token else adapter.batch_size(x)
        forward, orphan = self._forward, self._forward is None
        if orphan:  # a call outside a forward pass of the root model
            forward = next(self._ids)
        elif self._forward_examples is None:
            self._forward_examples = examples
        else:
            examples = self._forward_examples
        ref = weakref.ref(self)

        def on_grad(g: torch.Tensor) -> None:
            hooks = ref()
            if hooks is not None:
                hooks._on_grad(name, forward, examples, orphan, x, g)

        output.register_hook(on_grad)

    def _on_compiled_grad(self, name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        """An output gradient from a compiled graph: a forward pass of its own. The tensors are
        copied (a compiled backward may reuse their buffers)."""
        if not self._active():
            return
        if self._sampling != (self.fisher == "mc"):
            if self.fisher == "mc":
                self._unsampled.add(name)
            return
        call = (torch._C._current_graph_task_id(), name)
        if call in self._compiled_calls:
            warnings.warn(f"kfac_cuda: layer {name!r} of a compiled model received several output gradients in one "
                          "backward; each counts as a forward pass of its own (right for several forward passes in "
                          "one loss, not for a layer called twice in one forward: its examples are then counted "
                          "twice; run such a model eagerly for exact counts)", RuntimeWarning)
        self._compiled_calls.add(call)
        examples = x[..., 0].numel() if self.per_token else self.adapters[name].batch_size(x)
        self._on_grad(name, next(self._ids), examples, True, x.detach().clone(), g.detach().clone())

    def _on_grad(self, name: str, forward: int, examples: int, orphan: bool, x: torch.Tensor,
                 g: torch.Tensor) -> None:
        if self._sampling != (self.fisher == "mc"):
            if self.fisher == "mc":
                self._unsampled.add(name)
            return
        self.captures[name].setdefault(forward, []).append((x, g.detach()))
        self._examples.setdefault(forward, examples)
        if orphan:
            self._orphans[forward] = name

    # --- MC Fisher -----------------------------------------------------------------------
    def sample_fisher(self, outputs: torch.Tensor, loss: str = "cross_entropy") -> None:
        """Sample targets from the model's predictive distribution and capture the output
        gradients of their summed loss (see :meth:`kfac_cuda.Preconditioner.sample_fisher`)."""
        if self.fisher != "mc":
            raise RuntimeError("sample_fisher needs Preconditioner(fisher='mc')")
        if loss not in ("cross_entropy", "bernoulli", "mse"):
            raise ValueError(f"loss must be 'cross_entropy', 'bernoulli' or 'mse', got {loss!r}")
        weights = [a.module.weight for a in self.adapters.values() if a.module.weight.requires_grad]
        if not (self._active() and outputs.requires_grad and weights):
            return
        if loss == "cross_entropy":
            logits = outputs.reshape(-1, outputs.shape[-1])
            with torch.no_grad():
                targets = torch.multinomial(F.softmax(logits.float(), dim=-1), 1).squeeze(-1)
            sampled = F.cross_entropy(logits, targets, reduction="sum")
        elif loss == "bernoulli":
            with torch.no_grad():
                targets = torch.bernoulli(torch.sigmoid(outputs.float())).to(outputs.dtype)
            sampled = F.binary_cross_entropy_with_logits(outputs, targets, reduction="sum")
        else:
            targets = outputs.detach() + torch.randn_like(outputs)
            sampled = 0.5 * (outputs - targets).square().sum()
        # The gradient hooks of every layer output in the graph of `outputs` fire on the way
        # to the weights (whose gradients are discarded; .grad is untouched).
        self._sampling = True
        try:
            torch.autograd.grad(sampled, weights, retain_graph=True, allow_unused=True)
        finally:
            self._sampling = False

    # --- the step's batches ----------------------------------------------------------------
    def examples(self, name: str) -> int:
        """Examples (tokens, per token) of the forward passes that reached a backward since the last
        step: the root model's, or where there are none, layer ``name``'s own calls."""
        rooted = sum(n for f, n in self._examples.items() if f not in self._orphans)
        return rooted or sum(n for f, n in self._examples.items() if self._orphans[f] == name)

    def batches(self, names: Sequence[str], *, sharing: str, backend: str, dtypes: Dict[str, torch.dtype],
                grad_scale=None) -> Dict[str, LayerBatch]:
        """One LayerBatch per named layer that took part in this step's forward and backward.

        Args:
            grad_scale: the GradScaler's current scale to divide the output gradients by, or None.
        """
        out = {}
        for name in names:
            examples = self.examples(name)
            per_example = examples if self.fisher == "empirical" and self.loss_reduction == "mean" else 1
            factor = per_example / grad_scale if grad_scale is not None else per_example
            captured = self.captures[name]
            if not captured:
                if name in self._unsampled:
                    raise RuntimeError(f"kfac_cuda: layer {name!r} has no sampled output gradients: with "
                                       "fisher='mc' call sample_fisher(outputs) before loss.backward()")
                continue  # the layer did not take part in this step's forward/backward
            forwards = [[(x, g * factor if factor != 1 else g) for x, g in captured[f]] for f in sorted(captured)]
            out[name] = LayerBatch(self.adapters[name], forwards, examples=examples, sharing=sharing,
                                   backend=backend, dtype=dtypes[name], per_token=self.per_token)
        return out
