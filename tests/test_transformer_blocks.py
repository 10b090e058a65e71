"""Transformer curvature blocks (kfac_cuda/blocks) against dense float64 Fisher blocks built
from per-example gradients (autograd per example, no package code): nn.Embedding (K-FAC with
a diagonal input factor), LayerNorm / RMSNorm (exact Fisher diagonal) and
nn.MultiheadAttention (q, k, v and out_proj as K-FAC blocks)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_cuda

from fisher_reference import vec

METHODS = list(kfac_cuda.METHODS)


def per_example_grads(model, tensors, x, y):
    """(n, ...) gradients of each example's loss (its mean token cross-entropy) w.r.t. ``tensors``."""
    out = []
    for i in range(x.shape[0]):
        logits = model(x[i:i + 1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[i:i + 1].reshape(-1))
        out.append(torch.autograd.grad(loss, tensors))
    return [torch.stack(g) for g in zip(*out)]


def dense_fisher(vs):
    """1/n sum_i v_i v_i^T of (n, D) rows."""
    return vs.t() @ vs / vs.shape[0]


def train_step(model, pre, x, y):
    model.zero_grad()
    logits = model(x)
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
    assert pre.step()


def curvature(pre, name):
    return pre.layers[name][1].buffers


# --- LayerNorm / RMSNorm: exact diagonal --------------------------------------------------------
class NormNet(nn.Module):
    def __init__(self, norm, d=5, classes=4):
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(3, d), norm, nn.Linear(d, classes)

    def forward(self, x):
        return self.out(self.norm(self.inp(x)))


@pytest.mark.parametrize("norm", [lambda: nn.LayerNorm(5), lambda: nn.RMSNorm(5, eps=1e-6), lambda: nn.RMSNorm(5)])
@pytest.mark.parametrize("method", METHODS)
def test_norm_block_is_the_exact_fisher_diagonal(norm, method):
    torch.manual_seed(0)
    model = NormNet(norm()).double()
    with torch.no_grad():  # a scale away from 1 and a shift away from 0
        model.norm.weight.uniform_(0.5, 1.5)
        if getattr(model.norm, "bias", None) is not None:
            model.norm.bias.uniform_(-0.5, 0.5)
    x, y = torch.randn(6, 4, 3, dtype=torch.float64), torch.randint(0, 4, (6, 4))
    params = [model.norm.weight] + ([model.norm.bias] if getattr(model.norm, "bias", None) is not None else [])
    per_ex = per_example_grads(model, params, x, y)
    V_i = torch.stack(per_ex, dim=-1)  # (n, d, 1 + bias)
    diag = V_i.square().mean(0)
    pre = kfac_cuda.Preconditioner(model, method, factor_decay=0.0, factor_update_steps=1, damping=1e-3,
                                   backend="torch")
    train_step(model, pre, x, y)
    torch.testing.assert_close(curvature(pre, "norm")["D"], diag, rtol=1e-10, atol=1e-14)
    V = V_i.mean(0)  # the batch gradient
    U = torch.stack([p.grad for p in params], dim=-1)
    torch.testing.assert_close(U, V / (diag + 1e-3), rtol=1e-10, atol=1e-14)


# --- nn.Embedding: K-FAC with a diagonal input factor --------------------------------------
class TokenNet(nn.Module):
    def __init__(self, vocab=7, d=4, classes=3):
        super().__init__()
        self.emb, self.out = nn.Embedding(vocab, d), nn.Linear(d, classes)

    def forward(self, x):
        return self.out(torch.tanh(self.emb(x)))


def embedding_fisher(model, x, y):
    """Dense Fisher of vec(V), V = dE^T (d, vocab), and the batch gradient V."""
    (g,) = per_example_grads(model, [model.emb.weight], x, y)  # (n, vocab, d)
    vs = torch.stack([vec(gi.t()) for gi in g])
    return dense_fisher(vs), g.mean(0).t()


@pytest.mark.parametrize("sharing", ["expand", "reduce"])
def test_embedding_input_factor_is_the_diagonal_of_the_one_hot_factor(sharing):
    torch.manual_seed(1)
    model = TokenNet().double()
    x, y = torch.randint(0, 7, (5, 3)), torch.randint(0, 3, (5, 3))
    pre = kfac_cuda.Preconditioner(model, "kfac", factor_decay=0.0, factor_update_steps=1, weight_sharing=sharing,
                                   backend="torch")
    train_step(model, pre, x, y)
    one_hot = F.one_hot(x, 7).double()  # (n, T, vocab)
    rows = one_hot.reshape(-1, 7) if sharing == "expand" else one_hot.mean(1)
    A = rows.t() @ rows / rows.shape[0]
    torch.testing.assert_close(curvature(pre, "emb")["A"], torch.diagonal(A), rtol=1e-12, atol=0)
    assert curvature(pre, "emb")["A"].dim() == 1  # never a vocab x vocab matrix


@pytest.mark.parametrize("method", ["kfac", "tkfac"])
def test_embedding_one_token_one_example_is_the_dense_fisher(method):
    """n = 1, T = 1: A (x) G is the Fisher block itself, so the step is (F + lambda I)^-1 v."""
    torch.manual_seed(2)
    model = TokenNet().double()
    x, y = torch.tensor([[4]]), torch.tensor([[1]])
    fisher, V = embedding_fisher(model, x, y)
    damping = 1e-2
    pre = kfac_cuda.Preconditioner(model, method, factor_decay=0.0, factor_update_steps=1, damping=damping,
                                   backend="torch")
    train_step(model, pre, x, y)
    expected = torch.linalg.solve(fisher + damping * torch.eye(fisher.shape[0], dtype=fisher.dtype), vec(V))
    if method == "tkfac":  # TKFAC damps each factor by sqrt(lambda): (F + sqrt(lam)(tr.. ) + lam) -- compare blocks
        blk = pre.layers["emb"][1]
        b = blk.buffers
        phi = torch.diag(b["eA"])
        psi = b["QG"] @ torch.diag(b["eG"]) @ b["QG"].t()
        torch.testing.assert_close(b["delta_ref"] * torch.kron(phi, psi), fisher, rtol=1e-9, atol=1e-12)
        return
    torch.testing.assert_close(vec(model.emb.weight.grad.t()), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["ekfac", "tekfac"])
def test_embedding_scales_are_the_dense_fisher_diagonal_in_the_basis(method):
    """S = diag((I (x) Q_G)^T F (I (x) Q_G)) exactly, per-example gradients summed over positions."""
    torch.manual_seed(3)
    model = TokenNet().double()
    x, y = torch.randint(0, 7, (6, 4)), torch.randint(0, 3, (6, 4))
    fisher, V = embedding_fisher(model, x, y)
    pre = kfac_cuda.Preconditioner(model, method, factor_decay=0.0, factor_update_steps=1, damping=1e-3,
                                   scale_restart="batch", backend="torch")
    train_step(model, pre, x, y)
    b = curvature(pre, "emb")
    basis = torch.kron(torch.eye(7, dtype=torch.float64), b["QG"])
    expected = torch.diagonal(basis.t() @ fisher @ basis)
    torch.testing.assert_close(vec(b["S"]), expected, rtol=1e-9, atol=1e-13)
    U = b["QG"] @ ((b["QG"].t() @ V) / (b["S"] + 1e-3))
    torch.testing.assert_close(model.emb.weight.grad.t(), U, rtol=1e-9, atol=1e-13)


def test_sparse_embedding_is_reported():
    model = nn.Sequential(nn.Embedding(5, 3, sparse=True), nn.Linear(3, 2))
    pre = kfac_cuda.Preconditioner(model)
    assert "sparse" in dict(pre.unsupported)["0"] and "0" not in pre.layers


# --- nn.MultiheadAttention ----------------------------------------------------------------------
class AttentionNet(nn.Module):
    """Embedding -> MultiheadAttention (causal) -> head, or the same with explicit nn.Linear
    projections (``linear=True``) and F.scaled_dot_product_attention."""

    def __init__(self, vocab=6, d=4, heads=2, linear=False, batch_first=True):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=batch_first)
        self.heads, self.linear, self.batch_first = heads, linear, batch_first
        if linear:
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(d, vocab)

    def copy_to_linear(self):
        w, b = self.attn.in_proj_weight, self.attn.in_proj_bias
        with torch.no_grad():
            for i, lin in enumerate((self.q, self.k, self.v)):
                lin.weight.copy_(w[i * 4:(i + 1) * 4])
                lin.bias.copy_(b[i * 4:(i + 1) * 4])
            self.o.weight.copy_(self.attn.out_proj.weight)
            self.o.bias.copy_(self.attn.out_proj.bias)

    def forward(self, x):
        h = self.emb(x)
        T = x.shape[1]
        if self.linear:
            n, d = h.shape[0], h.shape[-1]
            q, k, v = (lin(h).reshape(n, T, self.heads, d // self.heads).transpose(1, 2)
                       for lin in (self.q, self.k, self.v))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, T, d)
            return self.head(self.o(a))
        mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=h.dtype)
        if self.batch_first:
            a = self.attn(h, h, h, attn_mask=mask, is_causal=True, need_weights=False)[0]
        else:
            a = self.attn(h.transpose(0, 1), h.transpose(0, 1), h.transpose(0, 1), attn_mask=mask)[0].transpose(0, 1)
        return self.head(a)


