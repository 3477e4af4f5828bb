"""Benchmark models defined in the repo (no torchvision, no downloaded weights) and the QDQ ONNX files made from them.

- :func:`resnet50`: ResNet-50 v1.5 layout (bottleneck blocks [3, 4, 6, 3], conv/bn/relu, 224x224, 1000 classes,
  25,557,032 parameters), the size users deploy.
- :func:`scaled_resnet`: a narrow bottleneck ResNet with ``k`` blocks per stage (1x, 4x, 16x): the same layer mix at
  growing node counts, for the scaling benchmark.
- :func:`resnet_cifar`: a ResNet-20 style 32x32 model (basic blocks [3, 3, 3]) for training-step timing.
- :func:`digits_cnn`: the repo's SmallCNN (conv/bn/relu, depthwise-separable, residual add, concat, pooling, linear)
  on scikit-learn's 8x8 digits.

QDQ models are made two ways: ONNX Runtime's ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations)
of the float export, and tiexport's own PTCFxModule + export when that exists. Files are cached under the work folder,
keyed by a hash of this file, so an edited model is regenerated.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = [
    "Bottleneck",
    "ResNet",
    "digits_batches",
    "digits_cnn",
    "float_onnx",
    "ort_qdq_onnx",
    "parameter_count",
    "qdq_models",
    "resnet50",
    "resnet_cifar",
    "scaled_resnet",
    "target_model",
    "tiexport_qdq_onnx",
]

log = logging.getLogger(__name__)

_SOURCE_HASH = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:8]


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride here, as in v1.5), 1x1 expand; projection shortcut when the shape changes."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=False)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class BasicBlock(nn.Module):
    """Two 3x3 conv/bn, ReLU after the residual add (ResNet-18/20 block)."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=False)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != width:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, width, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + identity)


class ResNet(nn.Module):
    """A ResNet of ``block`` with ``layers[i]`` blocks in stage i; stage widths double from ``base_width``."""

    def __init__(self, block: type[Bottleneck] | type[BasicBlock], layers: list[int], *, base_width: int = 64,
                 num_classes: int = 1000, imagenet_stem: bool = True) -> None:
        super().__init__()
        if imagenet_stem:  # 7x7/2 conv + 3x3/2 max pool: 224 -> 56
            self.stem = nn.Sequential(nn.Conv2d(3, base_width, 7, stride=2, padding=3, bias=False),
                                      nn.BatchNorm2d(base_width), nn.ReLU(inplace=False),
                                      nn.MaxPool2d(3, stride=2, padding=1))
        else:  # CIFAR stem: one 3x3 conv, full resolution
            self.stem = nn.Sequential(nn.Conv2d(3, base_width, 3, padding=1, bias=False),
                                      nn.BatchNorm2d(base_width), nn.ReLU(inplace=False))
        in_ch = base_width
        stages = []
        for i, n in enumerate(layers):
            width = base_width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(block(in_ch, width, stride=2 if (i > 0 and j == 0) else 1))
                in_ch = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet50(num_classes: int = 1000) -> ResNet:
    """ResNet-50 (25.56M parameters at 1000 classes); input 1x3x224x224."""
    return ResNet(Bottleneck, [3, 4, 6, 3], base_width=64, num_classes=num_classes)


def scaled_resnet(multiplier: int, base_width: int = 16) -> ResNet:
    """``multiplier`` bottleneck blocks per stage (4 stages): 1x = 4 blocks, 4x = 16, 16x = 64; input 1x3x64x64.

    Narrow on purpose: the scaling benchmark is about node count, and a small file keeps load time from hiding it.
    """
    return ResNet(Bottleneck, [multiplier] * 4, base_width=base_width, num_classes=10)


def resnet_cifar(num_classes: int = 10) -> ResNet:
    """ResNet-20 layout (basic blocks [3, 3, 3], widths 16/32/64) for 1x3x32x32 input."""
    return ResNet(BasicBlock, [3, 3, 3], base_width=16, num_classes=num_classes, imagenet_stem=False)


def digits_cnn() -> nn.Module:
    """The repo's SmallCNN with one input channel, for scikit-learn's 8x8 digits (10 classes)."""
    from fixtures.torch_models import SmallCNN

    return SmallCNN(in_channels=1, num_classes=10, width=16)


