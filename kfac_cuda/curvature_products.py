"""Exact curvature-vector products of a model and its loss: the generalised Gauss-Newton
(GGN) matrix G = J^T H J, with J the Jacobian of the model's outputs with respect to its
parameters and H the Hessian of the loss with respect to the outputs.

For the losses supported here the outputs are the natural parameters of the predictive
distribution (logits, or the mean of a unit-variance Gaussian), so the GGN equals the
(true) Fisher (Martens & Grosse 2015, §2-3; Martens 2020). Conventions are those of
:meth:`kfac_cuda.Preconditioner.sample_fisher`: the loss is summed over every output
element and, with ``loss_reduction="mean"``, divided by the batch size n = outputs.shape[0]:

- ``"cross_entropy"``: softmax over the last dimension, per row H = diag(p) - p p^T;
- ``"bernoulli"``: independent sigmoid outputs (BCE with logits), H = diag(p (1 - p));
- ``"mse"``: 0.5 * |y - f|^2, H = I (``F.mse_loss(reduction="mean")`` over C outputs per
  example is 2/C times this loss: its curvature is 2/C times ours).

J v is computed in forward mode (``torch.func.jvp`` through ``torch.func.functional_call``
of the model on the same inputs), one forward-mode pass per vector, so the quadratic
forms v_i^T G v_j = (J v_i)^T H (J v_j) cost a few forward passes and never form J.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, jvp

LOSSES = ("cross_entropy", "bernoulli", "mse")

ParamVector = Dict[str, torch.Tensor]


def check_loss(loss: str) -> str:
    """Return ``loss`` if it is one of :data:`LOSSES`, else raise ValueError naming them."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return loss


def loss_hessian_product(outputs: torch.Tensor, tangent: torch.Tensor, loss: str,
                         loss_reduction: str = "mean") -> torch.Tensor:
    """H u for the Hessian H of the loss (see the module docstring) at ``outputs``."""
    check_loss(loss)
    outputs = outputs.detach()
    if loss == "cross_entropy":
        p = F.softmax(outputs, dim=-1)
        hu = p * tangent - p * (p * tangent).sum(dim=-1, keepdim=True)
    elif loss == "bernoulli":
        p = torch.sigmoid(outputs)
        hu = p * (1 - p) * tangent
    else:
        hu = tangent.clone()
    return hu / outputs.shape[0] if loss_reduction == "mean" else hu


def output_jvps(model: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], vectors: Sequence[ParamVector]
                ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """The model's outputs on (args, kwargs) and J v for each parameter vector v.

    Args:
        vectors: dicts from parameter name (as in ``model.named_parameters()``) to a tensor
            of the parameter's shape; parameters missing from a dict have zero tangent.
    """
    params = {name: p.detach() for name, p in model.named_parameters()}
    for v in vectors:
        unknown = set(v) - set(params)
        if unknown:
            raise KeyError(f"vector entries for unknown parameters: {sorted(unknown)}")

    def forward(primals: Dict[str, torch.Tensor]) -> torch.Tensor:
        out = functional_call(model, primals, args, kwargs)
        if not isinstance(out, torch.Tensor):
            raise TypeError("the quadratic model needs a model whose forward returns one tensor, "
                            f"got {type(out).__name__}")
        return out

    outputs, jvs = None, []
    with torch.no_grad():
        for v in vectors:
            tangents = {name: v.get(name, torch.zeros_like(p)).to(p.dtype) for name, p in params.items()}
            outputs, jv = jvp(forward, (params,), (tangents,))
            jvs.append(jv)
        if outputs is None:
            outputs = forward(params)
    return outputs, jvs


def ggn_gram_matrix(model: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any],
                    vectors: Sequence[ParamVector], loss: str, loss_reduction: str = "mean") -> torch.Tensor:
    """The k x k matrix of v_i^T G v_j for the GGN G of ``model`` and ``loss`` on one batch,
    in float64."""
    outputs, jvs = output_jvps(model, args, kwargs, vectors)
    hjvs = [loss_hessian_product(outputs, jv, loss, loss_reduction) for jv in jvs]
    k = len(vectors)
    gram = torch.zeros(k, k, dtype=torch.float64)
    for i in range(k):
        for j in range(i, k):
            gram[i, j] = gram[j, i] = (jvs[i].double() * hjvs[j].double()).sum().cpu()
    return gram


def ggn_vector_product(model: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], vector: ParamVector,
                       loss: str, loss_reduction: str = "mean") -> ParamVector:
    """G v as a dict of parameter-shaped tensors: J^T H J v, with J^T by a vector-Jacobian
    product (one backward) after the forward-mode J v."""
    outputs, (jv,) = output_jvps(model, args, kwargs, [vector])
    hjv = loss_hessian_product(outputs, jv, loss, loss_reduction)
    names = [name for name, _ in model.named_parameters()]
    with torch.enable_grad():
        params = {name: p.detach().requires_grad_(True) for name, p in model.named_parameters()}
        out = functional_call(model, params, args, kwargs)
        grads = torch.autograd.grad(out, [params[n] for n in names], hjv, allow_unused=True)
    return {n: (torch.zeros_like(params[n]) if g is None else g.detach()) for n, g in zip(names, grads)}
