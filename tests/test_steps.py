"""Preconditioned steps equal dense float64 computations of the methods' equations,
with the curvature built from per-example gradients (torch.func) where the method defines it so."""
import pytest
import torch
import torch.nn as nn

import kfac_cuda
from fisher_reference import (empirical_fisher, explicit_patches, layer_matrix, output_grads,
                              per_example_grads, unvec, vec, with_ones)


pytestmark = pytest.mark.usefixtures("float64_default")
LR, DAMP = 0.3, 1e-2


def sq_loss(out, y):
    return (out.tanh() - y).square().flatten(1).sum(1).mean()


def one_step(method, model, x, y, **options):
    """Take one optimizer step with every interval 1 and no momentum/decay/clipping; return
    the (d_out, d_in + 1) parameter change and the gradient V it was computed from."""
    opt = getattr(kfac_cuda, method)(model, lr=LR, momentum=0.0, weight_decay=0.0, kl_clip=None, damping=DAMP,
                                      factor_decay=0.0, factor_update_steps=1, inv_update_steps=1, backend="torch",
                                      **options)
    layer = model[0]
    before = layer_matrix(layer.weight, layer.bias).detach().clone()
    opt.zero_grad()
    sq_loss(model(x), y).backward()
    V = layer_matrix(layer.weight.grad, layer.bias.grad).clone()
    opt.step()
    return layer_matrix(layer.weight, layer.bias).detach() - before, V, opt


def linear_case(seed=0, d_in=4, d_out=3, n=7):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, d_out))
    return model, torch.randn(n, d_in), torch.randn(n, d_out)


def kfac_factors(model, x, y):
    a, g = with_ones(x), output_grads(model[0], model, sq_loss, x, y)
    return a.t() @ a / len(x), g.t() @ g / len(x)


def solve_step(M, V):
    return -LR * unvec(torch.linalg.solve(M, vec(V)), V.shape[0])


def test_kfac_eigen_step_is_exact_damped_inverse():
    model, x, y = linear_case()
    A, G = kfac_factors(model, x, y)
    step, V, _ = one_step("KFAC", model, x, y)
    dense = torch.kron(A, G) + DAMP * torch.eye(A.shape[0] * G.shape[0])
    torch.testing.assert_close(step, solve_step(dense, V))


def test_kfac_factored_step():
    model, x, y = linear_case(1)
    A, G = kfac_factors(model, x, y)
    step, V, _ = one_step("KFAC", model, x, y, damping_style="factored")
    pi = ((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0])).sqrt()
    root = DAMP ** 0.5
    dense = torch.kron(A + pi * root * torch.eye(A.shape[0]), G + root / pi * torch.eye(G.shape[0]))
    torch.testing.assert_close(step, solve_step(dense, V))


def rotated_fisher_diagonal(fisher, QA, QG):
    Q = torch.kron(QA, QG)
    return unvec(torch.diagonal(Q.t() @ fisher @ Q), QG.shape[0])


def test_ekfac_scales_equal_rotated_fisher_diagonal_linear():
    model, x, y = linear_case(2)
    _, _, opt = one_step("EKFAC", model, x, y)
    b = opt.preconditioner.layers["0"][1].buffers
    model, x, y = linear_case(2)  # the scales were estimated at the weights before the step
    fisher = empirical_fisher(per_example_grads(model, sq_loss, x, y, "0"))
    torch.testing.assert_close(b["S"], rotated_fisher_diagonal(fisher, b["QA"], b["QG"]))


@pytest.mark.parametrize("sharing", ["expand", "reduce"])
def test_ekfac_scales_conv_sum_positions_per_example(sharing):
    def make():
        torch.manual_seed(3)
        conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        model = nn.Sequential(conv, nn.Flatten())
        x = torch.randn(6, 2, 5, 5)
        return model, x, torch.randn(6, 27)

    model, x, y = make()
    _, _, opt = one_step("EKFAC", model, x, y, weight_sharing=sharing)
    b = opt.preconditioner.layers["0"][1].buffers
    model, x, y = make()
    fisher = empirical_fisher(per_example_grads(model, sq_loss, x, y, "0"))
    torch.testing.assert_close(b["S"], rotated_fisher_diagonal(fisher, b["QA"], b["QG"]))


def test_ekfac_step_uses_scales():
    model, x, y = linear_case(4)
    A, G = kfac_factors(model, x, y)
    per_ex = per_example_grads(model, sq_loss, x, y, "0")
    step, V, _ = one_step("EKFAC", model, x, y)
    eA, QA = torch.linalg.eigh(A)
    eG, QG = torch.linalg.eigh(G)
    Q = torch.kron(QA, QG)
    theta = torch.diagonal(Q.t() @ empirical_fisher(per_ex) @ Q)
    dense = Q @ torch.diag(theta + DAMP) @ Q.t()
    torch.testing.assert_close(step, solve_step(dense, V))


def trace_restricted(model, layer, x, y, a):
    """Phi, Psi, delta from rows a (with ones) and per-example output gradients, pooled rows."""
    g = output_grads(layer, model, sq_loss, x, y)
    g = g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1]) if g.dim() == 4 else g
    a = a.reshape(-1, a.shape[-1])
    n = x.shape[0]
    an, gn = a.square().sum(1), g.square().sum(1)
    delta = (an * gn).sum() / n
    return (a * gn[:, None]).t() @ a / n / delta, (g * an[:, None]).t() @ g / n / delta, delta


