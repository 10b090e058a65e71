"""Dense GGN ground truth built without the package: J by torch.func.jacrev, the loss Hessian
by torch.func.hessian of the written-out loss (summed over elements, divided by the batch size)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, hessian, jacrev


def reference_loss(outputs: torch.Tensor, loss: str, targets: torch.Tensor) -> torch.Tensor:
    """The loss each kind names, summed over elements and divided by the batch size."""
    if loss == "cross_entropy":
        value = F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), reduction="sum")
    elif loss == "bernoulli":
        value = F.binary_cross_entropy_with_logits(outputs, targets, reduction="sum")
    else:
        value = 0.5 * (outputs - targets).square().sum()
    return value / outputs.shape[0]


def targets_for(loss: str, outputs: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if loss == "cross_entropy":
        return torch.randint(outputs.shape[-1], outputs.shape[:-1], generator=g)
    if loss == "bernoulli":
        return torch.rand(outputs.shape, generator=g, dtype=outputs.dtype)
    return torch.randn(outputs.shape, generator=g, dtype=outputs.dtype)


def dense_ggn(model: nn.Module, x: torch.Tensor, loss: str) -> torch.Tensor:
    """J^T H J with J (outputs x params) by jacrev and H by hessian of the reference loss."""
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def f(theta: torch.Tensor) -> torch.Tensor:
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = theta[i:i + s.numel()].reshape(s)
            i += s.numel()
        return functional_call(model, parts, (x,)).reshape(-1)

    J = jacrev(f)(flat)
    out = f(flat).detach()
    shape = model(x).shape
    targets = targets_for(loss, model(x).detach())
    H = hessian(lambda o: reference_loss(o.reshape(shape), loss, targets))(out)
    return J.T @ H @ J


def flatten(vector: dict, model: nn.Module) -> torch.Tensor:
    return torch.cat([vector[n].reshape(-1) for n, _ in model.named_parameters()])


def random_vector(model: nn.Module, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}
