"""Every op's reference and kernel wrapper run one argument check: None, NumPy arrays, integer
factors (silently truncated before) and complex inputs (imaginary part dropped before) are
refused with a TypeError naming the op and the argument, by both implementations alike.
accumulate_scale with T = 0 positions is S <- beta*S (every per-example sum is empty)."""
import math

import numpy as np
import pytest
import torch

from kfac_cuda.ops import accumulate_conv_factor, accumulate_factor, accumulate_scale, precondition
from kfac_cuda.ops.conv_factor_accumulate import accumulate_conv_factor_cuda, accumulate_conv_factor_reference
from kfac_cuda.ops.factor_accumulate import accumulate_factor_cuda, accumulate_factor_reference
from kfac_cuda.ops.precondition import precondition_cuda, precondition_reference
from kfac_cuda.ops.scale_accumulate import accumulate_scale_cuda, accumulate_scale_reference


def good():
    g = torch.Generator().manual_seed(0)
    return dict(A=torch.zeros(4, 4), a=torch.randn(5, 3, generator=g), S=torch.zeros(2, 4),
                g=torch.randn(5, 2, generator=g), QG=torch.eye(2), QA=torch.eye(4), V=torch.randn(2, 4, generator=g),
                x=torch.randn(2, 1, 4, 4, generator=g), Ac=torch.zeros(10, 10))


def factor(impl, A, a, **kw):
    return impl(A, a, bias=True, **kw)


def scale(impl, S, g, a, **kw):
    return impl(S, g, a, good()["QG"], good()["QA"], bias=True, **kw)


def pre(impl, V, QG, QA, **kw):
    return impl(V, QG, QA, damping=0.1, scale=torch.ones(2, 4), **kw)


def conv(impl, A, x, **kw):
    return impl(A, x, kernel_size=(3, 3), stride=(1, 1), padding=(0, 0), dilation=(1, 1), bias=True, **kw)


BAD = {
    "None": lambda t: None,
    "numpy": lambda t: np.zeros(tuple(t.shape), dtype=np.float32),
    "int32": lambda t: t.to(torch.int32),
    "complex": lambda t: t.to(torch.complex64),
}
CASES = [  # (op name, implementations, call, argument names in call order)
    ("accumulate_factor", (accumulate_factor, accumulate_factor_reference, accumulate_factor_cuda), factor, ("A", "a")),
    ("accumulate_scale", (accumulate_scale, accumulate_scale_reference, accumulate_scale_cuda), scale, ("S", "g", "a")),
    ("precondition", (precondition, precondition_reference, precondition_cuda), pre, ("V", "QG", "QA")),
    ("accumulate_conv_factor", (accumulate_conv_factor, accumulate_conv_factor_reference,
                                accumulate_conv_factor_cuda), conv, ("Ac", "x")),
]
PARAM_NAMES = {"V": "grad", "Ac": "A"}


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("op, impls, call, args", CASES, ids=[c[0] for c in CASES])
def test_bad_tensor_is_refused_alike_by_every_implementation(op, impls, call, args, bad):
    for position, arg in enumerate(args):
        tensors = [good()[k] for k in args]
        tensors[position] = BAD[bad](tensors[position])
        name = PARAM_NAMES.get(arg, arg)
        for impl in impls:
            with pytest.raises(TypeError, match=rf"^{op}: {name} must"):
                call(impl, *tensors)


@pytest.mark.parametrize("op, impls, call, args", CASES, ids=[c[0] for c in CASES])
def test_non_finite_scalar_is_refused(op, impls, call, args):
    tensors = [good()[k] for k in args]
    name, kw = ("damping", {}) if op == "precondition" else ("beta", {"beta": math.nan})
    for impl in impls:
        with pytest.raises(ValueError, match=rf"^{op}: {name} must be finite"):
            if op == "precondition":
                impl(*tensors, damping=math.inf, scale=torch.ones(2, 4))
            else:
                call(impl, *tensors, **kw)


@pytest.mark.parametrize("n", [0, 3])
def test_scale_accumulation_over_zero_positions_is_the_decay_alone(n):
    S = torch.rand(2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    QG, QA = torch.eye(2, dtype=torch.float64), torch.eye(4, dtype=torch.float64)
    out = accumulate_scale(S.clone(), torch.zeros(n, 0, 2), torch.zeros(n, 0, 3), QG, QA, bias=True, beta=0.25,
                           alpha=1.0, backend="torch")
    assert torch.equal(out, 0.25 * S)