def attention_pair(seed=4, batch_first=True):
    torch.manual_seed(seed)
    model = AttentionNet(batch_first=batch_first).double()
    twin = AttentionNet(linear=True).double()
    twin.load_state_dict(model.state_dict(), strict=False)
    twin.copy_to_linear()
    return model, twin


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_attention_blocks_equal_the_same_attention_written_with_linear_layers(method, batch_first):
    model, twin = attention_pair(batch_first=batch_first)
    options = dict(factor_decay=0.5, factor_update_steps=1, inv_update_steps=2, damping=1e-2, backend="torch")
    pre, pre_twin = (kfac_cuda.Preconditioner(m, method, **options) for m in (model, twin))
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        x, y = torch.randint(0, 6, (4, 5), generator=g), torch.randint(0, 6, (4, 5), generator=g)
        train_step(model, pre, x, y)
        train_step(twin, pre_twin, x, y)
        for i, lin in enumerate((twin.q, twin.k, twin.v)):
            torch.testing.assert_close(model.attn.in_proj_weight.grad[i * 4:(i + 1) * 4], lin.weight.grad)
            torch.testing.assert_close(model.attn.in_proj_bias.grad[i * 4:(i + 1) * 4], lin.bias.grad)
        torch.testing.assert_close(model.attn.out_proj.weight.grad, twin.o.weight.grad)
        torch.testing.assert_close(model.emb.weight.grad, twin.emb.weight.grad)


