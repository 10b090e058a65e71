"""GGN/Fisher-vector products against dense matrices built without the code under test:
J by torch.func.jacrev, the loss Hessian by torch.func.hessian of the written-out loss,
float64, to 1e-10."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ggn_reference import dense_ggn, flatten, random_vector
from kfac_cuda.curvature_products import ggn_gram_matrix, ggn_vector_product, loss_hessian_product


def tiny_model(loss: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if loss == "cross_entropy":  # a sequence model: (B, T, C) logits, softmax over the last dim
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)).double()
        return model, torch.randn(3, 2, 3, dtype=torch.float64)
    model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)).double()
    return model, torch.randn(4, 1, 3, 3, dtype=torch.float64)


@pytest.mark.parametrize("loss", ["cross_entropy", "bernoulli", "mse"])
def test_ggn_products_equal_dense_ggn(loss: str) -> None:
    model, x = tiny_model(loss)
    G = dense_ggn(model, x, loss)
    u, v = random_vector(model, 1), random_vector(model, 2)
    gu = ggn_vector_product(model, (x,), {}, u, loss)
    assert torch.allclose(flatten(gu, model), G @ flatten(u, model), atol=1e-10, rtol=0)
    gram = ggn_gram_matrix(model, (x,), {}, [u, v], loss)
    fu, fv = flatten(u, model), flatten(v, model)
    expected = torch.stack([torch.stack([a @ G @ b for b in (fu, fv)]) for a in (fu, fv)])
    assert torch.allclose(gram, expected, atol=1e-10, rtol=0)


def test_sum_reduction_is_n_times_mean() -> None:
    out = torch.randn(5, 3, dtype=torch.float64)
    u = torch.randn(5, 3, dtype=torch.float64)
    mean = loss_hessian_product(out, u, "cross_entropy", "mean")
    total = loss_hessian_product(out, u, "cross_entropy", "sum")
    assert torch.allclose(total, 5 * mean, atol=1e-14)


def test_unknown_loss_and_parameter_are_refused() -> None:
    model, x = tiny_model("mse")
    with pytest.raises(ValueError, match="loss must be one of"):
        ggn_gram_matrix(model, (x,), {}, [random_vector(model, 0)], "hinge")
    with pytest.raises(KeyError, match="unknown parameters"):
        ggn_gram_matrix(model, (x,), {}, [{"nope": torch.zeros(1)}], "mse")
