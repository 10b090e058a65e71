"""Correct in the training loops people write: gradient accumulation, forward passes between
steps, a layer called twice with different shapes, hook lifetime, DDP without ``comm=``, partial
param groups, frozen and tied parameters, sequence layouts and per-token losses, transformers'
Conv1D, ``padding='same'`` and torch.compile.

Ground truth comes from outside the code under test: a single run on the concatenated batch,
factors and Fisher blocks computed explicitly (torch.func per-example / per-token gradients),
plain SGD for parameters left to the base optimizer, a single process for a 2-rank gloo run.
"""
from __future__ import annotations

import copy
import gc
import warnings
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, jacrev

import kfac_cuda
from fisher_reference import vec, with_ones

METHODS = ["KFAC", "EKFAC", "TKFAC", "TEKFAC"]
OPTIONS = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, damping=1e-2, factor_update_steps=1, inv_update_steps=2,
               backend="torch")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def data(steps, n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)) for _ in range(steps)]


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# --- gradient accumulation ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sharing", ["expand", "reduce"])
def test_accumulated_micro_batches_equal_the_concatenated_batch(float64_default, method, sharing):
    """k micro-batches, each loss / k, one step (Lightning's accumulate_grad_batches, HF Trainer)."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    accumulated, whole = copy.deepcopy(seq), copy.deepcopy(seq)
    opt_acc = getattr(kfac_cuda, method)(accumulated, weight_sharing=sharing, **OPTIONS)
    opt_whole = getattr(kfac_cuda, method)(whole, weight_sharing=sharing, **OPTIONS)
    g = torch.Generator().manual_seed(2)
    k = 3
    for _ in range(3):
        x, y = torch.randn(12, 5, 4, generator=g), torch.randn(12, 5, 3, generator=g)  # sequences
        opt_whole.zero_grad()
        F.mse_loss(whole(x), y).backward()
        opt_whole.step()
        opt_acc.zero_grad()
        for xs, ys in zip(x.chunk(k), y.chunk(k)):
            (F.mse_loss(accumulated(xs), ys) / k).backward()
        opt_acc.step()
    torch.testing.assert_close(flat(accumulated), flat(whole), rtol=1e-10, atol=1e-12)
    for (_, c_acc), (_, c_whole) in zip(opt_acc.preconditioner.layers.values(),
                                        opt_whole.preconditioner.layers.values()):
        for name in ("A", "G", "S"):
            if c_whole.buffers.get(name) is not None:
                torch.testing.assert_close(c_acc.buffers[name], c_whole.buffers[name], rtol=1e-10, atol=1e-12)


def test_accumulated_factors_equal_explicit_definition(float64_default):
    """A = X^T X / N and G = N^2 * sum of captured g g^T / N over the whole accumulated step."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3))
    pre = kfac_cuda.Preconditioner(model, factor_decay=0.0, factor_update_steps=1, backend="torch")
    x, y = torch.randn(10, 4), torch.randn(10, 3)
    chunks = [(x[:4], y[:4]), (x[4:], y[4:])]
    for xs, ys in chunks:  # mean over the 10 examples, written as a sum of two micro-batch terms
        ((model(xs) - ys).square().sum(1).sum() / 10).backward()
    pre.step()
    with torch.no_grad():
        per_example_g = 2 * (model(x) - y)  # d/ds of (s - y)^2 summed over outputs, before the step's update
    a = with_ones(x)
    torch.testing.assert_close(pre.layers["0"][1].buffers["A"], a.t() @ a / 10)
    # the parameters did not change (the Preconditioner only rewrites .grad)
    torch.testing.assert_close(pre.layers["0"][1].buffers["G"], per_example_g.t() @ per_example_g / 10)


