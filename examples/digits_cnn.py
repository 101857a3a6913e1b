"""Train a small CNN on scikit-learn's bundled digits (8x8, 10 classes) for the hypergraph demo.

Needs no download: the data ships with scikit-learn. Reproducible: fixed seeds, deterministic
torch algorithms, CPU, one thread; takes a few seconds. Writes

- examples/digits_cnn.onnx: the trained model (input ``image`` of shape (N, 1, 8, 8), pixels
  scaled to [0, 1]; output ``logits`` (N, 10));
- examples/digits_test.npz: the held-out 20% split, ``x`` (N, 1, 8, 8) float32 and ``y`` (N,)
  int64, for ``specprof hypergraph examples/digits_cnn.onnx --data examples/digits_test.npz``.

Run with the torch extra and scikit-learn installed:

    python examples/digits_cnn.py
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 0
EPOCHS = 30


class DigitsCNN(nn.Module):
    """Three 3x3 convolutions and two fully connected layers: five layers to follow in depth."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                  # 8x8 -> 4x4
            nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): a stratified 80/20 split, pixels in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=SEED,
                                                        stratify=y)
    return x_train, y_train, x_test, y_test


def train(x: np.ndarray, y: np.ndarray) -> DigitsCNN:
    """Adam, mini-batches of 64 in a seeded order."""
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)
    order = torch.Generator().manual_seed(SEED)
    for _epoch in range(EPOCHS):
        model.train()
        for batch in torch.randperm(len(inputs), generator=order).split(64):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(inputs[batch]), labels[batch])
            loss.backward()
            optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        predicted = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((predicted == y).mean())


def main() -> None:
    x_train, y_train, x_test, y_test = digits_split()
    model = train(x_train, y_train)
    print(f"test accuracy {accuracy(model, x_test, y_test):.3f} on {len(y_test)} held-out digits")
    onnx_path = HERE / "digits_cnn.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 8, 8),), str(onnx_path), dynamo=False,
                      input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    data_path = HERE / "digits_test.npz"
    np.savez_compressed(data_path, x=x_test, y=y_test)
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size} bytes), "
          f"{data_path} ({data_path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
