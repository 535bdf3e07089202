"""The evaluate stage's reduction: unit files -> metrics.json, report.md, plots.

Every figure is written beside the number of images it was computed on. With the classifier
features (`features: classifier`, the demo) the Fréchet distances are named `demo_fid` /
`demo_rfid` and the report says "demo FID": they are not comparable with Inception FID.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from model.evaluation.metrics import FeatureMoments, frechet_distance, precision_recall
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


# A unit's sums add up; its samples and class rows stack (features.py says what each holds).
STACKED = ("sample", "class_labels", "class_features")
FAN_IN = 32  # units (or partial sums) merged by one task, and by the driver at the end


def _merge(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    merged: dict[str, np.ndarray] = {}
    for part in parts:
        for key, value in part.items():
            if key not in merged:
                merged[key] = value
            elif key in STACKED:
                merged[key] = np.concatenate([merged[key], value])
            else:
                merged[key] = merged[key] + value
    return merged


def _merge_units(storage: Storage, units_dir: str,
                 items: list[Any]) -> dict[str, np.ndarray]:  # fmt: skip
    """Unit names (read from storage, one at a time) or partial sums, merged."""
    merged: dict[str, np.ndarray] = {}
    for item in items:
        part = read_unit(storage, units_dir, item) if isinstance(item, str) else item
        merged = _merge([merged, part])
    return merged


def reduce_units(storage: Storage, units_dir: str, names: list[str]) -> dict[str, np.ndarray]:
    """The merged sums of `names`, summed by Ray tasks FAN_IN at a time (and their partials by
    more, level by level), so the driver reads at most FAN_IN partial sums, never a unit's
    features: a 2048-d Inception unit's sums are 32 MB, whatever its number of images."""
    import ray

    if not names:
        return {}
    merge = ray.remote(_merge_units).options(num_cpus=0.5)
    items: list[Any] = list(names)
    while len(items) > FAN_IN:
        items = [merge.remote(storage, units_dir, items[i : i + FAN_IN])
                 for i in range(0, len(items), FAN_IN)]  # fmt: skip
    merged: dict[str, np.ndarray] = {}
    for item in items:  # one partial at a time: the driver holds two sums at most
        merged = _merge([merged, ray.get(item) if not isinstance(item, str)
                         else read_unit(storage, units_dir, item)])  # fmt: skip
    return merged


def moments(sums: dict[str, np.ndarray], prefix: str = "") -> FeatureMoments:
    return FeatureMoments(int(sums[f"{prefix}count"]), sums[f"{prefix}feature_sum"],
                          sums[f"{prefix}feature_outer"])  # fmt: skip


def reference_statistics(storage: Storage, eval_dir: str, reference: str,
                         sums: dict[str, np.ndarray]) -> dict[str, Any]:  # fmt: skip
    """The reference's mean and covariance (saved to RUN/eval/reference.npz), its
    precision/recall sample and per-class moments: from the reference split's merged sums,
    or the user's .npz (mean and covariance only)."""
    if sums:
        mu, sigma = moments(sums).mean_cov()
        buffer = io.BytesIO()
        np.savez(buffer, mu=mu, sigma=sigma, count=np.array(int(sums["count"])))
        storage.write_bytes(join(eval_dir, "reference.npz"), buffer.getvalue())
        by_class = {int(c): FeatureMoments.of(sums["class_features"][sums["class_labels"] == c])
                    for c in np.unique(sums["class_labels"])}  # fmt: skip
        return {"mu": mu, "sigma": sigma, "count": int(sums["count"]),
                "features": sums["sample"], "classes": by_class,
                "source": f"the {reference} split"}  # fmt: skip
    with np.load(io.BytesIO(storage.read_bytes(reference)), allow_pickle=False) as data:
        if "mu" not in data.files or "sigma" not in data.files:
            raise ValueError(f"evaluate.reference {reference}: the file has no mu and sigma "
                             f"arrays (it has {data.files})")  # fmt: skip
        mu, sigma = data["mu"], data["sigma"]
        count = int(data["count"]) if "count" in data.files else None
    return {"mu": mu, "sigma": sigma, "count": count, "features": None, "classes": {},
            "source": reference}  # fmt: skip


