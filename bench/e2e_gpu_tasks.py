"""GPU-scale tasks for ``bench/e2e.py --gpu-scale``: synthetic data, generated on the device
from a seed (nothing is downloaded), wrapped as :class:`kfac_cuda.demo.tasks.Task`.

``resnet18``
    CIFAR-style ResNet-18 (BasicBlocks [2, 2, 2, 2], 64–512 channels, ~11 M parameters)
    on 32×32 RGB images of 10 classes: each class is a fixed random smooth pattern; an
    example is its class pattern with a random gain, plus a weaker pattern of a random
    class and Gaussian noise, so the task is learnable but not trivial. Cross-entropy, test accuracy.
``transformer``
    A 4-block pre-LayerNorm encoder (width 256, 4 heads, MLP 4×) that must output its
    input token sequence reversed (length 32, vocabulary 64): every output position has
    to attend to another position. Per-token cross-entropy and accuracy. Attention is
    written with plain ``nn.Linear`` projections (not ``nn.MultiheadAttention``, whose
    projections are raw parameters) so the K-FAC family preconditions every projection.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from kfac_cuda.demo.tasks import Task, classification_loss

GPU_TASKS = ("resnet18", "transformer")


class BasicBlock(nn.Module):
    """ResNet basic block: two 3×3 convs with BatchNorm and an identity or 1×1 shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(num_classes: int = 10) -> nn.Sequential:
    """ResNet-18 for 32×32 inputs (3×3 stem, no max-pool), as used for CIFAR-10."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    c_in = 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


class EncoderBlock(nn.Module):
    """Pre-LayerNorm transformer block with ``nn.Linear`` attention projections."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(attended)
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """Token + learned position embeddings, encoder blocks, a final norm and a linear head."""

    def __init__(self, vocab: int, length: int, width: int = 256, depth: int = 4, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.02 * torch.randn(length, width))
        self.blocks = nn.Sequential(*(EncoderBlock(width, heads) for _ in range(depth)))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(tokens) + self.position)))


def token_loss(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over every (sequence, position), mean."""
    del x
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def _pattern_images(n: int, templates: torch.Tensor, generator: torch.Generator
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy, rescaled copies of random class templates over a weaker distractor
    template, with their labels."""
    device = templates.device
    labels = torch.randint(0, len(templates), (n,), generator=generator, device=device)
    distractors = torch.randint(0, len(templates), (n,), generator=generator, device=device)
    gain = 0.5 + torch.rand(n, 1, 1, 1, generator=generator, device=device)
    images = gain * templates[labels] + 0.4 * templates[distractors]
    return images + 0.8 * torch.randn(images.shape, generator=generator, device=device), labels


def build_gpu_task(name: str, seed: int, device: torch.device, n_train: int = 8192, n_test: int = 2048) -> Task:
    """Build the named GPU-scale task (one of :data:`GPU_TASKS`) on ``device``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    if name == "resnet18":
        noise = torch.randn(10, 3, 8, 8, generator=generator, device=device)
        templates = F.interpolate(noise, size=32, mode="bilinear", align_corners=False)
        x_train, y_train = _pattern_images(n_train, templates, generator)
        x_test, y_test = _pattern_images(n_test, templates, generator)
        return Task(name, x_train, y_train, x_test, y_test, resnet18, classification_loss, "cross_entropy",
                    test_metric="accuracy", target_loss=0.1, target_test=0.9)
    if name == "transformer":
        vocab, length = 64, 32
        x_train = torch.randint(0, vocab, (n_train, length), generator=generator, device=device)
        x_test = torch.randint(0, vocab, (n_test, length), generator=generator, device=device)
        return Task(name, x_train, x_train.flip(1), x_test, x_test.flip(1),
                    lambda: TinyTransformer(vocab, length), token_loss, "cross_entropy",
                    test_metric="accuracy", target_loss=0.1, target_test=0.95)
    raise ValueError(f"unknown GPU task {name!r}; choose from {', '.join(GPU_TASKS)}")
