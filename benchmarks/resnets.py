"""ResNet-18 and ResNet-50 in plain torch (random weights), exported to ONNX for the benchmarks.

torchvision is not a dependency, so the two architectures are written out here: the standard
ImageNet layout (7x7/2 stem, 3x3/2 max pool, four stages, global average pool, 1000-way fc),
basic blocks for ResNet-18 and bottleneck blocks (stride on the 3x3, as torchvision) for
ResNet-50. ``build_resnet18_onnx(path)`` / ``build_resnet50_onnx(path)`` export at 224x224 with
``torch.onnx.export(..., dynamo=False, opset_version=18)`` in eval mode, which folds every
BatchNorm into the conv before it (the exporter's eval peephole), so the file has 20 / 53 Conv
nodes and one Gemm. Weights are seeded (``seed``), BatchNorm statistics randomized so the fold
changes the kernels as a trained model's would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

RESNET18_CONVS = 20
RESNET50_CONVS = 53


def _modules() -> Any:
    """Build the torch module classes lazily (torch is heavy; importing this file stays cheap)."""
    from torch import nn

    class BasicBlock(nn.Module):
        expansion = 1

        def __init__(self, c_in: int, width: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, width, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = _shortcut(nn, c_in, width, stride)

        def forward(self, x: Any) -> Any:
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    class Bottleneck(nn.Module):
        expansion = 4

        def __init__(self, c_in: int, width: int, stride: int) -> None:
            super().__init__()
            c_out = width * 4
            self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(width)
            self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(c_out)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = _shortcut(nn, c_in, c_out, stride)

        def forward(self, x: Any) -> Any:
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    class ResNet(nn.Module):
        def __init__(self, block: Any, depths: tuple[int, ...], classes: int = 1000) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
            stages, c_in = [], 64
            for index, depth in enumerate(depths):
                width = 64 * 2**index
                blocks = []
                for position in range(depth):
                    stride = 2 if index > 0 and position == 0 else 1
                    blocks.append(block(c_in, width, stride))
                    c_in = width * block.expansion
                stages.append(nn.Sequential(*blocks))
            self.stages = nn.Sequential(*stages)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(c_in, classes)

        def forward(self, x: Any) -> Any:
            return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))

    return BasicBlock, Bottleneck, ResNet


def _shortcut(nn: Any, c_in: int, c_out: int, stride: int) -> Any:
    """The 1x1 projection + BatchNorm when the block changes shape, else None (identity)."""
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))


def _randomize_batchnorm(model: Any, seed: int) -> None:
    """Give every BatchNorm non-trivial statistics so folding it changes the kernels."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(c, generator=generator))
                module.weight.copy_(0.5 + torch.rand(c, generator=generator))
                module.bias.copy_(0.1 * torch.randn(c, generator=generator))


def resnet18(seed: int = 0) -> Any:
    """A random-weight ResNet-18 torch module in eval mode."""
    import torch

    torch.manual_seed(seed)
    basic, _, resnet = _modules()
    model = resnet(basic, (2, 2, 2, 2))
    _randomize_batchnorm(model, seed)
    return model.eval()


def resnet50(seed: int = 0) -> Any:
    """A random-weight ResNet-50 torch module in eval mode."""
    import torch

    torch.manual_seed(seed)
    _, bottleneck, resnet = _modules()
    model = resnet(bottleneck, (3, 4, 6, 3))
    _randomize_batchnorm(model, seed)
    return model.eval()


def export_onnx(model: Any, path: str | Path, size: int = 224) -> Path:
    """Export ``model`` at 1x3xsize x size to ONNX (opset 18, legacy exporter, BN folded)."""
    import torch

    path = Path(path)
    with torch.no_grad():
        torch.onnx.export(model, (torch.randn(1, 3, size, size),), str(path), dynamo=False,
                          opset_version=18, do_constant_folding=True,
                          input_names=["input"], output_names=["logits"])
    return path


def build_resnet18_onnx(path: str | Path, seed: int = 0, size: int = 224) -> Path:
    """Write a random-weight ResNet-18 (BN folded, 20 convs + 1 Gemm) to ``path``; return it."""
    return export_onnx(resnet18(seed), path, size)


def build_resnet50_onnx(path: str | Path, seed: int = 0, size: int = 224) -> Path:
    """Write a random-weight ResNet-50 (BN folded, 53 convs + 1 Gemm) to ``path``; return it."""
    return export_onnx(resnet50(seed), path, size)


if __name__ == "__main__":
    import sys

    for target in sys.argv[1:] or ["resnet50.onnx"]:
        builder = build_resnet18_onnx if "18" in Path(target).name else build_resnet50_onnx
        print(builder(target))