def test_accumulation_with_submodules_called_directly(float64_default):
    """A loop that calls the model's submodules itself (no forward of the model given to the
    optimizer): each layer counts its own calls, and k micro-batches still equal the whole batch."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    parts, whole = copy.deepcopy(seq), copy.deepcopy(seq)
    opt_parts, opt_whole = kfac_cuda.TEKFAC(parts, **OPTIONS), kfac_cuda.TEKFAC(whole, **OPTIONS)
    for x, y in data(3):
        opt_whole.zero_grad()
        F.cross_entropy(whole(x), y).backward()
        opt_whole.step()
        opt_parts.zero_grad()
        for xs, ys in zip(x.chunk(2), y.chunk(2)):
            (F.cross_entropy(parts[2](parts[1](parts[0](xs))), ys) / 2).backward()
        opt_parts.step()
    torch.testing.assert_close(flat(parts), flat(whole), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_changes_nothing(float64_default, reentrant):
    """torch.utils.checkpoint recomputes a block's forward during backward (outside the model's
    forward pass); the step must equal the one without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self, ckpt):
            super().__init__()
            torch.manual_seed(0)
            self.block = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh())
            self.head = nn.Linear(6, 3)
            self.ckpt = ckpt

        def forward(self, x):
            h = checkpoint(self.block, x, use_reentrant=reentrant) if self.ckpt else self.block(x)
            return self.head(h)

    models = [Net(False), Net(True)]
    opts = [kfac_cuda.EKFAC(m, **OPTIONS) for m in models]
    for x, y in data(3):
        x.requires_grad_(reentrant)  # reentrant checkpointing needs an input that requires grad
        for model, opt in zip(models, opts):
            opt.zero_grad()
            for xs, ys in zip(x.chunk(2), y.chunk(2)):
                (F.cross_entropy(model(xs), ys) / 2).backward()
            opt.step()
    torch.testing.assert_close(flat(models[1]), flat(models[0]), rtol=1e-10, atol=1e-12)


def test_layer_called_on_different_numbers_of_examples_is_refused_before_any_change():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(x).sum() + self.lin(x[:2]).sum()

    model = Odd()
    opt = kfac_cuda.KFAC(model, **OPTIONS)
    model(torch.randn(5, 4)).backward()
    weight = model.lin.weight.detach().clone()
    with pytest.raises(ValueError, match="'lin' was called on different numbers of examples"):
        opt.step()
    assert torch.equal(model.lin.weight, weight) and opt.preconditioner.steps == 0
    assert not opt.preconditioner.layers["lin"][1].factors_initialized


# --- forward passes between steps ----------------------------------------------------------------------
def test_eval_forwards_with_grad_do_not_change_the_mc_fisher():
    """Validation/logging forwards with grad enabled, never followed by a backward, count for nothing."""
    runs = []
    for evals in (0, 3):
        model = mlp()
        opt = kfac_cuda.KFAC(model, fisher="mc", **OPTIONS)
        torch.manual_seed(5)
        for x, y in data(3):
            opt.zero_grad()
            out = model(x)
            for xv, _ in data(evals, seed=9):
                model(xv * 3).sum()  # e.g. a validation loss computed with grad enabled
            opt.sample_fisher(out)
            F.cross_entropy(out, y).backward()
            opt.step()
        runs.append((flat(model), opt.preconditioner.layers["0"][1].buffers["A"].clone()))
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=0, atol=0)
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=0, atol=0)


def test_eval_forwards_with_grad_hold_no_memory():
    model = mlp()
    opt = kfac_cuda.KFAC(model, **OPTIONS)
    x = torch.randn(64, 4)
    users = torch._C._storage_Use_Count(x.untyped_storage()._cdata)
    for _ in range(20):
        model(x).sum()  # graph dropped at once
    assert torch._C._storage_Use_Count(x.untyped_storage()._cdata) == users
    opt.zero_grad()
    F.cross_entropy(model(x), torch.zeros(64, dtype=torch.long)).backward()
    assert opt.step() is None and opt.preconditioner.steps == 1


