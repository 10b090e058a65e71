"""Kronecker factors of Linear and Conv2d equal their definitions, computed explicitly
(per-example output gradients from a sum-reduced loss, conv patches by slicing)."""
import pytest
import torch
import torch.nn as nn

import kfac_cuda
from fisher_reference import (empirical_fisher, explicit_patches, output_grads, per_example_grads,
                              with_ones)


pytestmark = pytest.mark.usefixtures("float64_default")


def sq_loss(out, y):
    """Mean over examples of a per-example loss (sum over everything else)."""
    return (out.tanh() - y).square().flatten(1).sum(1).mean()


def sq_loss_sum(out, y):
    return (out.tanh() - y).square().sum()


def run_one_step(model, x, y, method="kfac", loss=sq_loss, **options):
    pre = kfac_cuda.Preconditioner(model, method, factor_decay=0.0, factor_update_steps=1,
                                   inv_update_steps=1, backend="torch", **options)
    model.zero_grad()
    loss(model(x), y).backward()
    assert pre.step()
    return pre.layers["0"][1].buffers


def expected_factors(a, g, sharing):
    """a: (n, T, d_in) with ones appended, g: (n, T, d_out) per-example output grads."""
    n, T = a.shape[:2]
    if sharing == "expand":
        ar, gr = a.reshape(n * T, -1), g.reshape(n * T, -1)
        return ar.t() @ ar / (n * T), gr.t() @ gr / n
    ar, gr = a.mean(1), g.sum(1)
    return ar.t() @ ar / n, gr.t() @ gr / n


@pytest.mark.parametrize("sharing", ["expand", "reduce"])
@pytest.mark.parametrize("T", [1, 4])
def test_linear_factors(sharing, T):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    x, y = torch.randn(6, T, 5), torch.randn(6, T, 3)
    buf = run_one_step(model, x, y, weight_sharing=sharing)
    g = output_grads(model[0], model, sq_loss, x, y)
    A, G = expected_factors(with_ones(x), g, sharing)
    torch.testing.assert_close(buf["A"], A)
    torch.testing.assert_close(buf["G"], G)


def test_loss_reduction_sum_matches_mean():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(9, 4), torch.randn(9, 3)
    mean = {k: v.clone() for k, v in run_one_step(model, x, y).items() if k in "AG"}
    summed = run_one_step(model, x, y, loss=sq_loss_sum, loss_reduction="sum")
    for k in "AG":
        torch.testing.assert_close(summed[k], mean[k])


@pytest.mark.parametrize("sharing", ["expand", "reduce"])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_factors(sharing, bias):
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=bias)
    model = nn.Sequential(conv)
    x = torch.randn(5, 2, 7, 8)
    y = torch.randn_like(model(x))
    buf = run_one_step(model, x, y, weight_sharing=sharing)
    patches = explicit_patches(x, conv)
    a = with_ones(patches) if bias else patches
    g = output_grads(conv, model, sq_loss, x, y).flatten(2).transpose(1, 2)
    A, G = expected_factors(a, g, sharing)
    torch.testing.assert_close(buf["A"], A)
    torch.testing.assert_close(buf["G"], G)


def test_tkfac_factors_and_trace_equal_fisher_trace():
    """P = E[|g|^2 abar abar^T], R = E[|abar|^2 g g^T], delta = E[|abar|^2 |g|^2] = tr F."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    buf = run_one_step(model, x, y, method="tkfac")
    a, g = with_ones(x), output_grads(model[0], model, sq_loss, x, y)
    an, gn = a.square().sum(1), g.square().sum(1)
    torch.testing.assert_close(buf["A"], (a * gn[:, None]).t() @ a / 8)
    torch.testing.assert_close(buf["G"], (g * an[:, None]).t() @ g / 8)
    fisher = empirical_fisher(per_example_grads(model, sq_loss, x, y, "0"))
    phi, psi = buf["A"] / buf["delta"], buf["G"] / buf["delta"]
    torch.testing.assert_close(torch.trace(buf["delta"] * torch.kron(phi, psi)), torch.trace(fisher))
    torch.testing.assert_close(torch.trace(phi), torch.tensor(1.0))
    torch.testing.assert_close(torch.trace(psi), torch.tensor(1.0))


def test_factor_ema():
    """A_2 = beta A_1 + (1 - beta) A_batch2, with A_1 the first batch's factor."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 2))
    pre = kfac_cuda.Preconditioner(model, "kfac", factor_decay=0.7, factor_update_steps=1, backend="torch")
    xs = [torch.randn(5, 3), torch.randn(5, 3)]
    for x in xs:
        model.zero_grad()
        sq_loss(model(x), torch.zeros(5, 2)).backward()
        pre.step()
    a1, a2 = with_ones(xs[0]), with_ones(xs[1])
    expected = 0.7 * (a1.t() @ a1 / 5) + 0.3 * (a2.t() @ a2 / 5)
    torch.testing.assert_close(pre.layers["0"][1].buffers["A"], expected)


@pytest.mark.parametrize("method", ["kfac", "tkfac"])
def test_conv_input_path_without_patches_matches_patches(method, monkeypatch):
    """The GPU route for expanded Conv2d rows (factor straight from the input, |abar|^2 as a
    convolution of x^2) gives the factors of the patch route."""
    from kfac_cuda.batch import LayerBatch

    def factors(direct):
        monkeypatch.setattr(LayerBatch, "_conv_kernel_path", property(lambda self: direct))
        torch.manual_seed(11)
        model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2))
        x = torch.randn(4, 2, 9, 7)
        return {k: v.clone() for k, v in run_one_step(model, x, torch.randn_like(model(x)), method=method).items()
                if k in ("A", "G", "delta")}

    patched, direct = factors(False), factors(True)
    for k in patched:
        torch.testing.assert_close(direct[k], patched[k])
