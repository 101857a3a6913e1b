"""Spectral control while training: a digits CNN with a Lipschitz penalty, clipping and a monitor.

Needs no download: scikit-learn ships the 8x8 digits. Trains the same CNN three ways from the
same initialization (plain; with ``loss + lam * penalty()``, ``penalty = LipschitzBound(model,
shape)`` the certified Lipschitz bound built once; with ``clip_operator_norm_``
after each epoch) and prints, for each, held-out accuracy, the certified Lipschitz bound, the
true product of the layers' operator norms (dense, exact) and the time per step. The penalized
run is followed by a ``SpectralMonitor`` that stores a run every 10 epochs (and after the
last) in ``--db``.

    python examples/training_digits.py --db digits-training.db
    specprof runs --db digits-training.db
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass

import digits_cnn  # the digits split of the other example, in this folder
import numpy as np
import torch
from torch import nn

from specprof.engine.operator import dense_operator
from specprof.training import (
    LipschitzBound,
    SpectralMonitor,
    clip_operator_norm_,
    layer_input_shapes,
    lipschitz_bound,
    module_layer,
)

SEED = 0
INPUT_SHAPE = (1, 8, 8)


def digits_model() -> nn.Sequential:
    """Three 3x3 convolutions and two fully connected layers (as examples/digits_cnn.py)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),                                  # 8x8 -> 4x4, no overlap: 1-Lipschitz
        nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32), nn.ReLU(),
        nn.Linear(32, 10),
    )


def digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test) as tensors: ``digits_cnn.py``'s stratified 80/20
    split, pixels in [0, 1]."""
    return tuple(torch.from_numpy(a) for a in digits_cnn.digits_split())  # type: ignore[return-value]


def true_norm_product(model: nn.Module) -> float:
    """The product of the layers' exact operator norms (dense matrices, float64)."""
    shapes = layer_input_shapes(model, INPUT_SHAPE)
    product = 1.0
    for name, module in model.named_modules():
        if name in shapes:
            matrix = dense_operator(module_layer(module, shapes[name], name=name))
            product *= float(np.linalg.norm(matrix, 2))
    return product


@dataclass
class Outcome:
    accuracy: float
    bound: float
    true_product: float
    seconds_per_step: float


def train(lam: float = 0.0, clip: float | None = None, epochs: int = 30, batch: int = 64,
          monitor_db: str | None = None, name: str = "digits") -> tuple[nn.Sequential, Outcome]:
    """Train from the fixed initialization; ``lam`` weights the Lipschitz penalty, ``clip``
    clips every conv/linear layer's operator norm to ``clip`` after each epoch, ``monitor_db`` stores a
    profile of the weights every 10 epochs (and after the last) as runs named NAME@step=N."""
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    x_train, y_train, x_test, y_test = digits_split()
    model = digits_model()
    shapes = layer_input_shapes(model, INPUT_SHAPE)
    layers = {name: m for name, m in model.named_modules() if name in shapes}
    monitor = None if monitor_db is None else SpectralMonitor(
        model, INPUT_SHAPE, db=monitor_db, every=10, name=name)
    penalty = LipschitzBound(model, INPUT_SHAPE)  # keeps shapes and plans between steps
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(SEED)
    steps, seconds = 0, 0.0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), batch):
            index = order[start:start + batch]
            started = time.perf_counter()
            loss = loss_fn(model(x_train[index]), y_train[index])
            if lam:
                loss = loss + lam * penalty()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seconds += time.perf_counter() - started
            steps += 1
        if clip is not None:  # after every epoch (Sedghi et al. clip every 100 steps)
            started = time.perf_counter()
            for name, module in layers.items():
                clip_operator_norm_(module, clip, shapes[name])
            seconds += time.perf_counter() - started  # counted in the time per step
        if monitor is not None:
            monitor.step(epoch)
    if monitor is not None:
        if not monitor.due(epochs - 1):
            monitor.profile(epochs - 1)
        monitor.close()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
        bound = float(lipschitz_bound(model, INPUT_SHAPE))
    return model, Outcome(accuracy, bound, true_norm_product(model), seconds / steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="digits-training.db", help="store for the monitor")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lam", type=float, default=1e-3, help="weight of the penalty")
    parser.add_argument("--clip", type=float, default=2.0, help="per-layer norm for clipping")
    args = parser.parse_args()
    torch.set_num_threads(1)
    _, plain = train(epochs=args.epochs)
    _, penalized = train(lam=args.lam, epochs=args.epochs, monitor_db=args.db,
                         name="digits-penalized")
    _, clipped = train(clip=args.clip, epochs=args.epochs)
    print(f"{'':>10} {'accuracy':>9} {'bound':>10} {'true prod':>10} {'ms/step':>8}")
    for label, o in (("plain", plain), ("penalized", penalized), ("clipped", clipped)):
        print(f"{label:>10} {o.accuracy:9.3f} {o.bound:10.2f} {o.true_product:10.2f} "
              f"{1000 * o.seconds_per_step:8.2f}")


if __name__ == "__main__":
    main()
