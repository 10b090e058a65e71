"""Demo tasks on scikit-learn's digits: data, models, losses and test metrics.

The data ship inside scikit-learn (1,797 grey 8×8 images, 10 classes), so nothing is
downloaded at run time. The train/test split is fixed by the seed (stratified, 20 %
test). Two tasks:

``autoencoder``
    A deep tanh MLP autoencoder in the style of Hinton & Salakhutdinov (2006), the
    classic K-FAC benchmark of Martens & Grosse (2015), scaled to 8×8 images:
    64-128-64-32-16-32-64-128-64 (linear 16-unit code, logistic output). Loss: binary
    cross-entropy summed over the 64 pixels, averaged over the batch (the negative
    log-likelihood of a Bernoulli image model, so its Fisher is the natural one).
``classifier``
    A small CNN: conv 3×3 (1→16) – ReLU – conv 3×3 stride 2 (16→32) – ReLU – linear
    (32·4·4 → 10). Loss: cross-entropy; test metric: accuracy.
``curves``
    The CURVES deep autoencoder of Hinton & Salakhutdinov (2006) and Martens & Grosse (2015),
    scaled to run on a CPU in minutes: generated curve images (:func:`make_curves`, 16×16
    instead of 28×28) and a 256-200-100-50-25-6 encoder with its mirror decoder (the paper's
    784-400-200-100-50-25-6 with the first width halved), tanh hidden units, linear 6-unit
    code, Bernoulli loss as for ``autoencoder``.

A :class:`Task` bundles everything the training loop and the benchmarks need, so new
tasks (e.g. the GPU-scale ones in ``bench/e2e.py``) plug in by building one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

TASKS = ("autoencoder", "classifier", "curves")

Criterion = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Task:
    """A supervised problem: tensors on the target device, a model factory and a loss.

    ``criterion(outputs, x, y)`` returns the batch-mean training loss of the model's
    ``outputs`` on inputs ``x`` with labels ``y``. ``fisher_loss`` names the model's predictive
    distribution for :meth:`kfac_cuda.KFAC.sample_fisher`, which draws targets from it for
    the MC ("true") Fisher (``"cross_entropy"`` or ``"bernoulli"``). ``test_metric`` names the
    number reported on the test set (``"accuracy"`` is higher-is-better, anything else
    is a loss, lower-is-better); ``target_loss`` and ``target_test`` are the default
    thresholds for "time to target".
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    make_model: Callable[[], nn.Module]
    criterion: Criterion
    fisher_loss: str
    test_metric: str
    target_loss: float
    target_test: float

    @property
    def higher_test_is_better(self) -> bool:
        """True when the test metric is an accuracy rather than a loss."""
        return self.test_metric == "accuracy"

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Batch-mean training loss of ``model`` on (x, y)."""
        return self.criterion(model(x), x, y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 2048) -> tuple[float, float]:
        """Return (full training-set loss, test metric) of ``model`` in eval mode."""
        was_training = model.training
        model.eval()
        train_loss = _batched_mean(lambda x, y: self.loss(model, x, y), self.x_train, self.y_train, batch_size)
        if self.higher_test_is_better:
            test = _batched_mean(lambda x, y: (model(x).argmax(-1) == y).float().mean(), self.x_test, self.y_test, batch_size)
        else:
            test = _batched_mean(lambda x, y: self.loss(model, x, y), self.x_test, self.y_test, batch_size)
        model.train(was_training)
        return train_loss, test


def _batched_mean(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                  y: torch.Tensor, batch_size: int) -> float:
    """Mean of a per-batch-mean quantity over a whole tensor, evaluated in chunks."""
    total = 0.0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        total += float(fn(xb, yb)) * len(xb)
    return total / len(x)


def load_digits_split(seed: int, device: torch.device, test_size: float = 0.2
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits images scaled to [0, 1] as (N, 1, 8, 8) float tensors, split by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=test_size,
                                           random_state=seed, stratify=y.numpy())
    return (x[idx_train].to(device), y[idx_train].to(device),
            x[idx_test].to(device), y[idx_test].to(device))


def make_autoencoder(widths: tuple[int, ...] = (64, 128, 64, 32, 16, 32, 64, 128, 64)) -> nn.Sequential:
    """Deep MLP autoencoder: tanh hidden layers, linear code layer, logits at the output."""
    code = len(widths) // 2
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i + 1 != code and i + 2 != len(widths):
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


CURVES_WIDTHS = (256, 200, 100, 50, 25, 6, 25, 50, 100, 200, 256)


def make_curves(n: int, size: int = 16, seed: int = 0, points: int = 64, width: float = 0.6) -> torch.Tensor:
    """CURVES-like images in [0, 1], (n, 1, size, size), deterministic in ``seed``: each is a
    quadratic Bézier curve through three control points drawn uniformly in the image, rendered
    as the maximum over ``points`` samples along it of a Gaussian stroke of std ``width`` pixels
    (Hinton & Salakhutdinov's CURVES draws a curve from three random points on 28×28 images)."""
    g = torch.Generator().manual_seed(seed)
    control = (torch.rand(n, 3, 2, generator=g, dtype=torch.float64) * (size - 1)).float()
    t = torch.linspace(0, 1, points).view(1, points, 1)
    curve = ((1 - t) ** 2 * control[:, :1] + 2 * t * (1 - t) * control[:, 1:2] + t ** 2 * control[:, 2:])
    axis = torch.arange(size, dtype=torch.float32)
    # the Gaussian stroke separates into rows and columns: exp(-(dy^2 + dx^2)/2w^2) = ey * ex
    ey = torch.exp(-(axis.view(1, size, 1) - curve[:, :, 0].unsqueeze(1)).square() / (2 * width ** 2))
    ex = torch.exp(-(axis.view(1, size, 1) - curve[:, :, 1].unsqueeze(1)).square() / (2 * width ** 2))
    images = torch.cat([(y.unsqueeze(2) * x.unsqueeze(1)).amax(-1)  # (chunk, size, size): max over points
                        for y, x in zip(ey.split(500), ex.split(500))])
    return images.view(n, 1, size, size)


def make_cnn(num_classes: int = 10) -> nn.Sequential:
    """Two 3×3 conv layers and a linear head for 1×8×8 inputs."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, num_classes),
    )


def reconstruction_loss(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bernoulli NLL of the images: BCE summed over pixels, mean over the batch."""
    del y  # an autoencoder's target is its input
    return F.binary_cross_entropy_with_logits(logits, x.flatten(1), reduction="sum") / len(x)


def classification_loss(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits, mean over the batch."""
    del x
    return F.cross_entropy(logits, y)


def build_task(name: str, seed: int, device: torch.device) -> Task:
    """Build the named task (one of :data:`TASKS`) on ``device``."""
    if name == "curves":  # the data set is fixed (seed 0); ``seed`` moves the init and batches only
        x = make_curves(6000).to(device)
        y = torch.zeros(len(x), dtype=torch.long, device=device)
        return Task(name, x[:5000], y[:5000], x[5000:], y[5000:], lambda: make_autoencoder(CURVES_WIDTHS),
                    reconstruction_loss, "bernoulli", test_metric="test loss", target_loss=30.0, target_test=30.0)
    x_train, y_train, x_test, y_test = load_digits_split(seed, device)
    if name == "autoencoder":
        return Task(name, x_train, y_train, x_test, y_test, make_autoencoder, reconstruction_loss,
                    "bernoulli", test_metric="test loss", target_loss=20.0, target_test=20.0)
    if name == "classifier":
        return Task(name, x_train, y_train, x_test, y_test, make_cnn, classification_loss,
                    "cross_entropy", test_metric="accuracy", target_loss=0.05, target_test=0.95)
    raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