def digits_batches(batch: int = 64, n: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's bundled digits as (N, 1, 8, 8) float batches in [0, 1] with labels."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    xt = torch.from_numpy((x / 16.0).astype(np.float32)).reshape(-1, 1, 8, 8)
    yt = torch.from_numpy(y.astype(np.int64))
    out = [(xt[i:i + batch], yt[i:i + batch]) for i in range(0, len(xt) - batch + 1, batch)]
    return out[:n] if n else out


# ------------------------------------------------------------------------------------------------ ONNX files
def _settle_bn(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics (a few training-mode forwards), then eval()."""
    torch.manual_seed(seed)
    model.train()
    batch = (max(4, shape[0]), *shape[1:])  # batch 1 with a 1x1 feature map has no BN statistics to take
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(batch))
    return model.eval()


def _cached(path: Path, make: Callable[[Path], None]) -> Path:
    if not path.exists():
        tmp = path.with_name(path.name + ".part")
        make(tmp)
        tmp.replace(path)
    return path


def float_onnx(factory: Callable[[], nn.Module], shape: tuple[int, ...], work: Path, name: str) -> Path:
    """Seeded model from ``factory``, BN statistics settled, exported with the TorchScript exporter (opset 17)."""

    def make(tmp: Path) -> None:
        torch.manual_seed(0)
        model = _settle_bn(factory(), shape)
        with torch.no_grad():
            torch.onnx.export(model, (torch.rand(shape),), str(tmp), input_names=["input"],
                              output_names=["logits"], opset_version=17, dynamo=False)

    return _cached(work / f"{name}_float_{_SOURCE_HASH}.onnx", make)


def ort_qdq_onnx(float_path: Path, num_batches: int = 4) -> Path:
    """ONNX Runtime ``quantize_static`` of ``float_path``: QDQ, per-channel int8 weights, uint8 activations."""
    from fixtures.torch_models import ort_quantize_static

    out = float_path.with_name(float_path.name.replace("_float_", "_ortqdq_"))
    return _cached(out, lambda tmp: ort_quantize_static(float_path, tmp, per_channel=True, num_batches=num_batches))


def tiexport_qdq_onnx(factory: Callable[[], nn.Module], shape: tuple[int, ...], work: Path, name: str,
                      num_batches: int = 4) -> Path:
    """tiexport's PTCFxModule (default qconfig WC8_AT8) calibrated on seeded random batches, then exported.

    Needs ``tiexport.wrappers`` and ``tiexport.symbolics.export`` (raises ImportError before them).
    """
    from tiexport.wrappers import PTCFxModule

    def make(tmp: Path) -> None:
        torch.manual_seed(0)
        model = _settle_bn(factory(), shape)
        example = torch.rand(shape)
        ptc = PTCFxModule(model, example_inputs=(example,))
        ptc.train()
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            for _ in range(num_batches):
                ptc(torch.rand(shape, generator=g))
        ptc.eval()
        ptc.export((example,), str(tmp), opset_version=17)

    return _cached(work / f"{name}_tiexportqdq_{_SOURCE_HASH}.onnx", make)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def target_model(quick: bool) -> tuple[str, Callable[[], nn.Module], tuple[int, ...]]:
    """The model the CLI comparisons run on: ResNet-50 at 224x224, or (quick) the 1x scaled model at 32x32."""
    if quick:
        return "tiny_resnet", lambda: scaled_resnet(1, base_width=8), (1, 3, 32, 32)
    return "resnet50", resnet50, (1, 3, 224, 224)


def qdq_models(work: Path, quick: bool) -> tuple[dict[str, Path], Path, list[str]]:
    """QDQ files of the target model by each maker that exists: ({label: path}, float path, notes)."""
    name, factory, shape = target_model(quick)
    fp = float_onnx(factory, shape, work, name)
    files = {"ORT quantize_static": ort_qdq_onnx(fp, num_batches=2 if quick else 4)}
    notes: list[str] = []
    try:
        files["tiexport PTC+export"] = tiexport_qdq_onnx(factory, shape, work, name, num_batches=2 if quick else 4)
    except ImportError as exc:
        notes.append(f"tiexport wrapper/export not available yet ({exc}); only ONNX Runtime's QDQ model measured")
    return files, fp, notes
