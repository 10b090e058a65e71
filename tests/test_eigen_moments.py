"""Adam's moments in the Kronecker eigenbasis (kfac_cuda/eigen_moments.py), checked against a
dense float64 reference written here (factors from the batch, torch.linalg.eigh, Adam by hand),
against torch.optim.Adam where the basis is the identity, and for checkpoints and refused steps."""
import copy
import io
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_cuda

from fisher_reference import output_grads, with_ones

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from gpt_models import NanoGPT  # noqa: E402

BETAS, EPS, DECAY = (0.8, 0.9), 1e-6, 0.5


def model_and_batches(steps):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    batches = [(torch.randn(9, 3, dtype=torch.float64), torch.randint(0, 3, (9,))) for _ in range(steps)]
    return model, batches


def layer_grad(layer):
    return torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)


def backward(model, batch):
    model.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()


def moments_preconditioner(model, method="kfac", **kw):
    kw = dict(dict(factor_decay=DECAY, factor_update_steps=1, inv_update_steps=2, backend="torch",
                   eigenbasis_moments="adam", moment_betas=BETAS, moment_eps=EPS), **kw)
    return kfac_cuda.Preconditioner(model, method, **kw)


def batch_factors(model, batch, method):
    """(input-side, output-side) factors of the batch, per layer, written out here: K-FAC
    A = E[abar abar^T], G = E[g g^T]; TKFAC P = E[|g|^2 abar abar^T], R = E[|abar|^2 g g^T]
    (g: per-example output gradients of the summed loss, i.e. n x those of the mean loss)."""
    x, y = batch
    inputs = {"0": x, "2": torch.tanh(model[0](x)).detach()}
    out = {}
    for n, layer in (("0", model[0]), ("2", model[2])):
        a = with_ones(inputs[n])
        g = output_grads(layer, model, F.cross_entropy, x, y)
        w_a = (g * g).sum(1, keepdim=True) if method == "tkfac" else torch.ones(len(x), 1, dtype=x.dtype)
        w_g = (a * a).sum(1, keepdim=True) if method == "tkfac" else torch.ones(len(x), 1, dtype=x.dtype)
        out[n] = ((w_a * a).t() @ a / len(x), (w_g * g).t() @ g / len(x))
    return out


@pytest.mark.parametrize("method", ["kfac", "ekfac", "tkfac", "tekfac"])
def test_update_equals_a_dense_adam_in_the_eigenbasis_across_basis_refreshes(method):
    """Five steps, bases refreshed at steps 0, 2 and 4 (first moment carried over, second kept)."""
    model, batches = model_and_batches(5)
    pre = moments_preconditioner(model, method)
    kind = "tkfac" if method in ("tkfac", "tekfac") else "kfac"  # EKFAC/TEKFAC: the same basis, no scales
    b1, b2 = BETAS
    factors, bases, m, v = {}, {}, {}, {}
    for step, batch in enumerate(batches):
        with pre.paused():
            fresh = batch_factors(model, batch, kind)
        for n, (A, G) in fresh.items():
            factors[n] = fresh[n] if n not in factors else tuple(DECAY * o + (1 - DECAY) * f
                                                                for o, f in zip(factors[n], (A, G)))
        backward(model, batch)
        V = {"0": layer_grad(model[0]).clone(), "2": layer_grad(model[2]).clone()}
        assert pre.step()
        for n, layer in (("0", model[0]), ("2", model[2])):
            if step % 2 == 0:  # refresh: eigenvectors of the dense factors
                new = (torch.linalg.eigh(factors[n][1])[1], torch.linalg.eigh(factors[n][0])[1])
                if n in m:  # the first moment, back to the original space and into the new basis
                    QG, QA = bases[n]
                    m[n] = new[0].t() @ (QG @ m[n] @ QA.t()) @ new[1]
                bases[n] = new
            QG, QA = bases[n]
            Gr = QG.t() @ V[n] @ QA
            m[n] = b1 * m.get(n, 0) + (1 - b1) * Gr
            v[n] = b2 * v.get(n, 0) + (1 - b2) * Gr * Gr
            t = step + 1
            U = QG @ ((m[n] / (1 - b1 ** t)) / ((v[n] / (1 - b2 ** t)).sqrt() + EPS)) @ QA.t()
            torch.testing.assert_close(layer_grad(layer), U, rtol=1e-7, atol=1e-10)


