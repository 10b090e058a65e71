"""Module hooks that capture each layer's forward inputs and output gradients, the MC
("true") Fisher's sampled output gradients, and their assembly into one batch per layer."""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .batch import LayerBatch
from .layers import LayerAdapter


class LayerCapture:
    """One layer's forward inputs and the matching output gradients (or outputs, for MC Fisher)."""

    def __init__(self) -> None:
        self.pairs: List[list] = []  # [input, output_grad or None, output or None]

    def clear(self) -> None:
        self.pairs.clear()


class CaptureHooks:
    """Forward hooks on the preconditioned modules, active while ``active()`` is true.

    Args:
        adapters: the preconditioned layers by name.
        active: whether the current step captures (the schedule's answer).
        fisher: "empirical" (output gradients of the training loss) or "mc" (outputs kept for
            ``sample_fisher``).
        loss_reduction: "mean" (captured output gradients are multiplied by the batch size) or "sum".
    """

    def __init__(self, adapters: Dict[str, LayerAdapter], active: Callable[[], bool], fisher: str,
                 loss_reduction: str):
        self.fisher = fisher
        self.loss_reduction = loss_reduction
        self._active = active
        self.captures: Dict[str, LayerCapture] = {name: LayerCapture() for name in adapters}
        self._handles = [adapter.module.register_forward_hook(self._make_hook(self.captures[name]))
                         for name, adapter in adapters.items()]

    def remove(self) -> None:
        """Remove the module hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        for c in self.captures.values():
            c.clear()

    def _make_hook(self, capture: LayerCapture):
        def hook(module: nn.Module, inputs, output) -> None:
            if not (self._active() and torch.is_grad_enabled() and isinstance(output, torch.Tensor)
                    and output.requires_grad):
                return
            if torch._C._functorch.is_functorch_wrapped_tensor(inputs[0]):
                return  # a torch.func transform (vmap/grad) of the model, not a training step
            x = inputs[0].detach()
            pair = [x, None, None]
            capture.pairs.append(pair)
            if self.fisher == "mc":
                pair[2] = output
                return
            scale = LayerAdapter.batch_size(x) if self.loss_reduction == "mean" else 1

            def grad_hook(g: torch.Tensor) -> None:
                pair[1] = g.detach() * scale

            output.register_hook(grad_hook)

        return hook

    def sample_fisher(self, outputs: torch.Tensor, loss: str = "cross_entropy") -> None:
        """Sample targets from the model's predictive distribution and capture the output
        gradients of their summed loss (see :meth:`kfac_cuda.Preconditioner.sample_fisher`)."""
        if self.fisher != "mc":
            raise RuntimeError("sample_fisher needs Preconditioner(fisher='mc')")
        pairs = [p for c in self.captures.values() for p in c.pairs if p[2] is not None and p[1] is None]
        if not pairs:
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
        elif loss == "mse":
            targets = outputs.detach() + torch.randn_like(outputs)
            sampled = 0.5 * (outputs - targets).square().sum()
        else:
            raise ValueError(f"loss must be 'cross_entropy', 'bernoulli' or 'mse', got {loss!r}")
        grads = torch.autograd.grad(sampled, [p[2] for p in pairs], retain_graph=True, allow_unused=True)
        for p, g in zip(pairs, grads):
            p[1] = torch.zeros_like(p[2]) if g is None else g.detach()
            p[2] = None

    def batches(self, adapters: Dict[str, LayerAdapter], names: Sequence[str], *, sharing: str, backend: str,
                dtypes: Dict[str, torch.dtype], grad_scale=None) -> Dict[str, LayerBatch]:
        """One LayerBatch per named layer that took part in this step's forward and backward.

        Args:
            grad_scale: the GradScaler's current scale to divide the output gradients by, or None.
        """
        out = {}
        for name in names:
            captured = self.captures[name].pairs
            pairs = [p for p in captured if p[1] is not None]
            if captured and not pairs and self.fisher == "mc":
                raise RuntimeError(f"kfac_cuda: layer {name!r} has no sampled output gradients: with "
                                   "fisher='mc' call sample_fisher(outputs) before loss.backward()")
            if not pairs:  # the layer did not take part in this step's forward/backward
                continue
            x = torch.cat([p[0] for p in pairs]) if len(pairs) > 1 else pairs[0][0]
            g = torch.cat([p[1] for p in pairs]) if len(pairs) > 1 else pairs[0][1]
            if grad_scale is not None:
                g = g / grad_scale
            out[name] = LayerBatch(adapters[name], x, g, sharing=sharing, backend=backend, dtype=dtypes[name])
        return out
