"""The FID Inception network: InceptionV3 as in TensorFlow's 2015-12-05 graph, which every FID
implementation (the TTUR original, pytorch-fid, torch-fidelity, clean-fid, the ADM evaluator)
reads features from.

Why our own module: torch-fidelity, pytorch-fid and clean-fid all import torchvision, and
torchvision's CPU wheels do not match the CPU torch build here (its `_C` links the CUDA
libtorch). The network is small to write down; what makes it "the" FID network is the weights
and three TensorFlow details, kept here:
- images are resized to 299x299 with TensorFlow 1.x bilinear resizing (no half-pixel offset,
  `tf1_bilinear_resize`), as torch-fidelity does (pytorch-fid uses torch's bilinear; the two
  differ by ~1e-2 FID: docs/evaluation.md);
- the average pools of the A, C and first E blocks leave the zero padding out of the mean;
- the last E block pools with max, not average.

Weights: `weights-inception-2015-12-05-6726825d.pth` (torch-fidelity) or
`pt_inception-2015-12-05-6726825d.pth` (pytorch-fid); both are plain state dicts with the same
names (torchvision's Inception3 names, fc with 1008 classes, no AuxLogits) and are read with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.weights.serialization import load_checked, read_foreign_weights

WEIGHT_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
INPUT_SIZE = 299
POOL_FEATURES = 2048
NUM_LOGITS = 1008  # the TF graph's 1,000 ImageNet classes plus 8 unused


def tf1_bilinear_resize(x: Tensor, size: int) -> Tensor:
    """(B, C, H, W) float -> (B, C, size, size), bilinear as TensorFlow 1.x (align_corners
    False): output pixel i samples the input at i * H / size, with no half-pixel shift."""

    def axis(n_in: int) -> tuple[Tensor, Tensor, Tensor]:
        # float32 positions, as TF (and torch-fidelity): float64 moves pixels by ~1e-6
        position = torch.arange(size, dtype=torch.float32) * torch.tensor(n_in / size)
        low = position.long()
        high = (low + 1).clamp_max(n_in - 1)
        return low.to(x.device), high.to(x.device), (position - low).to(x.dtype).to(x.device)

    y0, y1, dy = axis(x.shape[2])
    x0, x1, dx = axis(x.shape[3])
    top = x[:, :, y0][..., x0] + (x[:, :, y0][..., x1] - x[:, :, y0][..., x0]) * dx
    bottom = x[:, :, y1][..., x0] + (x[:, :, y1][..., x1] - x[:, :, y1][..., x0]) * dx
    return top + (bottom - top) * dy.view(-1, 1)


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (TF's eps 1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:  # fmt: skip
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # TF: no padding


class InceptionA(nn.Module):  # 35x35: 1x1, 5x5, double 3x3, pool
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_pool(x))], 1)  # fmt: skip


class InceptionB(nn.Module):  # 35x35 -> 17x17
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)  # fmt: skip


class InceptionC(nn.Module):  # 17x17: factorised 7x7 convolutions
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        row, col = (
            dict(kernel_size=(1, 7), padding=(0, 3)),
            dict(kernel_size=(7, 1), padding=(3, 0)),
        )
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        double = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):  # fmt: skip
            double = layer(double)
        return torch.cat([self.branch1x1(x),
                          self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                          double, self.branch_pool(_avg_pool(x))], 1)  # fmt: skip


class InceptionD(nn.Module):  # 17x17 -> 8x8
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        seven = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            seven = layer(seven)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven,
                          F.max_pool2d(x, 3, stride=2)], 1)  # fmt: skip


class InceptionE(nn.Module):  # 8x8: split 1x3 / 3x1 branches
    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool  # the graph's last block pools with max (a TF quirk we keep)
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(single), self.branch3x3_2b(single),
                          self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
                          self.branch_pool(pooled)], 1)  # fmt: skip


class FIDInception(nn.Module):
    """uint8 images (B, 3, H, W) -> pool features (B, 2048) and logits (B, 1008)."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(POOL_FEATURES, NUM_LOGITS)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """-> (pool features, logits without the fc bias): torch-fidelity's '2048' and
        'logits_unbiased', the features of FID / precision-recall and of the Inception Score."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"FIDInception wants uint8 (B, 3, H, W) images, got "
                             f"{images.dtype} {tuple(images.shape)}")  # fmt: skip
        x = tf1_bilinear_resize(images.float(), INPUT_SIZE)  # (B, 3, 299, 299) in [0, 255]
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 64, 73, 73)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)  # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):  # fmt: skip
            x = block(x)  # ... -> (B, 768, 17, 17) -> (B, 2048, 8, 8)
        features = x.mean((2, 3))  # (B, 2048)
        return features, features @ self.fc.weight.T  # (B, 2048), (B, 1008)


def find_inception_weights(path: str | None) -> str:
    """The weights file: `path`, else either usual file name in torch hub's checkpoint cache
    (where torch-fidelity and pytorch-fid download to), else an error saying how to get it."""
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Inception weights not found at {path!r}: " + HOW_TO_GET)
        return path
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for name in WEIGHT_FILES:
        if (cache / name).is_file():
            return str(cache / name)
    raise FileNotFoundError(f"no Inception weights given and none in {cache}: " + HOW_TO_GET)


HOW_TO_GET = (
    "download https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    f"{WEIGHT_FILES[0]} (the FID network, 2015-12-05 TF weights) and pass its path as "
    f"evaluate.weights, or put it in torch hub's cache (docs/evaluation.md); or leave the "
    f"evaluate stage out of `rqpipe run` with evaluate.enabled=false"
)


def load_fid_inception(path: str | None = None) -> FIDInception:
    """The FID network with its weights (see `find_inception_weights`), in eval mode, fp32."""
    path = find_inception_weights(path)
    return load_checked(FIDInception(), read_foreign_weights(path), path,
                        "the FID Inception weights")  # fmt: skip
