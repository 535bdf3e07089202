"""ImageNet ResNets in torchvision's layout, for the paper's rejection sampling: a classifier
scores each sample's probability of the class it was sampled for.

Our own module (torchvision cannot be imported on this CPU build, model/evaluation/inception.py says
why); the state-dict names are torchvision's (`conv1`, `bn1`, `layer{1-4}.{i}.conv{1-3}`,
`.downsample.{0,1}`, `fc`), so a torchvision checkpoint such as `resnet101-cd907fc2.pth` (the
paper used a ResNet-101) loads with `torch.load(weights_only=True)`, every name and shape
checked. Inputs are preprocessed as torchvision's eval transform: shorter side to 256
(bilinear, antialiased), centre crop 224, ImageNet mean and std.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.weights.serialization import load_checked, read_foreign_weights

# arch -> (block, blocks per stage)
ARCHITECTURES = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)),
                 "resnet50": ("bottleneck", (3, 4, 6, 3)),
                 "resnet101": ("bottleneck", (3, 4, 23, 3)),
                 "resnet152": ("bottleneck", (3, 8, 36, 3))}  # fmt: skip
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class Block(nn.Module):
    """torchvision's BasicBlock (two 3x3) or Bottleneck (1x1, 3x3 with the stride, 1x1 x4)."""

    def __init__(self, kind: str, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.expansion = 4 if kind == "bottleneck" else 1
        cout = width * self.expansion
        if kind == "bottleneck":
            shapes = [(cin, width, 1, 1), (width, width, 3, stride), (width, cout, 1, 1)]
        else:
            shapes = [(cin, width, 3, stride), (width, width, 3, 1)]
        for i, (a, b, k, s) in enumerate(shapes, 1):
            setattr(self, f"conv{i}", nn.Conv2d(a, b, k, s, padding=k // 2, bias=False))
            setattr(self, f"bn{i}", nn.BatchNorm2d(b))
        self.layers = len(shapes)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for i in range(1, self.layers + 1):
            h = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(h))
            if i < self.layers:
                h = F.relu(h)
        return F.relu(h + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, arch: str = "resnet50", num_classes: int = 1000) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown ResNet {arch!r}; choose one of {sorted(ARCHITECTURES)}")
        kind, counts = ARCHITECTURES[arch]
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for stage, (width, count) in enumerate(zip((64, 128, 256, 512), counts, strict=True), 1):
            blocks = []
            for i in range(count):
                blocks.append(Block(kind, cin, width, 2 if i == 0 and stage > 1 else 1))
                cin = blocks[-1].expansion * width
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, num_classes)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) -> logits (B, classes), after torchvision's eval preprocessing."""
        x = images.float() / 255
        short = min(x.shape[-2:])
        size = [round(s * 256 / short) for s in x.shape[-2:]]
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        top, left = (size[0] - 224) // 2, (size[1] - 224) // 2
        x = (x[..., top : top + 224, left : left + 224] - self.mean) / self.std  # (B, 3, 224, 224)
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)  # (B, 64, 56, 56)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, C, 7, 7)
        return self.fc(x.mean((2, 3)))


def load_resnet(path: str, arch: str) -> ResNet:
    """A torchvision-layout checkpoint (a plain state dict) as an eval-mode `ResNet`."""
    state = read_foreign_weights(path)
    num_classes = state["fc.weight"].shape[0] if "fc.weight" in state else 1000
    return load_checked(ResNet(arch, num_classes), state, path, f"a torchvision {arch} checkpoint")
