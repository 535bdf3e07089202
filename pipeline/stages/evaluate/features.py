"""The evaluate stage's work units: the feature sums (and reconstruction metrics) of one shard
or one sample chunk, computed by a Ray actor that loads its networks once.

An actor reduces what it sees to sums, so no feature vector but a bounded sample ever leaves
it: the driver merges sums (report.py). A unit is `units/{name}.npz` (arrays only: read back
with allow_pickle=False) followed by `units/{name}.json` (rows and the stage fingerprint), the
marker a resumed run trusts:
- every unit: `count`, `feature_sum` (F,) and `feature_outer` (F, F) in float64, the moments
  its images' features add to a Fréchet distance; `sample` (k, F), a seeded sample of k of its
  features for precision/recall (k: its share of `evaluate.pr_sample`); `class_labels`,
  `class_features`: the rows of the classes per-class FID is computed for;
- a val shard with reconstructions: `recon_count`, `recon_feature_sum`, `recon_feature_outer`
  of the reconstructions, and the sums `psnr_depth_sum` (D,) (PSNR from the first d codes),
  `ssim_sum`, `lpips_sum` (NaN without LPIPS weights);
- a sample chunk: `is_count`, `is_p_sum`, `is_plogp_sum`, the Inception Score's per-split
  sums (`InceptionScoreSums`), and with a CLIP folder `clip_sum`, `clip_count`.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipeline.core.devices import usable_device
from pipeline.core.storage import Storage, StorageConfig, join


def extractor_identity(storage: Storage, kind: str, weights: str | None) -> str:
    """What identifies the feature network: its kind and the hash of its weights."""
    if kind == "inception":
        from model.evaluation.inception import find_inception_weights

        with open(find_inception_weights(weights), "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()[:32]
    else:
        digest = hashlib.sha256(storage.read_bytes(join(weights, "model.safetensors"))).hexdigest()
    return f"{kind}:{digest[:32]}"


def load_extractor(storage: Storage, kind: str, weights: str | None, device: str):
    """uint8 (B, 3, H, W) -> (features (B, F), logits (B, L)), float32 on the CPU."""
    import torch

    if kind == "inception":
        from model.evaluation.inception import load_fid_inception

        network = load_fid_inception(weights).to(device)
        run = network
    else:
        from model.evaluation.classifier import ImageClassifier

        network = ImageClassifier.from_pretrained(weights, storage_options=storage.options(weights))
        network.to(device)
        run = network.features_and_logits

    def extract(images: Any) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            features, logits = run(images.to(device))
        return features.float().cpu().numpy(), logits.float().cpu().numpy()

    return extract


@dataclass
class UnitPlan:
    """What one unit keeps beyond its sums: `sample_rows` features for precision/recall,
    the rows of `classes`; for a sample chunk its first index among `total` samples, for the
    Inception Score's `splits`."""

    sample_rows: int
    classes: list[int]
    first: int = 0
    total: int = 0
    splits: int = 1


def feature_sums(name: str, features: np.ndarray, labels: np.ndarray,
                 plan: UnitPlan) -> dict[str, np.ndarray]:  # fmt: skip
    """A unit's moments, its seeded feature sample and its rows of the planned classes."""
    x = np.asarray(features, np.float64)
    rng = np.random.default_rng(
        int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    )
    keep = np.sort(rng.choice(len(x), min(plan.sample_rows, len(x)), replace=False))
    in_classes = np.isin(labels, plan.classes)
    return {"count": np.array(len(x)), "feature_sum": x.sum(0), "feature_outer": x.T @ x,
            "sample": np.asarray(features[keep], np.float32),
            "class_labels": labels[in_classes],
            "class_features": np.asarray(features[in_classes], np.float32)}  # fmt: skip


def write_unit(storage: Storage, units_dir: str, name: str, arrays: dict[str, np.ndarray],
               fingerprint: str) -> dict[str, Any]:  # fmt: skip
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    storage.write_bytes(join(units_dir, f"{name}.npz"), buffer.getvalue())
    done = {"name": name, "rows": int(arrays["count"]), "fingerprint": fingerprint}
    storage.write_bytes(join(units_dir, f"{name}.json"), json.dumps(done).encode())
    return done


def read_unit(storage: Storage, units_dir: str, name: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(storage.read_bytes(join(units_dir, f"{name}.npz"))),
                 allow_pickle=False) as data:  # fmt: skip
        return {key: data[key] for key in data.files}


def _labels(values: list[Any]) -> np.ndarray:
    return np.array([-1 if v is None else int(v) for v in values], np.int64)