def test_tkfac_damped_step_linear():
    model, x, y = linear_case(5)
    phi, psi, delta = trace_restricted(model, model[0], x, y, with_ones(x))
    step, V, _ = one_step("TKFAC", model, x, y)
    root = DAMP ** 0.5
    dense = torch.kron(delta.sqrt() * phi + root * torch.eye(phi.shape[0]),
                       delta.sqrt() * psi + root * torch.eye(psi.shape[0]))
    torch.testing.assert_close(step, solve_step(dense, V))


def conv_case(seed=6):
    torch.manual_seed(seed)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    model = nn.Sequential(conv, nn.Flatten())
    x = torch.randn(4, 2, 4, 4)
    return model, x, torch.randn(4, 48)


def test_tkfac_conv_adaptive_damping():
    """Conv layers: lambda_l = max(tr F_l / dim F_l, damping) with tr F_l = delta."""
    model, x, y = conv_case()
    phi, psi, delta = trace_restricted(model, model[0], x, y, with_ones(explicit_patches(x, model[0])))
    step, V, _ = one_step("TKFAC", model, x, y)
    lam = max(delta.item() / (phi.shape[0] * psi.shape[0]), DAMP)
    assert lam > DAMP  # the adaptive branch is the one exercised
    dense = torch.kron(delta.sqrt() * phi + lam ** 0.5 * torch.eye(phi.shape[0]),
                       delta.sqrt() * psi + lam ** 0.5 * torch.eye(psi.shape[0]))
    torch.testing.assert_close(step, solve_step(dense, V))


@pytest.mark.parametrize("case", ["linear", "conv"])
def test_tekfac_step_equals_docstring_equations(case):
    """U = Q [(Theta + lambda)^-1] Q^T vec V, Q = Q_Phi (x) Q_Psi, Theta the rotated Fisher diagonal,
    lambda = max(mean Theta, damping) for conv layers (TEKFAC Eq. 3.5), damping for a dense-only model."""
    model, x, y = linear_case(7) if case == "linear" else conv_case(8)
    a = with_ones(x) if case == "linear" else with_ones(explicit_patches(x, model[0]))
    phi, psi, _ = trace_restricted(model, model[0], x, y, a)
    fisher = empirical_fisher(per_example_grads(model, sq_loss, x, y, "0"))
    step, V, _ = one_step("TEKFAC", model, x, y)
    Q = torch.kron(torch.linalg.eigh(phi)[1], torch.linalg.eigh(psi)[1])
    theta = torch.diagonal(Q.t() @ fisher @ Q)
    lam = DAMP if case == "linear" else max(theta.mean().item(), DAMP)
    dense = Q @ torch.diag(theta + lam) @ Q.t()
    torch.testing.assert_close(step, solve_step(dense, V))


def test_dense_layers_of_cnn_take_largest_conv_damping():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
    opt = kfac_cuda.TEKFAC(model, lr=0.1, factor_update_steps=1, inv_update_steps=1, backend="torch")
    sq_loss(model(torch.randn(5, 1, 4, 4)), torch.randn(5, 3)).backward()
    opt.step()
    pre = opt.preconditioner
    damp = pre._dampings(list(pre.layers))
    assert damp["2"] == damp["0"] == max(pre.layers["0"][1].natural_damping(), pre.damping)


def test_kl_clip_scales_update():
    model, x, y = linear_case(10)
    free, V, _ = one_step("KFAC", model, x, y)
    model, x, y = linear_case(10)
    opt = kfac_cuda.KFAC(model, lr=LR, momentum=0.0, kl_clip=1e-6, damping=DAMP, factor_decay=0.0,
                         factor_update_steps=1, inv_update_steps=1)
    before = layer_matrix(model[0].weight, model[0].bias).detach().clone()
    sq_loss(model(x), y).backward()
    opt.step()
    clipped = layer_matrix(model[0].weight, model[0].bias).detach() - before
    vg = (free / -LR * V).sum() * LR ** 2
    torch.testing.assert_close(clipped, free * min(1.0, (1e-6 / vg).sqrt().item()))


@pytest.mark.parametrize("restart", ["kronecker", "batch"])
def test_scales_restart_in_new_basis(restart):
    """After a refresh: S = beta * kron spectrum + (1 - beta) * S_batch ("kronecker") or S_batch ("batch")."""
    model, x, y = linear_case(12)
    A, G = kfac_factors(model, x, y)
    per_ex = per_example_grads(model, sq_loss, x, y, "0")
    opt = kfac_cuda.EKFAC(model, lr=LR, momentum=0.0, kl_clip=None, factor_decay=0.6, factor_update_steps=1,
                          inv_update_steps=1, scale_restart=restart, backend="torch")
    sq_loss(model(x), y).backward()
    opt.step()
    b = opt.preconditioner.layers["0"][1].buffers
    batch = rotated_fisher_diagonal(empirical_fisher(per_ex), b["QA"], b["QG"])
    spectrum = torch.outer(torch.linalg.eigvalsh(G), torch.linalg.eigvalsh(A))
    expected = 0.6 * spectrum + 0.4 * batch if restart == "kronecker" else batch
    torch.testing.assert_close(b["S"], expected)