def test_identity_basis_gives_torch_adams_trajectory():
    """Both sides wider than max_factor_dim with wide_side="identity" (and a LayerNorm, a diagonal
    block): every basis is the identity, so Preconditioner -> SGD(lr) is torch.optim.Adam(lr)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 2)).double()
    twin = copy.deepcopy(model)
    pre = moments_preconditioner(model, "ekfac", max_factor_dim=1, wide_side="identity", inv_update_steps=3)
    assert pre.layers["0"][1].diagonal == ("input", "output")
    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    adam = torch.optim.Adam(twin.parameters(), lr=0.05, betas=BETAS, eps=EPS)
    for _ in range(6):
        batch = (torch.randn(7, 3, dtype=torch.float64), torch.randint(0, 2, (7,)))
        for net, opt in ((model, sgd), (twin, adam)):
            backward(net, batch)
            if net is model:
                assert pre.step()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_tekfac_optimizer_with_moments_is_tkfac_and_the_preconditioner_then_sgd():
    """Under the option TEKFAC has TKFAC's basis and no scales; with momentum 0 the optimizer's
    step is lr * U, the Preconditioner followed by plain SGD."""
    model, batches = model_and_batches(4)
    twins = [copy.deepcopy(model) for _ in range(2)]
    kw = dict(factor_decay=DECAY, factor_update_steps=1, inv_update_steps=2, backend="torch",
              eigenbasis_moments="adam", kl_clip=None, momentum=0.0)
    opts = [kfac_cuda.TEKFAC(model, lr=0.1, **kw), kfac_cuda.TKFAC(twins[0], lr=0.1, **kw)]
    pre = moments_preconditioner(twins[1], "tekfac", moment_betas=(0.9, 0.95), moment_eps=1e-8)
    sgd = torch.optim.SGD(twins[1].parameters(), lr=0.1)
    for batch in batches:
        for net, opt in zip((model, twins[0]), opts):
            backward(net, batch)
            opt.step()
        backward(twins[1], batch)
        assert pre.step()
        sgd.step()
    assert opts[0].preconditioner.layers["2"][1].buffers["S"] is None  # no scales estimated
    for net in twins:
        for p, q in zip(model.parameters(), net.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_moments_round_trip_and_resume_bit_exactly():
    model, batches = model_and_batches(6)
    twin_model = copy.deepcopy(model)
    pre = moments_preconditioner(model, "tekfac", inv_update_steps=3)
    for b in batches[:2]:
        backward(model, b)
        assert pre.step()
    buffer = io.BytesIO()
    torch.save(pre.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert set(state["eigenbasis_moments"]["moments"]) == {"0", "2"}
    twin = moments_preconditioner(twin_model, "tekfac", inv_update_steps=3)
    twin.load_state_dict(state)
    for b in batches[2:]:  # crosses the refresh at step 3
        for p, net in ((pre, model), (twin, twin_model)):
            backward(net, b)
            assert p.step()
        torch.testing.assert_close(layer_grad(twin_model[2]), layer_grad(model[2]), rtol=0, atol=0)
        torch.testing.assert_close(layer_grad(twin_model[0]), layer_grad(model[0]), rtol=0, atol=0)


def test_bad_moment_checkpoints_are_refused_with_nothing_changed():
    model, batches = model_and_batches(1)
    pre = moments_preconditioner(model)
    backward(model, batches[0])
    assert pre.step()
    good = pre.state_dict()
    with pytest.raises(ValueError, match="has an eigenbasis_moments state"):
        kfac_cuda.Preconditioner(copy.deepcopy(model), backend="torch").load_state_dict(good)
    plain = {k: v for k, v in good.items() if k != "eigenbasis_moments"}
    with pytest.raises(ValueError, match="no eigenbasis_moments state"):
        moments_preconditioner(copy.deepcopy(model)).load_state_dict(plain)
    other = moments_preconditioner(copy.deepcopy(model))
    for corrupt, match in [(lambda s: s["2"].update(v=-s["2"]["v"] - 1), "negative"),
                           (lambda s: s["2"].update(m=torch.full_like(s["2"]["m"], float("nan"))), "'m' is not finite"),
                           (lambda s: s["2"].update(v=torch.ones(2, 5, dtype=torch.float64)), "shape"),
                           (lambda s: s["2"].update(step=0), "positive integer"),
                           (lambda s: s.update(extra=s["2"]), "no such preconditioned layer")]:
        bad = copy.deepcopy(good)
        corrupt(bad["eigenbasis_moments"]["moments"])
        with pytest.raises((ValueError, KeyError), match=match):
            other.load_state_dict(bad)
        assert other.steps == 0 and other.moments.moments == {}


def test_a_refused_step_leaves_the_moments_untouched():
    model, batches = model_and_batches(2)
    pre = moments_preconditioner(model)
    backward(model, batches[0])
    assert pre.step()
    moments = copy.deepcopy(pre.moments.moments)
    backward(model, batches[1])
    model[2].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert not pre.step()
    assert pre.steps == 1
    for n, s in moments.items():
        assert pre.moments.moments[n]["step"] == s["step"]
        for k in ("m", "v"):
            torch.testing.assert_close(pre.moments.moments[n][k], s[k], rtol=0, atol=0)


def test_a_second_moment_that_would_overflow_is_refused():
    """A finite float32 gradient whose square overflows v gives a finite (zero) U: the pending
    moments themselves are checked, and the step is refused with nothing changed."""
    model = nn.Linear(3, 2)
    pre = kfac_cuda.Preconditioner(model, factor_update_steps=5, backend="torch", eigenbasis_moments="adam")
    x = torch.randn(4, 3)
    F.mse_loss(model(x), torch.zeros(4, 2)).backward()
    assert pre.step()
    moments = copy.deepcopy(pre.moments.moments)
    model.zero_grad()
    F.mse_loss(model(x), torch.zeros(4, 2)).backward()  # step 1: no factor update, bases read only
    model.weight.grad.fill_(1e30)
    with pytest.warns(RuntimeWarning, match="would become non-finite"):
        assert not pre.step()
    torch.testing.assert_close(pre.moments.moments[""]["v"], moments[""]["v"], rtol=0, atol=0)
    assert pre.moments.moments[""]["step"] == 1


def test_transformer_blocks_run_their_moments_in_their_bases():
    """A tiny nanoGPT: every block gets moments; a LayerNorm (diagonal block, identity basis) takes
    torch.optim.Adam's step; the two uses of the tied embedding/head give the same update."""
    torch.manual_seed(0)
    model = NanoGPT(11, d_model=8, layers=1, heads=2, context=5).double()
    pre = kfac_cuda.Preconditioner(model, "kfac", factor_update_steps=1, inv_update_steps=2, backend="torch",
                                   eigenbasis_moments="adam", moment_betas=BETAS, moment_eps=EPS,
                                   loss_terms="tokens")
    ln = model.blocks[0].ln1
    shadow = [nn.Parameter(torch.zeros_like(ln.weight)), nn.Parameter(torch.zeros_like(ln.bias))]
    adam = torch.optim.Adam(shadow, lr=1.0, betas=BETAS, eps=EPS)
    for _ in range(3):
        x = torch.randint(0, 11, (3, 5))
        model.zero_grad()
        F.cross_entropy(model(x).reshape(-1, 11), torch.randint(0, 11, (15,))).backward()
        raw = [ln.weight.grad.clone(), ln.bias.grad.clone()]
        assert pre.step()
        before = [s.detach().clone() for s in shadow]
        for s, g in zip(shadow, raw):
            s.grad = g
        adam.step()
        for s, b, p in zip(shadow, before, (ln.weight, ln.bias)):
            torch.testing.assert_close(p.grad, b - s.detach(), rtol=1e-10, atol=1e-12)
    assert set(pre.moments.moments) == set(pre.layers)
    head, emb = pre.moments.moments["lm_head"], pre.moments.moments["tok"]
    torch.testing.assert_close(head["m"], emb["m"].t(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kw, match", [(dict(eigenbasis_moments="adagrad"), "eigenbasis_moments"),
                                       (dict(moment_betas=(0.9,)), "moment_betas"),
                                       (dict(moment_betas=(0.9, 1.0)), r"moment_betas\[1\]"),
                                       (dict(moment_eps=0.0), "moment_eps"),
                                       (dict(exponent=0.5), "exponent"),
                                       (dict(grafting="adam"), "grafting"),
                                       (dict(damping_mode="relative"), "damping_mode"),
                                       (dict(damping_style="factored"), "damping_style"),
                                       (dict(kl_clip=1e-3), "kl_clip")])
def test_meaningless_or_bad_moment_options_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        kfac_cuda.Preconditioner(nn.Linear(2, 2), **dict(dict(eigenbasis_moments="adam"), **kw))


def test_optimizers_refuse_kl_clip_and_the_quadratic_model_with_moments():
    with pytest.raises(ValueError, match="kl_clip=None"):
        kfac_cuda.TEKFAC(nn.Linear(2, 2), lr=0.1, eigenbasis_moments="adam")  # the optimizers' default kl_clip
    with pytest.raises(ValueError, match="eigenbasis_moments=None"):
        kfac_cuda.KFAC(nn.Linear(2, 2), lr=0.1, kl_clip=None, eigenbasis_moments="adam",
                       quadratic_model=kfac_cuda.QuadraticModel(loss="mse"))
