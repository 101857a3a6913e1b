"""The cost of a training step with the certified Lipschitz penalty, against a plain step.

    python benchmarks/training_step.py [--rounds 300] [--batches 64 128]

Trains the digits CNN of examples/training_digits.py briefly, then times interleaved plain and
penalized (``loss + lam * penalty()``, ``penalty = LipschitzBound(model, (1, 8, 8))`` built
once) steps on one thread and prints, per batch size, the ratio of the fastest penalized step
to the fastest plain one: in CPU time of the thread (what the step costs; robust on a shared
machine, where other processes take the cores away mid-step) and in wall-clock time. Also the
one-call form ``lipschitz_bound(model, shape)``, which keeps its plans on the model between
calls. Issue 18's target: a penalized step <= 2x a plain step, at the examples' batch of 64.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from specprof.training import LipschitzBound, lipschitz_bound

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 8, 8)
LAM = 1e-3


def step_costs(example: Any, model: nn.Module, batch: int, rounds: int
               ) -> dict[str, tuple[float, float]]:
    """Per kind of step (plain, penalized with a ``LipschitzBound``, penalized with the one-call
    ``lipschitz_bound``): (fastest CPU time of the thread, fastest wall-clock time), seconds,
    over ``rounds`` interleaved rounds (the minimum is what a step costs when nothing else
    competes for the core)."""
    x_train, y_train, _, _ = example.digits_split()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    penalty = LipschitzBound(model, SHAPE)
    x, y = x_train[:batch], y_train[:batch]
    kinds: dict[str, Callable[[], torch.Tensor] | None] = {
        "plain": None, "LipschitzBound": penalty,
        "lipschitz_bound": lambda: lipschitz_bound(model, SHAPE)}

    def one(bound: Callable[[], torch.Tensor] | None) -> tuple[float, float]:
        cpu, wall = time.thread_time(), time.perf_counter()
        loss = loss_fn(model(x), y)
        if bound is not None:
            loss = loss + LAM * bound()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.thread_time() - cpu, time.perf_counter() - wall

    times: dict[str, list[tuple[float, float]]] = {kind: [] for kind in kinds}
    for _ in range(rounds):
        for kind, bound in kinds.items():
            times[kind].append(one(bound))
    return {kind: (float(np.min([c for c, _ in found])), float(np.min([w for _, w in found])))
            for kind, found in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128])
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "examples"))
    import training_digits as example

    model, _ = example.train(lam=LAM, epochs=3)
    print("penalized step / plain step (fastest of each; target <= 2 at batch 64)")
    for batch in args.batches:
        costs = step_costs(example, model, batch, args.rounds)
        plain_cpu, plain_wall = costs["plain"]
        print(f"batch {batch:>4}: plain {1000 * plain_cpu:.2f} ms CPU, "
              f"{1000 * plain_wall:.2f} ms wall")
        for kind in ("LipschitzBound", "lipschitz_bound"):
            cpu, wall = costs[kind]
            print(f"  {kind:>16}: {cpu / plain_cpu:.2f} (CPU time), {wall / plain_wall:.2f} "
                  f"(wall clock)")


if __name__ == "__main__":
    main()
