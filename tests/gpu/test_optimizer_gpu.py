"""GPU: whole optimizers on the kernels. Each method trained with backend="cuda" tracks the
same run with backend="torch" over 50 steps; a step can be captured in a CUDA graph and
replayed. Skipped without a GPU and the compiled extension (tests/conftest.py)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_cuda

METHODS = ["KFAC", "EKFAC", "TKFAC", "TEKFAC"]


def model_and_data(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 13, 3, padding=1), nn.ReLU(), nn.Conv2d(13, 7, 3, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(7 * 7 * 7, 33), nn.Tanh(), nn.Linear(33, 10)).cuda()
    x = torch.randn(50, 3, 16, 16, device="cuda")
    y = torch.randint(0, 10, (50,), device="cuda")
    return model, x, y


def train(method, backend, steps=50):
    model, x, y = model_and_data()
    opt = getattr(kfac_cuda, method)(model, lr=0.02, momentum=0.9, damping=1e-2, factor_update_steps=2,
                                      inv_update_steps=10, backend=backend)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


@pytest.mark.parametrize("method", METHODS)
def test_cuda_backend_tracks_torch_backend(method):
    ref_model, ref_losses = train(method, "torch")
    model, losses = train(method, "cuda")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=2e-3, atol=1e-4)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert ((p - q).norm() / q.norm()).item() < 5e-3


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_step_captured_in_cuda_graph_replays_the_eager_step(backend):
    """A step that updates no curvature (bases fixed) is captured and replayed; it equals the
    same step taken eagerly from the same state."""
    model, x, y = model_and_data(1)
    opt = kfac_cuda.KFAC(model, lr=0.02, factor_update_steps=1000, inv_update_steps=1000, backend=backend,
                         check_finite=False)
    for _ in range(3):  # step 0 builds the curvature; later steps only precondition
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    twin, twin_opt = copy.deepcopy(model), None
    twin_opt = kfac_cuda.KFAC(twin, lr=0.02, factor_update_steps=1000, inv_update_steps=1000, backend=backend,
                              check_finite=False)
    twin_opt.load_state_dict(opt.state_dict())

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs asks
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    twin_opt.zero_grad(set_to_none=False)
    F.cross_entropy(twin(x), y).backward()
    twin_opt.step()

    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        F.cross_entropy(model(x), y).backward()
        opt.step()
    # capture does not run the work: the twin takes the captured step eagerly, the graph replays it
    twin_opt.zero_grad(set_to_none=False)
    F.cross_entropy(twin(x), y).backward()
    twin_opt.step()
    opt.zero_grad(set_to_none=False)
    graph.replay()
    torch.cuda.synchronize()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
