"""Build examples/small_cnn.onnx: the small CNN that `make demo` profiles.

Random weights from a fixed seed (torch's default initialization), exported with the
TorchScript-based exporter. Run with the torch extra installed:

    python examples/make_small_cnn.py
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent


class SmallCNN(nn.Module):
    """Every kind of layer specprof profiles, at sizes the exact backend handles in seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),                       # plain 3x3
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),            # strided
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=2, dilation=2, groups=32),  # depthwise, dilated
            nn.ReLU(),
            nn.Conv2d(32, 32, 1),                                 # pointwise
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def main() -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    target = HERE / "small_cnn.onnx"
    torch.onnx.export(model, (torch.zeros(1, 3, 16, 16),), str(target), dynamo=False,
                      input_names=["image"], output_names=["logits"])
    print(f"wrote {target} ({target.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