class FeatureWorker:
    """Ray actor: the feature network, and for reconstructions the RQ-VAE (and LPIPS)."""

    def __init__(self, kind: str, weights: str | None, vae_uri: str | None,
                 lpips_weights: str | None, storage_config: StorageConfig,
                 use_gpu: bool, batch_size: int, clip: str | None = None) -> None:  # fmt: skip

        self.storage = Storage(storage_config)
        self.device = str(usable_device("cuda" if use_gpu else "cpu"))
        self.extract = load_extractor(self.storage, kind, weights, self.device)
        self.batch_size = batch_size
        self.vae = self.lpips = self.clip = None
        if clip is not None:
            from model.evaluation.clip import load_clip

            model, tokenizer = load_clip(clip)
            self.clip = (model.to(self.device), tokenizer)
        if vae_uri is not None:
            from model.rqvae import RQVAE

            options = self.storage.options(vae_uri)
            self.vae = RQVAE.from_pretrained(vae_uri, storage_options=options).to(self.device)
        if lpips_weights:
            from model.losses import PerceptualLoss

            self.lpips = PerceptualLoss(lpips_weights).to(self.device)

    def _features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, R, R, 3) uint8 -> features, logits, in batches."""
        import torch

        features, logits = [], []
        for start in range(0, len(images), self.batch_size):
            # a copy: shard images come read-only from Ray's object store
            batch = torch.tensor(images[start : start + self.batch_size]).permute(0, 3, 1, 2)
            f, l = self.extract(batch)  # noqa: E741
            features.append(f)
            logits.append(l)
        return np.concatenate(features), np.concatenate(logits)

    def _reconstruct(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Reconstructions of (N, R, R, 3) uint8 images: uint8 images and their metrics."""
        import torch

        from model.evaluation.metrics import ssim_per_image
        from model.training import psnr_per_image

        depth = self.vae.config.code_shape[-1]
        out: dict[str, list[np.ndarray]] = {"images": [], "psnr_depth": [], "ssim": [], "lpips": []}
        for start in range(0, len(images), self.batch_size):
            x = torch.tensor(images[start : start + self.batch_size], device=self.device)
            x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, R, R) in [-1, 1]
            with torch.no_grad():
                codes = self.vae.encode(x)  # (B, h, w, D)
                recons = [self.vae.decode_codes(codes, d).clamp(-1, 1) for d in range(1, depth + 1)]
                recon = recons[-1]
                out["psnr_depth"].append(
                    torch.stack([psnr_per_image(r, x) for r in recons], 1).cpu().numpy()
                )  # (B, D)
                out["ssim"].append(ssim_per_image(recon, x).cpu().numpy())
                lpips = (self.lpips.per_image(recon, x) if self.lpips is not None
                         else torch.full((len(x),), float("nan")))  # fmt: skip
                out["lpips"].append(lpips.cpu().numpy())
            pixels = ((recon + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            out["images"].append(pixels.permute(0, 2, 3, 1).cpu().numpy())  # as a saved PNG
        return {k: np.concatenate(v) for k, v in out.items()}

    def shard_unit(self, name: str, decoded: dict[str, Any], units_dir: str,
                   with_recon: bool, fingerprint: str, plan: UnitPlan) -> dict[str, Any]:  # fmt: skip
        images = decoded["images"]
        features, _ = self._features(images)
        arrays = feature_sums(name, features, _labels(decoded["labels"]), plan)
        if with_recon:
            recon = self._reconstruct(images)
            recon_features, _ = self._features(recon.pop("images"))
            x = np.asarray(recon_features, np.float64)
            arrays.update({"recon_count": np.array(len(x)), "recon_feature_sum": x.sum(0),
                           "recon_feature_outer": x.T @ x,
                           "psnr_depth_sum": recon["psnr_depth"].astype(np.float64).sum(0),
                           "ssim_sum": np.array(recon["ssim"].astype(np.float64).sum()),
                           "lpips_sum": np.array(recon["lpips"].astype(np.float64).sum())})  # fmt: skip
        return write_unit(self.storage, units_dir, name, arrays, fingerprint)

    def sample_unit(self, name: str, samples_dir: str, table: str, units_dir: str,
                    fingerprint: str, plan: UnitPlan) -> dict[str, Any]:  # fmt: skip
        import pyarrow.parquet as pq

        from model.evaluation.metrics import InceptionScoreSums

        filesystem, path = self.storage.arrow_fs(join(samples_dir, "codes", table))
        columns = ["key", "label", "caption"]
        rows = pq.read_table(path, filesystem=filesystem, columns=columns).to_pylist()
        images = []
        for row in rows:
            data = self.storage.read_bytes(join(samples_dir, "images", f"{row['key']}.png"))
            with Image.open(io.BytesIO(data)) as image:
                images.append(np.asarray(image.convert("RGB")))
        features, logits = self._features(np.stack(images))
        arrays = feature_sums(name, features, _labels([r["label"] for r in rows]), plan)
        score = InceptionScoreSums.of(logits, plan.first, plan.total, plan.splits)
        arrays.update({"is_count": score.count, "is_p_sum": score.p_sum,
                       "is_plogp_sum": score.plogp_sum})  # fmt: skip
        if self.clip is not None:
            clip = self._clip(images, [r["caption"] for r in rows])
            clip = clip[~np.isnan(clip)].astype(np.float64)
            arrays.update({"clip_sum": np.array(clip.sum()), "clip_count": np.array(len(clip))})
        return write_unit(self.storage, units_dir, name, arrays, fingerprint)

    def _clip(self, images: list[np.ndarray], captions: list[str | None]) -> np.ndarray:
        """(N,) CLIP similarity of each image with its caption; NaN where there is none."""
        from model.evaluation.clip import clip_similarities

        scores = np.full(len(images), np.nan, np.float32)
        with_caption = [i for i, c in enumerate(captions) if c]
        for start in range(0, len(with_caption), self.batch_size):
            batch = with_caption[start : start + self.batch_size]
            similarity = clip_similarities(*self.clip, [Image.fromarray(images[i]) for i in batch],
                                           [captions[i] for i in batch], self.device)  # fmt: skip
            scores[batch] = similarity.cpu().numpy()
        return scores
