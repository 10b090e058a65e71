"""Done-when checks of the transformer issue: GPTs built from torch's own layers and in nanoGPT
style have every parameter preconditioned, train under bf16 autocast with float32 curvature,
and checkpoint round-trips."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kfac_cuda

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from gpt_models import NanoGPT, TorchGPT  # noqa: E402

METHODS = list(kfac_cuda.METHODS)


def preconditioned_parameters(pre):
    return {id(p) for adapter, _ in pre.layers.values() for p in adapter.parameters}


@pytest.mark.parametrize("model_cls", [NanoGPT, TorchGPT])
def test_every_gpt_parameter_is_preconditioned(model_cls):
    model = model_cls(vocab=11, d_model=8, layers=2, heads=2, context=6)
    pre = kfac_cuda.Preconditioner(model)
    assert not pre.unsupported, pre.summary()
    missing = [n for n, p in model.named_parameters() if id(p) not in preconditioned_parameters(pre)]
    assert not missing, pre.summary()


def batch(seed=0, n=3, T=6, vocab=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, T), generator=g), torch.randint(0, vocab, (n, T), generator=g)


@pytest.mark.parametrize("model_cls", [NanoGPT, TorchGPT])
@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_keeps_every_block_float32_and_changes_every_gradient(method, model_cls):
    torch.manual_seed(1)
    model = model_cls(vocab=11, d_model=8, layers=1, heads=2, context=6)
    pre = kfac_cuda.Preconditioner(model, method, factor_update_steps=1, inv_update_steps=2, backend="torch")
    for step in range(3):
        x, y = batch(step)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        F.cross_entropy(logits.float().reshape(-1, 11), y.reshape(-1)).backward()
        raw = {n: p.grad.clone() for n, p in model.named_parameters()}
        assert pre.step()
    for name, (_, curvature) in pre.layers.items():
        for key, t in curvature.buffers.items():
            if t is not None:
                assert t.dtype == torch.float32 and torch.isfinite(t).all(), (name, key)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p.grad, raw[n])]
    assert not unchanged


@pytest.mark.parametrize("method", ["ekfac", "tekfac"])
def test_gpt_checkpoint_resume_is_identical(method):
    def run(steps, state=None):
        torch.manual_seed(2)
        model = TorchGPT(vocab=11, d_model=8, layers=1, heads=2, context=6)
        if state is not None:
            model.load_state_dict(state[0])
        pre = kfac_cuda.Preconditioner(model, method, factor_update_steps=1, inv_update_steps=2, backend="torch")
        assert {"tok", "lm_head", "blocks.0.self_attn.in_proj.q", "blocks.0.norm1"} <= set(pre.layers)
        if state is not None:
            pre.load_state_dict(state[1])
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in steps:
            x, y = batch(step)
            opt.zero_grad()
            F.cross_entropy(model(x).reshape(-1, 11), y.reshape(-1)).backward()
            pre.step()
            opt.step()
        return model, pre

    full, _ = run(range(4))
    half, pre = run(range(2))
    resumed, _ = run(range(2, 4), (half.state_dict(), pre.state_dict()))
    for a, b in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b)


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(3)
    return transformers.GPT2LMHeadModel(config)


def test_every_hf_gpt2_parameter_is_preconditioned():
    """HF GPT-2 from GPT2Config (no download): Conv1D projections, LayerNorms, both embeddings and
    the lm_head tied to wte."""
    model = tiny_gpt2()
    pre = kfac_cuda.Preconditioner(model)
    assert not pre.unsupported, pre.summary()
    missing = [n for n, p in model.named_parameters() if id(p) not in preconditioned_parameters(pre)]
    assert not missing, pre.summary()
    assert "transformer.wte.weight: preconditioned" in pre.summary()


@pytest.mark.parametrize("method", METHODS)
def test_hf_gpt2_trains_under_bf16_autocast_with_float32_curvature(method):
    model = tiny_gpt2()
    pre = kfac_cuda.Preconditioner(model, method, factor_update_steps=1, inv_update_steps=2, backend="torch")
    for step in range(3):
        x, _ = batch(step)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, labels=x).loss
        loss.backward()
        raw = {n: p.grad.clone() for n, p in model.named_parameters()}
        assert pre.step()
    for name, (_, curvature) in pre.layers.items():
        assert all(t.dtype == torch.float32 for t in curvature.buffers.values() if t is not None), name
    assert not [n for n, p in model.named_parameters() if torch.equal(p.grad, raw[n])]


def curvature_copy(pre):
    return {n: {k: None if t is None else t.clone() for k, t in c.buffers.items()} for n, (_, c) in pre.layers.items()}


@pytest.mark.filterwarnings("ignore:kfac_cuda. eigendecomposition:RuntimeWarning")  # of the overflowed factors
def test_overflowing_step_leaves_every_block_untouched():
    """A step whose curvature would overflow float32 is refused and every block (embedding, norm,
    attention, tied head) is restored to its state before the step."""
    torch.manual_seed(4)
    model = TorchGPT(vocab=11, d_model=8, layers=1, heads=2, context=6)
    pre = kfac_cuda.Preconditioner(model, "tekfac", factor_update_steps=1, inv_update_steps=1, backend="torch")
    x, y = batch(0)
    F.cross_entropy(model(x).reshape(-1, 11), y.reshape(-1)).backward()
    assert pre.step()
    before = curvature_copy(pre)
    model.zero_grad()
    (1e30 * F.cross_entropy(model(x).reshape(-1, 11), y.reshape(-1))).backward()  # finite gradients, g^2 overflows
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert not pre.step()
    after = curvature_copy(pre)
    for name, buffers in before.items():
        for key, t in buffers.items():
            assert (t is None and after[name][key] is None) or torch.equal(t, after[name][key]), (name, key)


def test_wide_layer_checkpoint_round_trips():
    torch.manual_seed(5)
    model = NanoGPT(vocab=11, d_model=8, layers=1, heads=2, context=6)
    options = dict(factor_update_steps=1, inv_update_steps=2, max_factor_dim=16, backend="torch")
    pre = kfac_cuda.Preconditioner(model, "ekfac", **options)  # the MLP's 32-wide sides are diagonal
    assert "diagonal" in pre.summary()
    x, y = batch(1)
    F.cross_entropy(model(x).reshape(-1, 11), y.reshape(-1)).backward()
    assert pre.step()
    fresh = kfac_cuda.Preconditioner(NanoGPT(vocab=11, d_model=8, layers=1, heads=2, context=6), "ekfac", **options)
    fresh.load_state_dict(pre.state_dict())
    assert curvature_copy(fresh).keys() == curvature_copy(pre).keys()
    for name, buffers in curvature_copy(pre).items():
        for key, t in buffers.items():
            other = fresh.layers[name][1].buffers[key]
            assert (t is None and other is None) or torch.equal(t, other), (name, key)
