"""Ground truth built without the package: per-example gradients with torch.func, dense
empirical Fisher blocks, explicit conv patches by slicing. Conventions follow
kfac_cuda/layers.py: V = [dW | db] (d_out, d_in + 1), vec stacks columns."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap


def vec(V: torch.Tensor) -> torch.Tensor:
    return V.t().reshape(-1)


def unvec(v: torch.Tensor, d_out: int) -> torch.Tensor:
    return v.reshape(-1, d_out).t()


def layer_matrix(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    w = weight.reshape(weight.shape[0], -1)
    return w if bias is None else torch.cat([w, bias.reshape(-1, 1)], dim=1)


def per_example_grads(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, layer: str) -> torch.Tensor:
    """(n, d_out, d_in + 1) per-example gradients [dW_i | db_i] of loss_fn(model(x_i), y_i)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    w, b = g[f"{layer}.weight"], g.get(f"{layer}.bias")
    n = x.shape[0]
    w = w.reshape(n, w.shape[1], -1)
    return w if b is None else torch.cat([w, b.unsqueeze(-1)], dim=-1)


def empirical_fisher(per_example: torch.Tensor) -> torch.Tensor:
    """F = 1/n sum_i vec(dW_i) vec(dW_i)^T."""
    vs = per_example.transpose(1, 2).reshape(per_example.shape[0], -1)
    return vs.t() @ vs / per_example.shape[0]


def explicit_patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """(n, positions, C*kh*kw) patches by padding and slicing (no unfold)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    xp = F.pad(x, (pw, pw, ph, ph))
    H, W = xp.shape[-2:]
    oh, ow = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(oh):
        for j in range(ow):
            win = xp[:, :, i * sh: i * sh + dh * (kh - 1) + 1: dh, j * sw: j * sw + dw * (kw - 1) + 1: dw]
            rows.append(win.reshape(x.shape[0], -1))
    return torch.stack(rows, dim=1)


def with_ones(a: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)


def output_grads(layer: nn.Module, model: nn.Module, loss_fn, x, y) -> torch.Tensor:
    """Gradient of the SUM of per-example losses w.r.t. ``layer``'s output (per-example g)."""
    store = {}

    def keep(module, inputs, out):
        out.retain_grad()
        store["o"] = out

    h = layer.register_forward_hook(keep)
    out = model(x)
    h.remove()
    total = sum(loss_fn(out[i:i + 1], y[i:i + 1]) for i in range(x.shape[0]))
    total.backward()
    model.zero_grad()
    return store["o"].grad.detach()


def dense_block(buffers: dict, method: str) -> torch.Tensor:
    """The dense curvature block a K-FAC ("kfac": A kron G) or EKFAC ("ekfac": Q diag(S) Q^T in
    the Kronecker eigenbasis Q = Q_A kron Q_G) layer's buffers stand for."""
    if method == "kfac":
        return torch.kron(buffers["A"], buffers["G"])
    Q = torch.kron(buffers["QA"], buffers["QG"])
    return Q @ torch.diag(vec(buffers["S"])) @ Q.t()
