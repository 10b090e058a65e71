"""Every kernel once per dtype on small odd shapes, through the public ops with
backend="cuda": the workload bench/gpu_check.sh runs under compute-sanitizer (memcheck,
racecheck, synccheck, initcheck), where the full GPU test suite would take too long. The
shapes include ones where the ops cut the reduction into splits (few tiles, many rows), so
the workspace partials and reduce_splits_kernel run under the sanitizers too. Exits
non-zero if a kernel disagrees with its reference."""
import sys

import torch

from kfac_cuda.ops import accumulate_conv_factor, accumulate_factor, accumulate_scale, precondition

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rel(x, ref):
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def orthogonal(d):
    return torch.linalg.qr(torch.randn(d, d, device="cuda", dtype=torch.float64))[0].float().contiguous()


def run() -> float:
    worst = 0.0
    for dtype in DTYPES:
        for n, d in ((7, 33), (255, 7), (33, 70), (1500, 33)):  # (1500, 33): one tile, 5 splits
            a = torch.randn(n, d, device="cuda").to(dtype)
            w = torch.rand(n, device="cuda")
            for weights in (None, w):
                out = torch.full((d + 1, d + 1), float("nan"), device="cuda")
                accumulate_factor(out, a, bias=True, weights=weights, beta=0.0, alpha=0.5, backend="cuda")
                ref = accumulate_factor(torch.zeros_like(out), a, bias=True, weights=weights, alpha=0.5, backend="torch")
                worst = max(worst, rel(out, ref))
        geo = dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
        for batch, hw in ((3, 9), (40, 17)):  # 40 x 9 x 14 = 5040 patch rows: split
            x = torch.randn(batch, 5, hw, 7, device="cuda").to(dtype)
            out = torch.full((5 * 6 + 1,) * 2, float("nan"), device="cuda")
            accumulate_conv_factor(out, x, bias=True, **geo, backend="cuda")
            ref = accumulate_conv_factor(torch.zeros_like(out), x, bias=True, **geo, backend="torch")
            worst = max(worst, rel(out, ref))
        if dtype == torch.float16:
            continue  # precondition and scales take fp32/bf16 gradients
        QG, QA = orthogonal(13), orthogonal(34)
        V = torch.randn(13, 34, device="cuda").to(dtype)
        S = torch.rand(13, 34, device="cuda") + 0.1
        for kw in (dict(scale=S), dict(eig_g=torch.rand(13, device="cuda"), eig_a=torch.rand(34, device="cuda"))):
            U, dot = precondition(V, QG, QA, damping=0.1, **kw, backend="cuda")
            U_ref, _ = precondition(V, QG, QA, damping=0.1, **kw, backend="torch")
            worst = max(worst, rel(U, U_ref))
        for shape in ((9,), (9, 5), (9, 0), (2048,), (300, 5)):  # (9, 0): T = 0; the last two split
            g = torch.randn(*shape, 13, device="cuda").to(dtype)
            a = torch.randn(*shape, 33, device="cuda").to(dtype)
            out = torch.full((13, 34), float("nan"), device="cuda")
            accumulate_scale(out, g, a, QG, QA, bias=True, alpha=0.1, backend="cuda")
            ref = accumulate_scale(torch.zeros_like(out), g, a, QG, QA, bias=True, alpha=0.1, backend="torch")
            worst = max(worst, rel(out, ref))
    torch.cuda.synchronize()
    return worst


if __name__ == "__main__":
    worst = run()
    print(f"sanitize_kernels: worst relative error vs reference {worst:.2e}")
    sys.exit(0 if worst < 1e-2 else 1)
