"""Are the demo's class-conditional samples recognisably of their class?

A small CNN is trained on freshly drawn demo images (another seed than the dataset's, so it
has seen none of the pipeline's images), checked on a third seed's images, and then classifies
the sampled images: the score is the fraction classified as the class they were sampled for
(chance: 1 / number of classes). The classifier sees only pixels, never the pipeline's codes.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import nn

from pipeline.core.storage import Storage, join
from pipeline.demo.data import DEMO_CLASSES, demo_image
from pipeline.formats.images import center_square, to_model_tensor


def drawn_images(resolution: int, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, R, R) in [-1, 1] and (N,) labels, drawn like the demo dataset."""
    pixels, labels = [], []
    for label, shape in enumerate(DEMO_CLASSES):
        rng = np.random.default_rng([seed, 1000 + label])
        for _ in range(per_class):
            pixels.append(center_square(demo_image(shape, rng), resolution))
            labels.append(label)
    return to_model_tensor(np.stack(pixels)), torch.tensor(labels)


def shape_classifier(num_classes: int) -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.ReLU(),
                nn.MaxPool2d(2)]  # fmt: skip

    return nn.Sequential(*block(3, 16), *block(16, 32), *block(32, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))  # fmt: skip


def train_classifier(resolution: int, steps: int = 300, seed: int = 1) -> tuple[nn.Module, float]:
    """The classifier and its accuracy on held-out drawn images."""
    torch.manual_seed(seed)
    train_x, train_y = drawn_images(resolution, 256, seed)
    test_x, test_y = drawn_images(resolution, 64, seed + 1)
    model = shape_classifier(len(DEMO_CLASSES))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(len(train_x), (64,), generator=generator)
        x = train_x[batch]
        # Sampled images are VAE decodings: a little blur and noise keeps the classifier fair.
        if torch.rand(1, generator=generator).item() < 0.5:
            x = nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        x = x + 0.05 * torch.randn(x.shape, generator=generator)
        loss = nn.functional.cross_entropy(model(x), train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    return model, accuracy


def score_samples(
    storage: Storage, samples_dir: str, class_names: dict[str, int]
) -> dict[str, Any]:
    """Classify every sample PNG against the label it was sampled with; `class_names` is the
    shard stage's labels.json (class name -> the label index the pipeline used)."""
    filesystem, path = storage.arrow_fs(join(samples_dir, "codes"))
    rows = pq.read_table(path, filesystem=filesystem, columns=["key", "label"]).to_pylist()
    images = []
    for row in rows:
        data = storage.read_bytes(join(samples_dir, "images", f"{row['key']}.png"))
        with Image.open(io.BytesIO(data)) as image:
            images.append(np.asarray(image.convert("RGB")))
    x = to_model_tensor(np.stack(images))
    name_of = {index: name for name, index in class_names.items()}
    # The pipeline's label indices (sorted folder names) -> the classifier's (DEMO_CLASSES).
    labels = torch.tensor([DEMO_CLASSES.index(name_of[row["label"]]) for row in rows])
    classifier, real_accuracy = train_classifier(x.shape[-1])
    with torch.no_grad():
        predicted = classifier(x).argmax(1)
    per_class = {
        DEMO_CLASSES[c]: round((predicted[labels == c] == c).float().mean().item(), 3)
        for c in sorted(set(labels.tolist()))
    }
    return {
        "samples": len(rows),
        "accuracy": round((predicted == labels).float().mean().item(), 3),
        "per_class": per_class,
        "chance": round(1 / len(DEMO_CLASSES), 3),
        "classifier_accuracy_on_real_images": round(real_accuracy, 3),
    }