def test_attention_q_block_scales_are_the_dense_fisher_diagonal_in_the_basis():
    model, _ = attention_pair(seed=6)
    x, y = torch.randint(0, 6, (5, 4)), torch.randint(0, 6, (5, 4))
    w, b = model.attn.in_proj_weight, model.attn.in_proj_bias
    gw, gb = per_example_grads(model, [w, b], x, y)
    V_i = torch.cat([gw[:, 0:4], gb[:, 0:4, None]], dim=-1)  # the q rows, (n, 4, 5)
    fisher = dense_fisher(torch.stack([vec(v) for v in V_i]))
    pre = kfac_cuda.Preconditioner(model, "ekfac", factor_decay=0.0, factor_update_steps=1, scale_restart="batch",
                                   backend="torch")
    train_step(model, pre, x, y)
    blk = curvature(pre, "attn.in_proj.q")
    basis = torch.kron(blk["QA"], blk["QG"])
    torch.testing.assert_close(vec(blk["S"]), torch.diagonal(basis.t() @ fisher @ basis), rtol=1e-9, atol=1e-13)


def test_attention_output_and_gradients_unchanged_by_the_capture():
    model, _ = attention_pair(seed=7)
    x, y = torch.randint(0, 6, (3, 5)), torch.randint(0, 6, (3, 5))
    logits = model(x)
    F.cross_entropy(logits.reshape(-1, 6), y.reshape(-1)).backward()
    plain = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    pre = kfac_cuda.Preconditioner(model, factor_update_steps=1)
    assert {"attn.in_proj.q", "attn.in_proj.k", "attn.in_proj.v", "attn.out_proj"} <= set(pre.layers)
    captured = model(x)
    torch.testing.assert_close(captured, logits)
    F.cross_entropy(captured.reshape(-1, 6), y.reshape(-1)).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[k])
    pre.remove()
    assert not hasattr(model.attn, "_kfac_reroute")


