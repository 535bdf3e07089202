"""The evaluate stage's reduction: unit files -> metrics.json, report.md, plots.

Every figure is written beside the number of images it was computed on. With the classifier
features (`features: classifier`, the demo) the Fréchet distances are named `demo_fid` /
`demo_rfid` and the report says "demo FID": they are not comparable with Inception FID.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from model.evaluation.metrics import (
    FeatureMoments,
    frechet_distance,
    inception_score,
    precision_recall,
)
from pipeline.core.storage import Storage, join
from pipeline.stages.evaluate.features import read_unit


def metric_names(kind: str) -> dict[str, str]:
    """metrics.json keys and the names printed for them."""
    if kind == "inception":
        return {"fid": "fid", "rfid": "rfid", "is": "inception_score", "label": "FID",
                "FID": "FID", "rFID": "rFID", "IS": "IS"}  # fmt: skip
    return {"fid": "demo_fid", "rfid": "demo_rfid", "is": "classifier_score",
            "label": "demo FID (classifier features, not Inception)",
            "FID": "demo FID", "rFID": "demo rFID", "IS": "classifier score"}  # fmt: skip


def _evenly(features: np.ndarray, count: int) -> np.ndarray:
    """`count` rows spread over `features` (deterministic)."""
    if len(features) <= count:
        return features
    return features[np.linspace(0, len(features) - 1, count).round().astype(int)]


def reference_statistics(storage: Storage, eval_dir: str, reference: str,
                         reference_units: list[str], keep: int,
                         classes: list[int]) -> dict[str, Any]:  # fmt: skip
    """The reference's mean and covariance, from the split's units (streamed: saved to
    RUN/eval/reference.npz) or from the user's .npz; with units also up to `keep` feature
    rows for precision/recall (the same share of every unit) and per-class moments of
    `classes`."""
    if reference_units:
        moments, kept = None, []
        by_class: dict[int, FeatureMoments] = {}
        share = -(-keep // len(reference_units))  # rows kept per unit
        for name in reference_units:
            unit = read_unit(storage, join(eval_dir, "units"), name)
            features, labels = unit["features"], unit["labels"]
            part = FeatureMoments.of(features)
            moments = part if moments is None else moments + part
            kept.append(_evenly(features, share))
            for c in classes:
                if (labels == c).any():
                    class_part = FeatureMoments.of(features[labels == c])
                    by_class[c] = by_class[c] + class_part if c in by_class else class_part
        mu, sigma = moments.mean_cov()
        buffer = io.BytesIO()
        np.savez(buffer, mu=mu, sigma=sigma, count=np.array(moments.count))
        storage.write_bytes(join(eval_dir, "reference.npz"), buffer.getvalue())
        return {"mu": mu, "sigma": sigma, "count": moments.count,
                "features": _evenly(np.concatenate(kept), keep), "classes": by_class,
                "source": f"the {reference} split"}  # fmt: skip
    with np.load(io.BytesIO(storage.read_bytes(reference)), allow_pickle=False) as data:
        if "mu" not in data.files or "sigma" not in data.files:
            raise ValueError(f"evaluate.reference {reference}: the file has no mu and sigma "
                             f"arrays (it has {data.files})")  # fmt: skip
        mu, sigma = data["mu"], data["sigma"]
        count = int(data["count"]) if "count" in data.files else None
    return {"mu": mu, "sigma": sigma, "count": count, "features": None, "classes": {},
            "source": reference}  # fmt: skip


def reconstruction_metrics(storage: Storage, eval_dir: str, val_units: list[str],
                           names: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    units = [read_unit(storage, join(eval_dir, "units"), n) for n in val_units]
    real = np.concatenate([u["features"] for u in units])
    recon = np.concatenate([u["recon_features"] for u in units])
    psnr_depth = np.concatenate([u["psnr_depth"] for u in units])  # (N, D)
    lpips = np.concatenate([u["lpips"] for u in units])
    report = {"images": len(real),
              names["rfid"]: frechet_distance(*FeatureMoments.of(real).mean_cov(),
                                              *FeatureMoments.of(recon).mean_cov(),
                                              counts=(len(real), len(recon))),
              "psnr": float(psnr_depth[:, -1].mean()),
              "psnr_per_depth": [round(float(v), 3) for v in psnr_depth.mean(0)],
              "ssim": float(np.concatenate([u["ssim"] for u in units]).mean()),
              "lpips": None if np.isnan(lpips).all() else float(lpips.mean())}  # fmt: skip
    return report


def sample_labels(storage: Storage, eval_dir: str, sample_units: list[str]) -> np.ndarray:
    return np.concatenate([read_unit(storage, join(eval_dir, "units"), n)["labels"]
                           for n in sample_units])  # fmt: skip


def sample_metrics(storage: Storage, eval_dir: str, sample_units: list[str],
                   reference: dict[str, Any], names: dict[str, str], k: int,
                   splits: int) -> dict[str, Any]:  # fmt: skip
    units = [read_unit(storage, join(eval_dir, "units"), n) for n in sample_units]
    features = np.concatenate([u["features"] for u in units])  # (N, F)
    if len(features) < 2:
        raise ValueError(f"evaluate: {len(features)} sample(s); a Fréchet distance needs at "
                         f"least 2 (raise sample.num_samples, or evaluate.samples=false)")  # fmt: skip
    labels = np.concatenate([u["labels"] for u in units])
    mean, std = inception_score(np.concatenate([u["logits"] for u in units]), splits)
    report: dict[str, Any] = {
        "images": len(features),
        "reference_images": reference["count"],
        names["fid"]: frechet_distance(*FeatureMoments.of(features).mean_cov(),
                                       reference["mu"], reference["sigma"],
                                       counts=(len(features), reference["count"])),
        names["is"]: {"mean": mean, "std": std, "splits": min(splits, len(features))},
    }  # fmt: skip
    if reference["features"] is None:
        report["precision_recall"] = "not computed: the reference file holds no features"
    elif min(len(features), len(reference["features"])) <= k:
        report["precision_recall"] = f"not computed: k={k} needs more than {k} images a side"
    else:
        real = reference["features"]
        precision, recall = precision_recall(real, features, k)
        report["precision_recall"] = {"precision": precision, "recall": recall, "k": k,
                                      "reference_images": len(real)}  # fmt: skip
    if "clip" in units[0]:
        clip = np.concatenate([u["clip"] for u in units])
        clip = clip[~np.isnan(clip)]
        report["clip_score"] = ({"mean": float(clip.mean()), "images": len(clip)} if len(clip)
                                else "not computed: no sample has a prompt")  # fmt: skip
    fid = names["fid"]
    per_class_report = {}
    for c, class_moments in sorted(reference["classes"].items()):
        if (labels == c).sum() >= 2 and class_moments.count >= 2:
            per_class_report[str(c)] = {
                fid: frechet_distance(*FeatureMoments.of(features[labels == c]).mean_cov(),
                                      *class_moments.mean_cov(),
                                      counts=(int((labels == c).sum()), class_moments.count)),
                "images": int((labels == c).sum()), "reference_images": class_moments.count}  # fmt: skip
    if per_class_report:
        report[f"{fid}_per_class"] = per_class_report
    return report


def write_report(storage: Storage, eval_dir: str, metrics: dict[str, Any]) -> list[str]:
    """report.md and the plots; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = metric_names(metrics["features"]["kind"])
    lines = [f"# Evaluation of {metrics['run_dir']}", "",
             f"Features: {metrics['features']['kind']} ({metrics['features']['identity']}); "
             f"Fréchet distances below are **{names['label']}**.",
             f"Reference: {metrics['reference']['source']} "
             f"({metrics['reference']['images'] or 'unknown number of'} images).", ""]  # fmt: skip
    written = ["report.md"]
    vae = metrics.get("vae")
    if vae:
        lpips = "— (no lpips_weights)" if vae["lpips"] is None else f"{vae['lpips']:.4f}"
        lines += ["## RQ-VAE on the val split", "", "| metric | value | images |", "|---|---:|---:|",
                  f"| {names['rFID']} | {vae[names['rfid']]:.3f} | {vae['images']} |",
                  f"| PSNR (dB) | {vae['psnr']:.2f} | {vae['images']} |",
                  f"| SSIM | {vae['ssim']:.4f} | {vae['images']} |",
                  f"| LPIPS | {lpips} | {vae['images']} |", "",
                  "PSNR from the first d codes: " + ", ".join(
                      f"d={d} {p:.2f} dB" for d, p in enumerate(vae["psnr_per_depth"], 1)),
                  "", "![PSNR per depth](psnr-per-depth.png)", ""]  # fmt: skip
        figure, axis = plt.subplots(figsize=(4.5, 3.2))
        depths = range(1, len(vae["psnr_per_depth"]) + 1)
        axis.plot(depths, vae["psnr_per_depth"], "o-")
        axis.set(xlabel="codes used (depth d)", ylabel="val PSNR (dB)", xticks=list(depths),
                 title=f"RQ-VAE reconstructions ({vae['images']} val images)")  # fmt: skip
        written.append(_save(storage, eval_dir, "psnr-per-depth.png", figure))
    samples = metrics.get("samples")
    if samples:
        score = samples[names["is"]]
        lines += ["## Samples", "", "| metric | value | images |", "|---|---:|---:|",
                  f"| {names['FID']} | {samples[names['fid']]:.3f} | {samples['images']} "
                  f"(reference {samples['reference_images']}) |",
                  f"| {names['IS']} | {score['mean']:.3f} ± {score['std']:.3f} | "
                  f"{samples['images']} ({score['splits']} splits) |"]  # fmt: skip
        pr = samples["precision_recall"]
        if isinstance(pr, dict):
            lines += [f"| precision (k={pr['k']}) | {pr['precision']:.3f} | {samples['images']} "
                      f"vs {pr['reference_images']} |",
                      f"| recall (k={pr['k']}) | {pr['recall']:.3f} | {samples['images']} vs "
                      f"{pr['reference_images']} |"]  # fmt: skip
        if isinstance(samples.get("clip_score"), dict):
            clip = samples["clip_score"]
            lines.append(f"| CLIP score | {clip['mean']:.4f} | {clip['images']} (with a prompt) |")
        per_class = samples.get(f"{names['fid']}_per_class")
        if per_class:
            lines += ["", f"{names['FID']} per class (few images per class bias it upwards):", "",
                      "| class | value | images | reference |", "|---|---:|---:|---:|"]  # fmt: skip
            lines += [f"| {c} | {v[names['fid']]:.3f} | {v['images']} | {v['reference_images']} |"
                      for c, v in per_class.items()]  # fmt: skip
        if samples["images"] < 50_000 and metrics["features"]["kind"] == "inception":
            lines += ["", f"{samples['images']:,} samples: the paper's protocol uses 50,000; "
                      "FID falls as the sample count grows, so compare like with like."]  # fmt: skip
    storage.write_bytes(join(eval_dir, "report.md"), ("\n".join(lines) + "\n").encode())
    return written


def _save(storage: Storage, eval_dir: str, name: str, figure: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    storage.write_bytes(join(eval_dir, name), buffer.getvalue())
    return name
