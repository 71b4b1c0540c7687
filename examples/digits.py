"""Real models on real data: an MLP and a small CNN trained on scikit-learn's bundled
digits (1797 8x8 images, no download), seeded, in a few seconds on a CPU.

Used by the demo recipe (examples/digits.toml), the tests and the benchmarks::

    from examples.digits import trained_mlp, digits_data, accuracy
    model = trained_mlp()                  # 64-300-100-10, ~97% test accuracy
    data = digits_data()
    print(accuracy(model, data.x_test, data.y_test))
"""
from __future__ import annotations

import copy
import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class Digits:
    x_train: torch.Tensor  # [N, 64] float in [0, 1]
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def images(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, 1, 8, 8)


@functools.lru_cache(maxsize=None)
def digits_data(seed: int = 0, test_fraction: float = 0.25) -> Digits:
    """scikit-learn's digits, split by a seeded permutation (stratification not needed)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = int(len(x) * test_fraction)
    te, tr = perm[:n_test], perm[n_test:]
    return Digits(x[tr], y[tr], x[te], y[te])


class DigitsMLP(nn.Module):
    """An MLP for 64-pixel digits; ``hidden=(300, 100)`` is shaped like LeNet-300-100."""

    def __init__(self, hidden: tuple[int, ...] = (300, 100), classes: int = 10):
        super().__init__()
        dims = (64, *hidden)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:]))
        self.head = nn.Linear(dims[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


class DigitsCNN(nn.Module):
    """A LeNet-5-like CNN for 1x8x8 digits, with BatchNorm."""

    def __init__(self, c1: int = 16, c2: int = 32, hidden: int = 64, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c2)
        self.fc1 = nn.Linear(c2 * 2 * 2, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, 8, 8)
        x = torch.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = torch.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        x = torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))


def train(model: nn.Module, data: Digits, epochs: int = 40, lr: float = 2e-3,
          batch_size: int = 64, seed: int = 0, loss_fn=nn.functional.cross_entropy) -> nn.Module:
    """Train with Adam and cross-entropy (or ``loss_fn``), seeded; returns the model in eval mode."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    n = len(data.x_train)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.train(False)


#: a directory where trained models are kept for other processes (the test suite sets it
#: to one folder per run, so its workers and the recipes they load train each model once)
CACHE_ENV = "FXPRESS_DIGITS_CACHE"


@functools.lru_cache(maxsize=None)
def _trained(kind: str, hidden: tuple[int, ...], seed: int, epochs: int) -> nn.Module:
    torch.manual_seed(seed)
    model = DigitsMLP(hidden) if kind == "mlp" else DigitsCNN()
    cache = os.environ.get(CACHE_ENV)
    if not cache:
        return train(model, digits_data(), epochs=epochs, seed=seed)
    import fcntl

    import safetensors.torch

    # keyed by everything the weights depend on: this file's code (a copied digits.py
    # loaded by a recipe shares it), the arguments and torch's thread count (float sums)
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    key = f"{kind}-{'x'.join(map(str, hidden)) or 'cnn'}-s{seed}-e{epochs}-t{torch.get_num_threads()}-{code}"
    path = Path(cache) / f"{key}.safetensors"
    with open(Path(cache) / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process trains, the others wait and load
        if path.is_file():
            model.load_state_dict(safetensors.torch.load_file(str(path)))
            torch.manual_seed(seed)  # the global RNG as training leaves it (train() seeds it)
            return model.train(False)
        train(model, digits_data(), epochs=epochs, seed=seed)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                    str(tmp))
        os.replace(tmp, path)
    return model


def trained_mlp(hidden: tuple[int, ...] = (300, 100), seed: int = 0, epochs: int = 40) -> nn.Module:
    """A fresh copy of the seeded, trained digits MLP (trained once per process)."""
    return copy.deepcopy(_trained("mlp", tuple(hidden), seed, epochs))


def trained_cnn(seed: int = 0, epochs: int = 30) -> nn.Module:
    """A fresh copy of the seeded, trained digits CNN (trained once per process)."""
    return copy.deepcopy(_trained("cnn", (), seed, epochs))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.train(False)
    try:
        return float((model(x).argmax(-1) == y).float().mean())
    finally:
        model.train(was)


# -- recipe hooks (examples/digits.toml) --------------------------------------------------

def example_inputs() -> tuple:
    return (digits_data().x_train[:32],)


def calibration(batches: int = 4, batch_size: int = 128) -> list[tuple]:
    x = digits_data().x_train
    return [(x[i * batch_size:(i + 1) * batch_size],) for i in range(batches)]


def train_data(batch_size: int = 64) -> list[tuple]:
    d = digits_data()
    return [(d.x_train[i:i + batch_size], d.y_train[i:i + batch_size])
            for i in range(0, len(d.x_train), batch_size)]


def few_labels(fraction: float, batch_size: int = 64) -> tuple[list[tuple], list[tuple]]:
    """The training set with labels kept for only ``fraction`` of it.

    Returns ``(labelled, unlabelled)``: ``(x, y)`` batches of the first ``fraction`` of the
    (already shuffled) training images, and ``(x,)`` batches of the rest, whose labels are
    withheld. A student can learn from the unlabelled ones only through a teacher (a
    transfer set, as in Hinton et al. 2015).
    """
    d = digits_data()
    k = round(len(d.x_train) * fraction)
    labelled = [(d.x_train[i:min(i + batch_size, k)], d.y_train[i:min(i + batch_size, k)])
                for i in range(0, k, batch_size)]
    unlabelled = [(d.x_train[i:i + batch_size],) for i in range(k, len(d.x_train), batch_size)]
    return labelled, unlabelled


def student_accuracies(teacher: nn.Module, batches: list[tuple], epochs: int, seeds,
                       hidden: tuple[int, ...] = (32,), lr: float = 1e-2, **distiller) -> list[float]:
    """Test accuracy of a fresh ``DigitsMLP(hidden)`` per seed, trained by ``fxpress.Distiller``.

    Every call runs the same loop (Adam, cosine schedule, the seed's initial weights and
    batch order); ``distiller`` keywords choose the loss: ``alpha=0.0`` is labels only.
    """
    import fxpress

    d, accs = digits_data(), []
    for seed in seeds:
        torch.manual_seed(seed)  # the same initial student for every loss
        student = DigitsMLP(hidden)
        fit = fxpress.Distiller(teacher, student, **distiller)
        fit.fit(batches, epochs=epochs, lr=lr, seed=seed, progress=False)
        accs.append(accuracy(fit.student, d.x_test, d.y_test))
    return accs


def evaluate(module: nn.Module) -> dict[str, float]:
    d = digits_data()
    return {"test accuracy": accuracy(module, d.x_test, d.y_test)}
