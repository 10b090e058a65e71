"""The preconditioner exponent (kfac_cuda/exponent.py): U = (F^ + damping I)^(-p) V, checked
against a dense float64 matrix power of the damped Kronecker-structured block."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_cuda

from fisher_reference import dense_block, unvec, vec


def matrix_power(M, p):
    evals, evecs = torch.linalg.eigh(M)
    return evecs @ torch.diag(evals.pow(p)) @ evecs.t()


@pytest.mark.parametrize("exponent", [0.5, 0.25, 1.0])
@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_exponent_is_a_matrix_power_of_the_damped_block(method, exponent):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(9, 3, dtype=torch.float64), torch.randint(0, 2, (9,))
    damping = 1e-2
    pre = kfac_cuda.Preconditioner(model, method, factor_decay=0.0, factor_update_steps=1, damping=damping,
                                   exponent=exponent, backend="torch")
    F.cross_entropy(model(x), y).backward()
    V = torch.cat([model[2].weight.grad, model[2].bias.grad[:, None]], dim=1)
    assert pre.step()
    block = dense_block(pre.layers["2"][1].buffers, method)
    expected = matrix_power(block + damping * torch.eye(block.shape[0], dtype=torch.float64), -exponent) @ vec(V)
    U = torch.cat([model[2].weight.grad, model[2].bias.grad[:, None]], dim=1)
    torch.testing.assert_close(U, unvec(expected, 2), rtol=1e-8, atol=1e-12)


def test_exponent_on_a_norm_layer_divides_by_the_diagonal_power():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    pre = kfac_cuda.Preconditioner(model, factor_decay=0.0, factor_update_steps=1, damping=1e-3, exponent=0.5,
                                   backend="torch")
    F.cross_entropy(model(torch.randn(5, 3, dtype=torch.float64)), torch.randint(0, 2, (5,))).backward()
    V = torch.stack([model[1].weight.grad, model[1].bias.grad], dim=-1)
    assert pre.step()
    D = pre.layers["1"][1].buffers["D"]
    torch.testing.assert_close(torch.stack([model[1].weight.grad, model[1].bias.grad], dim=-1),
                               V / (D + 1e-3).sqrt())


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_exponent_outside_the_unit_interval_is_refused(bad):
    with pytest.raises(ValueError, match="exponent"):
        kfac_cuda.Preconditioner(nn.Linear(2, 2), exponent=bad)