def test_attention_with_kdim_vdim_has_three_separate_blocks():
    torch.manual_seed(8)
    attn = nn.MultiheadAttention(4, 2, kdim=3, vdim=5, batch_first=True)
    pre = kfac_cuda.Preconditioner(attn, "kfac", factor_update_steps=1, backend="torch")
    q, k, v = torch.randn(2, 3, 4), torch.randn(2, 6, 3), torch.randn(2, 6, 5)
    attn(q, k, v)[0].square().sum().backward()
    grads = {n: p.grad.clone() for n, p in attn.named_parameters()}
    assert pre.step()
    assert {n: pre.layers[n][0].d_in for n in ("in_proj.q", "in_proj.k", "in_proj.v")} == \
        {"in_proj.q": 4, "in_proj.k": 3, "in_proj.v": 5}
    A_k = curvature(pre, "in_proj.k")["A"]
    rows = torch.cat([k.reshape(-1, 3), torch.ones(12, 1)], dim=1)
    torch.testing.assert_close(A_k, rows.t() @ rows / 12)
    for n in ("q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"):
        assert not torch.equal(dict(attn.named_parameters())[n].grad, grads[n])


# --- tied weights ----------------------------------------------------------------------------
class Tied(nn.Module):
    def __init__(self, vocab=6, d=4):
        super().__init__()
        self.emb, self.mid, self.head = nn.Embedding(vocab, d), nn.Linear(d, d), nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb(x))))


@pytest.mark.parametrize("max_factor_dim", [8192, 5])  # 5: the vocabulary side (6) is kept diagonal
def test_tied_embedding_and_head_form_one_block_with_both_uses_statistics(max_factor_dim):
    torch.manual_seed(9)
    model = Tied().double()
    n, T, damping = 5, 3, 1e-2
    x, y = torch.randint(0, 6, (n, T)), torch.randint(0, 6, (n, T))
    # ground truth from the definitions: each use's rows, per-example output gradients
    store = {}
    def keep(key):
        def hook(module, inputs, out):
            out.retain_grad()
            store[key], store[key + "_in"] = out, inputs[0]
        return hook

    hooks = [model.emb.register_forward_hook(keep("e")), model.head.register_forward_hook(keep("logits"))]
    logits = model(x)
    sum(F.cross_entropy(logits[i], y[i]) for i in range(n)).backward()  # per-example losses summed
    for h in hooks:
        h.remove()
    h_rows, g_h = store["logits_in"].detach().reshape(-1, 4), store["logits"].grad.reshape(-1, 6)
    g_e, tokens = store["e"].grad.reshape(-1, 4), x.reshape(-1)
    tied_grad = (g_h.t() @ h_rows + F.one_hot(tokens, 6).double().t() @ g_e) / n  # both uses, vocab x d
    A_h, G_h = h_rows.t() @ h_rows / (n * T), g_h.t() @ g_h / n
    G_e, D_e = g_e.t() @ g_e / n, torch.bincount(tokens, minlength=6).double() / (n * T)
    X = A_h * G_h.trace() + G_e * D_e.sum()
    Y = G_h * A_h.trace() + torch.diag(D_e) * G_e.trace()
    if max_factor_dim < 6:
        G_h = torch.diag(torch.diagonal(G_h))
        Y = torch.diag(torch.diagonal(Y))  # the vocabulary basis is the identity
    QX = torch.linalg.eigh(X)[1]
    QY = torch.linalg.eigh(Y)[1] if max_factor_dim >= 6 else torch.eye(6, dtype=torch.float64)
    S = (torch.outer(torch.diagonal(QY.t() @ G_h @ QY), torch.diagonal(QX.t() @ A_h @ QX))
         + torch.outer(torch.diagonal(QY.t() @ torch.diag(D_e) @ QY), torch.diagonal(QX.t() @ G_e @ QX)))
    expected = QY @ ((QY.t() @ tied_grad @ QX) / (S + damping)) @ QX.t()

    model.zero_grad()
    pre = kfac_cuda.Preconditioner(model, "kfac", factor_decay=0.0, factor_update_steps=1, damping=damping,
                                   max_factor_dim=max_factor_dim, backend="torch")
    assert {"emb", "head"} <= set(pre.layers) and not pre.unsupported
    model.zero_grad()
    logits = model(x)
    F.cross_entropy(logits.reshape(-1, 6), y.reshape(-1)).backward()
    torch.testing.assert_close(model.emb.weight.grad, tied_grad)  # autograd sums both uses
    assert pre.step()
    torch.testing.assert_close(model.emb.weight.grad, expected, rtol=1e-8, atol=1e-12)