def test_layer_called_twice_with_different_shapes(float64_default):
    """One Linear applied to sequences of two lengths in one forward: its calls' positions are one
    example's positions (K-FAC-expand), and EKFAC's scales are the diagonal of the dense empirical
    Fisher in the Kronecker eigenbasis (exact identity)."""
    torch.manual_seed(6)

    class TwoLengths(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(3, 2)

        def forward(self, x):
            short, long_ = x[:, :2], x[:, 2:]
            return self.shared(short).tanh().sum(1) + self.shared(long_).sum(1)

    model = TwoLengths()
    x, y = torch.randn(7, 5, 3), torch.randn(7, 2)
    pre = kfac_cuda.Preconditioner(model, "ekfac", factor_decay=0.0, factor_update_steps=1, inv_update_steps=1,
                                   backend="torch")

    def loss_fn(out, target):
        return (out - target).square().sum(-1).mean()

    outs = []

    def keep(module, inputs, out):
        out.retain_grad()
        outs.append(out)

    hook = model.shared.register_forward_hook(keep)
    loss_fn(model(x), y).backward()
    hook.remove()
    assert pre.step()
    n = x.shape[0]
    a = with_ones(x).reshape(-1, 4)
    g = torch.cat([o.grad for o in outs], dim=1) * n  # per-example output gradients
    buf = pre.layers["shared"][1].buffers
    torch.testing.assert_close(buf["A"], a.t() @ a / (n * 5))
    torch.testing.assert_close(buf["G"], g.reshape(-1, 2).t() @ g.reshape(-1, 2) / n)
    params = {k: v.detach() for k, v in model.named_parameters()}
    per_example = torch.func.vmap(torch.func.grad(
        lambda p, xi, yi: loss_fn(functional_call(model, p, (xi[None],)), yi[None])), in_dims=(None, 0, 0))(params, x, y)
    V = torch.cat([per_example["shared.weight"], per_example["shared.bias"][..., None]], dim=-1)
    fisher = torch.stack([torch.outer(vec(v), vec(v)) for v in V]).mean(0)
    Q = torch.kron(buf["QA"], buf["QG"])
    torch.testing.assert_close(vec(buf["S"]), torch.diagonal(Q.t() @ fisher @ Q))


# --- hook lifetime ---------------------------------------------------------------------------------------
def test_dropped_optimizer_stops_capturing_and_is_freed():
    model = mlp()
    opt = kfac_cuda.KFAC(model, **OPTIONS)
    alive = weakref.ref(opt.preconditioner)
    del opt
    gc.collect()
    assert alive() is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    for x, y in data(5):
        F.cross_entropy(model(x), y).backward()  # nothing accumulates anywhere


def test_second_preconditioner_on_a_model_warns_and_takes_over():
    model = mlp()
    first = kfac_cuda.KFAC(model, **OPTIONS)
    with pytest.warns(RuntimeWarning, match="takes over"):
        second = kfac_cuda.EKFAC(model, **OPTIONS)
    assert all(len(m._forward_hooks) <= 1 for m in model.modules())  # not doubled
    x, y = data(1)[0]
    F.cross_entropy(model(x), y).backward()
    assert second.step() is None
    with pytest.raises(RuntimeError, match="taken over"):
        first.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        del first, second
        kfac_cuda.KFAC(model, **OPTIONS)  # the old ones are gone: no warning


# --- DDP without comm= -------------------------------------------------------------------------------------
def _ranks_without_comm(rank: int, world: int, out) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import test_distributed as td

    results = {}
    for ddp in (False, True):
        model = td.make_model()
        net = DDP(model) if ddp else model
        opt = kfac_cuda.KFAC(net, **td.OPTIONS)  # no comm=: the default must be the distributed one
        results[ddp] = (type(opt.preconditioner.comm).__name__, td.flat_params(model))
        td.train(net, opt, range(td.STEPS), rank, world)
        results[ddp] = (results[ddp][0], td.flat_params(model))
    dist.barrier()
    torch.save(results, out / f"rank{rank}.pt")


def test_ddp_without_comm_equals_one_process(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    import test_distributed as td

    td.spawn(_ranks_without_comm, 2, tmp_path)
    expected = td.single_process("kfac", tuple(range(td.STEPS)))
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for ddp, (comm, params) in results.items():
            assert comm == "DistributedComm", ddp
            torch.testing.assert_close(params, expected, rtol=1e-9, atol=1e-11)


# --- params= that leave layers out, frozen and tied parameters --------------------------------------------
def test_params_that_leave_layers_out_fine_tune_the_rest():
    """Fine-tuning the last layer: the left-out layer is neither preconditioned nor changed, and the
    last layer steps exactly as when the others are frozen."""
    partial, frozen = mlp(), mlp()
    opt_partial = kfac_cuda.KFAC(partial, params=partial[2].parameters(), **OPTIONS)
    for p in frozen[0].parameters():
        p.requires_grad_(False)
    opt_frozen = kfac_cuda.KFAC(frozen, **OPTIONS)
    before = partial[0].weight.detach().clone()
    for model, opt in ((partial, opt_partial), (frozen, opt_frozen)):
        for x, y in data(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert torch.equal(partial[0].weight, before)
    torch.testing.assert_close(flat(partial), flat(frozen), rtol=0, atol=0)
    assert list(opt_partial.preconditioner.layers) == ["2"]
    summary = opt_partial.summary()
    assert "0.weight: not optimised (in no param group)" in summary
    assert "2.weight: preconditioned" in summary
    assert "0.weight: frozen" in opt_frozen.summary()


def test_parameters_instead_of_the_model_is_a_clear_error():
    model = mlp()
    with pytest.raises(TypeError, match="takes the model"):
        kfac_cuda.TEKFAC(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="must be the model"):
        kfac_cuda.Preconditioner(list(model.parameters()))


def test_frozen_bias_preconditions_the_weight_alone(float64_default):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 3))
    model[0].bias.requires_grad_(False)
    bias = model[0].bias.detach().clone()
    opt = kfac_cuda.KFAC(model, factor_decay=0.0, **OPTIONS)
    x, y = torch.randn(9, 4), torch.randn(9, 3)
    opt.zero_grad()
    out = model(x)
    out.retain_grad()
    (out - y).square().sum(1).mean().backward()
    g = out.grad * 9
    opt.step()
    buf = opt.preconditioner.layers["0"][1].buffers
    torch.testing.assert_close(buf["A"], x.t() @ x / 9)  # no homogeneous column
    torch.testing.assert_close(buf["G"], g.t() @ g / 9)
    assert torch.equal(model[0].bias, bias)
    assert "0.bias: frozen" in opt.summary()


class TiedLM(nn.Module):
    """Token embedding shared with the output head, as in GPT models."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(8)
        self.emb = nn.Embedding(7, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.body(self.emb(ids))))


def test_tied_weight_is_left_to_the_base_optimizer_and_reported():
    """A tie that is not one embedding with one head (here a third use) is left to the base
    optimizer (an embedding tied with one head alone gets one block: test_transformer_blocks.py)."""
    model = TiedLM()
    model.extra = nn.Linear(4, 7, bias=False)
    model.extra.weight = model.emb.weight
    opt = kfac_cuda.KFAC(model, lr=0.1, momentum=0.9, damping=1e-2, factor_update_steps=1, backend="torch")
    ids = torch.randint(0, 7, (5, 6), generator=torch.Generator().manual_seed(9))
    tied, body = model.emb.weight.detach().clone(), model.body.weight.detach().clone()
    F.cross_entropy(model(ids).reshape(-1, 7), ids.reshape(-1)).backward()
    grads = model.emb.weight.grad.clone(), model.body.weight.grad.clone()
    opt.step()
    torch.testing.assert_close(model.emb.weight, tied - 0.1 * grads[0], rtol=0, atol=1e-7)  # plain SGD step
    assert not torch.allclose(model.body.weight, body - 0.1 * grads[1])  # body: preconditioned
    assert list(opt.preconditioner.layers) == ["body"]
    summary = opt.summary()
    assert "emb.weight: tied (emb, head, extra)" in summary and "head: not preconditioned (weight tied with emb" in summary


# --- sequence layouts and per-token losses -------------------------------------------------------------------
@pytest.mark.parametrize("sharing", ["expand", "reduce"])
def test_sequence_first_layout_equals_batch_first(float64_default, sharing):
    batch_first, seq_first = mlp(), mlp()
    opt_b = kfac_cuda.EKFAC(batch_first, weight_sharing=sharing, **OPTIONS)
    opt_s = kfac_cuda.EKFAC(seq_first, weight_sharing=sharing, batch_dim=1, **OPTIONS)
    g = torch.Generator().manual_seed(10)
    for _ in range(3):
        x, y = torch.randn(6, 5, 4, generator=g), torch.randn(6, 5, 3, generator=g)  # (B, T, d)
        opt_b.zero_grad()
        (batch_first(x) - y).square().sum((1, 2)).mean().backward()
        opt_b.step()
        opt_s.zero_grad()
        (seq_first(x.transpose(0, 1)) - y.transpose(0, 1)).square().sum((0, 2)).mean().backward()
        opt_s.step()
    torch.testing.assert_close(flat(seq_first), flat(batch_first), rtol=1e-10, atol=1e-12)


def test_bad_layout_options_raise():
    for bad in (dict(batch_dim=2), dict(batch_dim=True), dict(loss_terms="token")):
        with pytest.raises(ValueError):
            kfac_cuda.Preconditioner(mlp(), **bad)


def test_per_token_terms_leave_conv_layers_out_with_a_reason():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
    pre = kfac_cuda.Preconditioner(model, loss_terms="tokens")
    assert list(pre.layers) == ["2"]
    assert "loss_terms='tokens'" in dict(pre.unsupported)["0"]


@pytest.mark.parametrize("method", ["ekfac", "tkfac"])
def test_per_token_loss_matches_dense_per_token_fisher(float64_default, method):
    """A language-model loss, the mean over all B*T tokens: with loss_terms='tokens' the factors
    are per-token K-FAC, TKFAC's delta is the trace of the dense per-token empirical Fisher and
    EKFAC's scales are its diagonal in the Kronecker eigenbasis (torch.func per-token gradients)."""
    model = mlp()
    B, T = 4, 5
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(B, T, 4, generator=g), torch.randint(0, 3, (B, T), generator=g)
    pre = kfac_cuda.Preconditioner(model, method, loss_terms="tokens", factor_decay=0.0, factor_update_steps=1,
                                   inv_update_steps=1, backend="torch")
    F.cross_entropy(model(x).reshape(-1, 3), y.reshape(-1)).backward()
    assert pre.step()

    params = {k: v.detach() for k, v in model.named_parameters()}

    def token_losses(p):
        return F.cross_entropy(functional_call(model, p, (x,)).reshape(-1, 3), y.reshape(-1), reduction="none")

    jac = jacrev(token_losses)(params)
    V = torch.cat([jac["2.weight"], jac["2.bias"][..., None]], dim=-1)  # (B*T, 3, 7) per-token gradients
    vs = torch.stack([vec(v) for v in V])
    fisher = vs.t() @ vs / (B * T)
    with torch.no_grad():
        a = with_ones(torch.tanh(model[0](x))).reshape(-1, 7)
        g_tok = F.softmax(model(x), -1).reshape(-1, 3) - F.one_hot(y.reshape(-1), 3)
    buf = pre.layers["2"][1].buffers
    if method == "ekfac":
        torch.testing.assert_close(buf["A"], a.t() @ a / (B * T))
        torch.testing.assert_close(buf["G"], g_tok.t() @ g_tok / (B * T))
        Q = torch.kron(buf["QA"], buf["QG"])
        torch.testing.assert_close(vec(buf["S"]), torch.diagonal(Q.t() @ fisher @ Q))
    else:
        torch.testing.assert_close(buf["delta"], torch.trace(fisher))


# --- layers that HF models use ---------------------------------------------------------------------------------
class Conv1D(nn.Module):
    """The weight layout of transformers.pytorch_utils.Conv1D (GPT-2): y = x @ W + b, W (d_in, d_out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


@pytest.mark.parametrize("method", METHODS)
def test_transposed_conv1d_equals_linear(float64_default, method):
    torch.manual_seed(12)
    conv1d = nn.Sequential(Conv1D(6, 4), nn.Tanh(), Conv1D(3, 6))
    linear = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        for c, lin in ((conv1d[0], linear[0]), (conv1d[2], linear[2])):
            lin.weight.copy_(c.weight.t())
            lin.bias.copy_(c.bias)
    opts = [getattr(kfac_cuda, method)(m, **OPTIONS) for m in (conv1d, linear)]
    g = torch.Generator().manual_seed(13)
    for _ in range(3):
        x, y = torch.randn(5, 3, 4, generator=g), torch.randn(5, 3, 3, generator=g)
        for model, opt in zip((conv1d, linear), opts):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
    assert list(opts[0].preconditioner.layers) == ["0", "2"]
    for c, lin in ((conv1d[0], linear[0]), (conv1d[2], linear[2])):
        torch.testing.assert_close(c.weight.t(), lin.weight, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(c.bias, lin.bias, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["KFAC", "TEKFAC"])
@pytest.mark.parametrize("padding", [("same", 2), ("valid", 0)])
def test_conv2d_string_padding_equals_explicit_padding(method, padding):
    models = []
    features = 3 * (36 if padding[1] else 4)  # 6x6 inputs, 3x3 kernel with dilation 2
    for padding in padding:
        torch.manual_seed(14)
        models.append(nn.Sequential(nn.Conv2d(2, 3, 3, padding=padding, dilation=2), nn.Tanh(), nn.Flatten(),
                                    nn.Linear(features, 4)))
    opts = [getattr(kfac_cuda, method)(m, **OPTIONS) for m in models]
    g = torch.Generator().manual_seed(15)
    for _ in range(3):
        x, y = torch.randn(6, 2, 6, 6, generator=g), torch.randint(0, 4, (6,), generator=g)
        for model, opt in zip(models, opts):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert list(opts[0].preconditioner.layers) == ["0", "3"]
    torch.testing.assert_close(flat(models[0]), flat(models[1]), rtol=0, atol=0)


def test_conv2d_padding_same_with_even_kernel_is_refused_clearly():
    model = nn.Sequential(nn.Conv2d(2, 3, 2, padding="same"), nn.Flatten(), nn.Linear(3 * 16, 2))
    pre = kfac_cuda.Preconditioner(model)
    assert list(pre.layers) == ["2"]
    assert "asymmetrically" in dict(pre.unsupported)["0"]


# --- torch.compile ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_model_names_checkpoints_no_graph_breaks_no_recompiles(backend):
    """Layer names as in the eager model, checkpoints interchangeable, the same steps, one graph
    without breaks, and no recompilation while capture switches on and off with the schedule."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, compiled_inner = mlp(), mlp()
    compiled = torch.compile(compiled_inner, backend=backend)
    options = dict(OPTIONS, factor_update_steps=2, inv_update_steps=4)
    opt_eager, opt_compiled = kfac_cuda.EKFAC(eager, **options), kfac_cuda.EKFAC(compiled, **options)
    assert list(opt_compiled.preconditioner.layers) == list(opt_eager.preconditioner.layers) == ["0", "2"]
    batches = data(8)

    def run(model, opt, steps):
        for x, y in steps:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    run(eager, opt_eager, batches[:4])
    run(compiled, opt_compiled, batches[:1])  # the first call compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        run(compiled, opt_compiled, batches[1:4])
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1, dict(counters)
    torch.testing.assert_close(flat(compiled_inner), flat(eager), rtol=1e-6, atol=1e-7)
    # an eager checkpoint resumes in the compiled model and vice versa
    resumed_compiled, resumed_eager = mlp(), mlp()
    compiled_again = torch.compile(resumed_compiled, backend=backend)
    opt_rc, opt_re = kfac_cuda.EKFAC(compiled_again, **options), kfac_cuda.EKFAC(resumed_eager, **options)
    resumed_compiled.load_state_dict(eager.state_dict())
    opt_rc.load_state_dict(copy.deepcopy(opt_eager.state_dict()))
    resumed_eager.load_state_dict(compiled_inner.state_dict())
    opt_re.load_state_dict(copy.deepcopy(opt_compiled.state_dict()))
    for model, opt in ((eager, opt_eager), (resumed_eager, opt_re), (compiled_again, opt_rc)):
        run(model, opt, batches[4:])
    torch.testing.assert_close(flat(resumed_compiled), flat(eager), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(flat(resumed_eager), flat(eager), rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()


def test_compiled_layer_called_twice_warns():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    torch._dynamo.reset()
    compiled = torch.compile(Twice(), backend="eager")
    opt = kfac_cuda.KFAC(compiled, **OPTIONS)
    with pytest.warns(RuntimeWarning, match="'lin' of a compiled model received several output gradients"):
        compiled(torch.randn(3, 4)).sum().backward()
    opt.step()
    torch._dynamo.reset()


def test_compiled_model_mc_fisher_and_accumulation_equal_eager():
    torch._dynamo.reset()
    eager, compiled_inner = mlp(), mlp()
    compiled = torch.compile(compiled_inner, backend="aot_eager")
    opts = [kfac_cuda.KFAC(m, fisher="mc", **OPTIONS) for m in (eager, compiled)]
    for model, opt in zip((eager, compiled), opts):
        torch.manual_seed(18)
        for x, y in data(3):
            opt.zero_grad()
            for xs, ys in zip(x.chunk(2), y.chunk(2)):
                out = model(xs)
                model(xs * 2).sum()  # an evaluation forward with grad enabled: no backward
                opt.sample_fisher(out)
                (F.cross_entropy(out, ys) / 2).backward()
            opt.step()
    torch.testing.assert_close(flat(compiled_inner), flat(eager), rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()


def test_hf_gpt2_conv1d_layers_preconditioned_with_the_tied_head(float64_default):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(16)
    model = transformers.GPT2LMHeadModel(config).double()
    opt = kfac_cuda.KFAC(model, lr=0.1, momentum=0.9, factor_decay=0.0, factor_update_steps=1, backend="torch")
    assert {f"transformer.h.0.{m}" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")} <= \
        set(opt.preconditioner.layers)
    assert {"transformer.wte", "lm_head"} <= set(opt.preconditioner.layers)  # one tied block (blocks/tied.py)
    ids = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(17))
    seen = {}

    def keep(module, inputs, out):
        out.retain_grad()
        seen["x"], seen["out"] = inputs[0].detach(), out

    hook = model.transformer.h[0].mlp.c_fc.register_forward_hook(keep)
    model(ids, labels=ids).loss.backward()
    hook.remove()
    wte, wte_grad = model.transformer.wte.weight.detach().clone(), model.transformer.wte.weight.grad.clone()
    opt.step()
    a = with_ones(seen["x"]).reshape(-1, 9)
    g = seen["out"].grad.reshape(-1, 32) * 3  # per-example (the loss is a mean over the 3 sequences' tokens)
    buf = opt.preconditioner.layers["transformer.h.0.mlp.c_fc"][1].buffers
    torch.testing.assert_close(buf["A"], a.t() @ a / 18)
    torch.testing.assert_close(buf["G"], g.t() @ g / 3)
    assert not torch.allclose(model.transformer.wte.weight, wte - 0.1 * wte_grad)  # preconditioned, not plain SGD


def test_summary_tells_what_happens_to_every_parameter():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.frozen = nn.Linear(8, 8)
            self.ff = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)
            self.head = nn.Linear(8, 5, bias=False)
            self.head.weight = self.emb.weight
            self.frozen.requires_grad_(False)

    model = Model()
    opt = kfac_cuda.KFAC(model, lr=0.1, params=[p for n, p in model.named_parameters() if not n.startswith("norm")])
    lines = dict(line.strip().split(": ", 1) for line in opt.summary().split("parameters:\n")[1].splitlines())
    assert set(lines) == {n for n, _ in model.named_parameters()}
    assert lines["emb.weight"].startswith("preconditioned")  # the tied emb/head block (blocks/tied.py)
    assert lines["attn.out_proj.weight"] == "preconditioned (layer attn.out_proj)"
    assert lines["attn.in_proj_weight"].startswith("preconditioned (layer attn.in_proj.")
    assert lines["frozen.weight"] == lines["frozen.bias"] == "frozen"
    assert lines["ff.weight"] == lines["ff.bias"] == "preconditioned (layer ff)"
    assert lines["norm.weight"] == "not optimised (in no param group)"