def reconstruction_metrics(sums: dict[str, np.ndarray], names: dict[str, str]) -> dict[str, Any]:
    """rFID, PSNR (and per depth), SSIM, LPIPS of the val split's merged sums."""
    count = int(sums["recon_count"])
    lpips = float(sums["lpips_sum"]) / count
    return {"images": count,
            names["rfid"]: frechet_distance(*moments(sums).mean_cov(),
                                            *moments(sums, "recon_").mean_cov(),
                                            counts=(int(sums["count"]), count)),
            "psnr": float(sums["psnr_depth_sum"][-1]) / count,
            "psnr_per_depth": [round(float(v) / count, 3) for v in sums["psnr_depth_sum"]],
            "ssim": float(sums["ssim_sum"]) / count,
            "lpips": None if np.isnan(lpips) else lpips}  # fmt: skip


def sample_metrics(sums: dict[str, np.ndarray], reference: dict[str, Any],
                   names: dict[str, str], k: int) -> dict[str, Any]:  # fmt: skip
    """FID, IS, precision/recall (on the seeded samples: equal sets of each side's smaller
    size), CLIP score and FID per class of the samples' merged sums."""
    from model.evaluation.metrics import InceptionScoreSums

    count = int(sums["count"])
    if count < 2:
        raise ValueError(f"evaluate: {count} sample(s); a Fréchet distance needs at "
                         f"least 2 (raise sample.num_samples, or evaluate.samples=false)")  # fmt: skip
    mean, std = InceptionScoreSums(sums["is_count"], sums["is_p_sum"],
                                   sums["is_plogp_sum"]).score()  # fmt: skip
    report: dict[str, Any] = {
        "images": count,
        "reference_images": reference["count"],
        names["fid"]: frechet_distance(*moments(sums).mean_cov(), reference["mu"],
                                       reference["sigma"], counts=(count, reference["count"])),
        names["is"]: {"mean": mean, "std": std, "splits": len(sums["is_count"])},
    }  # fmt: skip
    real, fake = reference["features"], sums["sample"]
    if real is None:
        report["precision_recall"] = "not computed: the reference file holds no features"
    elif min(len(fake), len(real)) <= k:
        report["precision_recall"] = f"not computed: k={k} needs more than {k} images a side"
    else:
        size = min(len(real), len(fake))  # equal sets (Kynkäänniemi et al.)
        rng = np.random.default_rng(0)
        real = real[np.sort(rng.choice(len(real), size, replace=False))]
        fake = fake[np.sort(rng.choice(len(fake), size, replace=False))]
        precision, recall = precision_recall(real, fake, k)
        report["precision_recall"] = {"precision": precision, "recall": recall, "k": k,
                                      "images": size, "reference_images": size}  # fmt: skip
    if "clip_count" in sums:
        clip_count = int(sums["clip_count"])
        report["clip_score"] = ({"mean": float(sums["clip_sum"]) / clip_count,
                                 "images": clip_count} if clip_count
                                else "not computed: no sample has a prompt")  # fmt: skip
    fid, labels = names["fid"], sums["class_labels"]
    per_class_report = {}
    for c, class_moments in sorted(reference["classes"].items()):
        mine = sums["class_features"][labels == c]
        if len(mine) >= 2 and class_moments.count >= 2:
            per_class_report[str(c)] = {
                fid: frechet_distance(*FeatureMoments.of(mine).mean_cov(),
                                      *class_moments.mean_cov(),
                                      counts=(len(mine), class_moments.count)),
                "images": len(mine), "reference_images": class_moments.count}  # fmt: skip
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
            lines += [f"| precision (k={pr['k']}) | {pr['precision']:.3f} | {pr['images']} "
                      f"vs {pr['reference_images']} (seeded samples) |",
                      f"| recall (k={pr['k']}) | {pr['recall']:.3f} | {pr['images']} vs "
                      f"{pr['reference_images']} (seeded samples) |"]  # fmt: skip
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