def test_tied_weight_of_another_kind_is_left_to_the_base_optimizer_and_reported():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    with pytest.warns(RuntimeWarning, match="no supported layer"):
        pre = kfac_cuda.Preconditioner(model)
    reasons = dict(pre.unsupported)
    assert not pre.layers and "tied" in reasons["0"] and "tied" in reasons["2"]


# --- sequence layouts and per-token losses ---------------------------------------------------------
class SeqNet(nn.Module):
    """Embedding -> LayerNorm -> MultiheadAttention -> head, batch-first or sequence-first."""

    def __init__(self, batch_first):
        super().__init__()
        torch.manual_seed(10)
        self.emb, self.norm = nn.Embedding(6, 4), nn.LayerNorm(4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=batch_first)
        self.head = nn.Linear(4, 6)

    def forward(self, x):
        h = self.norm(self.emb(x))
        return self.head(h + self.attn(h, h, h, need_weights=False)[0])


@pytest.mark.parametrize("method", ["kfac", "tekfac"])
def test_sequence_first_layout_equals_batch_first(method):
    first, second = SeqNet(True).double(), SeqNet(False).double()
    options = dict(factor_update_steps=1, inv_update_steps=2, damping=1e-2, backend="torch")
    pre_b = kfac_cuda.Preconditioner(first, method, **options)
    pre_s = kfac_cuda.Preconditioner(second, method, batch_dim=1, **options)
    g = torch.Generator().manual_seed(11)
    for _ in range(3):
        x, y = torch.randint(0, 6, (4, 5), generator=g), torch.randint(0, 6, (4, 5), generator=g)
        train_step(first, pre_b, x, y)
        second.zero_grad()
        logits = second(x.t())  # (T, n)
        F.cross_entropy(logits.reshape(-1, 6), y.t().reshape(-1)).backward()
        assert pre_s.step()
        for (name, p), q in zip(first.named_parameters(), second.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_per_token_loss_counts_tokens_when_the_first_layer_is_an_embedding():
    torch.manual_seed(12)
    model = TokenNet().double()
    x, y = torch.randint(0, 7, (3, 5)), torch.randint(0, 3, (3, 5))
    store = {}
    hook = model.out.register_forward_hook(lambda m, i, o: (o.retain_grad(), store.__setitem__("o", o))[-1])
    logits = model(x)
    F.cross_entropy(logits.reshape(-1, 3), y.reshape(-1), reduction="sum").backward()
    hook.remove()
    g = store["o"].grad.reshape(-1, 3)  # per-token output gradients
    model.zero_grad()
    pre = kfac_cuda.Preconditioner(model, "kfac", factor_decay=0.0, factor_update_steps=1, loss_terms="tokens",
                                   backend="torch")
    train_step(model, pre, x, y)  # mean over the 15 tokens
    torch.testing.assert_close(curvature(pre, "out")["G"], g.t() @ g / 15)
