"""A small image classifier, saved like every rqpipe model (safetensors + config.json).

The evaluate stage can read features from it instead of the FID Inception network
(`evaluate.features: classifier`): the demo trains one on its shapes (pipeline/demo/check.py)
and reports a "demo FID" with it, since Inception features of 32x32 drawings say little.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from model.weights.serialization import ModelConfig, Pretrained


@dataclass
class ImageClassifierConfig(ModelConfig):
    kind: ClassVar[str] = "image classifier"
    presets: ClassVar[dict[str, dict[str, Any]]] = {"small": {}}

    num_classes: int = 4
    channels: tuple[int, ...] = (16, 32, 64)  # one conv + GroupNorm + ReLU + 2x pool each

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)  # JSON gives a list


class ImageClassifier(Pretrained, nn.Module):
    """(B, 3, H, W) images in [-1, 1] -> logits (B, classes); `features` gives the pooled
    (B, channels[-1]) vector before the linear head."""

    model_type = "image-classifier"
    config_class = ImageClassifierConfig

    def __init__(self, config: ImageClassifierConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        cin = 3
        for cout in config.channels:
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.ReLU(),
                       nn.MaxPool2d(2)]  # fmt: skip
            cin = cout
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cin, config.num_classes)

    def features(self, images: Tensor) -> Tensor:
        return self.body(images).mean((2, 3))  # (B, C, h, w) -> (B, C)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 (B, 3, H, W) -> (features, logits), the evaluate stage's interface."""
        features = self.features(images.float() / 127.5 - 1.0)
        return features, self.head(features)
