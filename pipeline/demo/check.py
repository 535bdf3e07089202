"""Do the demo's samples show what they were asked for?

A small CNN is trained on freshly drawn demo images (another seed than the dataset's, so it
has seen none of the pipeline's images; every colour, the unseen combinations included),
checked on a third seed's images, and then classifies the sampled images' shapes. A sample's
colour is the palette colour nearest to the median of its bright pixels (the backgrounds are
dark). The checks see only pixels, never the pipeline's codes:
- prompts (a caption model): how often the shape, and the colour, match the prompt's, for
  combinations seen in training and for the held-out ones (`UNSEEN`);
- classes (a class model): the fraction classified as the class they were sampled for.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch import nn

from model.evaluation.classifier import ImageClassifier, ImageClassifierConfig
from pipeline.core.storage import Storage, join
from pipeline.demo.data import DEMO_CLASSES, DEMO_COLOURS, UNSEEN, demo_image
from pipeline.formats.images import center_square, to_model_tensor


def drawn_images(resolution: int, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, R, R) in [-1, 1] and (N,) labels, drawn like the demo dataset (all colours)."""
    pixels, labels = [], []
    for label, shape in enumerate(DEMO_CLASSES):
        rng = np.random.default_rng([seed, 1000 + label])
        for _ in range(per_class):
            image, _ = demo_image(shape, rng, colours=list(DEMO_COLOURS))
            pixels.append(center_square(image, resolution))
            labels.append(label)
    return to_model_tensor(np.stack(pixels)), torch.tensor(labels)


def shape_colour(pixels: np.ndarray) -> str:
    """The palette colour of a drawing's shape: nearest to the median of its bright pixels."""
    flat = pixels.reshape(-1, 3).astype(np.float32)
    bright = flat[flat.max(1) > 125]
    if len(bright) < 4:  # a sample with no clear shape: its brightest tenth
        bright = flat[np.argsort(flat.max(1))[-max(4, len(flat) // 10) :]]
    median = np.median(bright, axis=0)
    names = list(DEMO_COLOURS)
    return names[int(np.argmin([np.sum((median - DEMO_COLOURS[n]) ** 2) for n in names]))]


def prompt_attributes(prompt: str) -> tuple[str | None, str | None]:
    words = prompt.lower().replace(",", " ").split()
    shape = next((w for w in words if w in DEMO_CLASSES), None)
    return shape, next((w for w in words if w in DEMO_COLOURS), None)


def train_classifier(
    resolution: int, steps: int = 300, seed: int = 1
) -> tuple[ImageClassifier, float]:
    """The classifier and its accuracy on held-out drawn images."""
    torch.manual_seed(seed)
    train_x, train_y = drawn_images(resolution, 256, seed)
    test_x, test_y = drawn_images(resolution, 64, seed + 1)
    model = ImageClassifier(ImageClassifierConfig(num_classes=len(DEMO_CLASSES)))
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


def _sample_pixels(storage: Storage, samples_dir: str, columns: list[str]):
    filesystem, path = storage.arrow_fs(join(samples_dir, "codes"))
    rows = pq.read_table(path, filesystem=filesystem, columns=columns).to_pylist()
    images = []
    for row in rows:
        data = storage.read_bytes(join(samples_dir, "images", f"{row['key']}.png"))
        with Image.open(io.BytesIO(data)) as image:
            images.append(np.asarray(image.convert("RGB")))
    return rows, np.stack(images)


def demo_classifier(
    storage: Storage, folder: str, resolution: int
) -> tuple[ImageClassifier, float]:
    """The demo's shape classifier, trained once and kept in `folder` (the evaluate stage reads
    its features for the demo FID), with its accuracy on held-out drawings."""
    if storage.exists(join(folder, "accuracy.json")):
        accuracy = json.loads(storage.read_bytes(join(folder, "accuracy.json")))["accuracy"]
        return ImageClassifier.from_pretrained(folder), accuracy
    classifier, accuracy = train_classifier(resolution)
    classifier.save_pretrained(folder)
    storage.write_bytes(join(folder, "accuracy.json"), json.dumps({"accuracy": accuracy}).encode())
    return classifier, accuracy


def score_prompts(storage: Storage, samples_dir: str,
                  classifier: tuple[ImageClassifier, float] | None = None) -> dict[str, Any]:  # fmt: skip
    """Shape and colour agreement of a caption model's samples with their prompts, for seen
    and unseen (held-out) shape-colour combinations. `classifier`: (model, accuracy) of
    `demo_classifier`, else one is trained."""
    rows, pixels = _sample_pixels(storage, samples_dir, ["key", "caption"])
    classifier, real_accuracy = classifier or train_classifier(pixels.shape[1])
    with torch.no_grad():
        shapes = classifier(to_model_tensor(pixels)).argmax(1).tolist()
    rng = np.random.default_rng(7)  # the colour rule on real drawings, as a yardstick
    drawn = [demo_image(DEMO_CLASSES[i % 4], rng, colours=list(DEMO_COLOURS)) for i in range(200)]
    colour_accuracy = np.mean([shape_colour(np.asarray(im)) in cap for im, cap in drawn])
    groups: dict[str, list[tuple[bool, bool]]] = {"seen": [], "unseen": []}
    for row, shape_index, image in zip(rows, shapes, pixels, strict=True):
        shape, colour = prompt_attributes(row["caption"] or "")
        group = "unseen" if (shape, colour) in UNSEEN else "seen"
        groups[group].append((DEMO_CLASSES[shape_index] == shape, shape_colour(image) == colour))
    report = {}
    for group, hits in groups.items():
        if hits:
            report[group] = {"samples": len(hits),
                             "shape": round(float(np.mean([s for s, _ in hits])), 3),
                             "colour": round(float(np.mean([c for _, c in hits])), 3),
                             "both": round(float(np.mean([s and c for s, c in hits])), 3)}  # fmt: skip
    return {**report, "samples": len(rows),
            "chance": {"shape": round(1 / len(DEMO_CLASSES), 3),
                       "colour": round(1 / len(DEMO_COLOURS), 3)},
            "classifier_accuracy_on_real_images": round(real_accuracy, 3),
            "colour_rule_accuracy_on_real_images": round(float(colour_accuracy), 3)}  # fmt: skip


def score_samples(storage: Storage, samples_dir: str, class_names: dict[str, int],
                  classifier: tuple[ImageClassifier, float] | None = None) -> dict[str, Any]:  # fmt: skip
    """Classify every sample PNG against the label it was sampled with; `class_names` is the
    shard stage's labels.json (class name -> the label index the pipeline used)."""
    rows, pixels = _sample_pixels(storage, samples_dir, ["key", "label"])
    x = to_model_tensor(pixels)
    name_of = {index: name for name, index in class_names.items()}
    # The pipeline's label indices (sorted folder names) -> the classifier's (DEMO_CLASSES).
    labels = torch.tensor([DEMO_CLASSES.index(name_of[row["label"]]) for row in rows])
    classifier, real_accuracy = classifier or train_classifier(x.shape[-1])
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
