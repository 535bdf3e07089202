"""The README's first command: the whole pipeline on the bundled demo dataset.

Generates the labelled, captioned demo images (real PNGs in class folders, listed with their
captions in RUN/demo-data.csv), starts a local Ray instance (or joins --ray-address) and runs
shard -> train-vae -> encode -> train-ar -> sample with configs/demo.yaml: a caption-conditioned
RQ-Transformer, sampled from prompts. Then it reports on what came out: the code tables' stats
(RUN/codes-stats.txt, RUN/codes-usage.png) and whether the samples show the shape and colour
their prompt asks for, for seen and unseen combinations (or, for a class model, their class:
pipeline/demo/check.py), in RUN/demo-report.json. A second run finds every stage up to date and
the report current, and rewrites nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline.core.manifest import read_manifest
from pipeline.core.storage import Storage, absolute
from pipeline.demo.data import DEMO_CLASSES, demo_listing, demo_prompts, write_demo_dataset
from pipeline.run import (
    PlannedStage,
    check_cluster,
    load_stage_configs,
    plan_pipeline,
    run_pipeline,
)


def _report(run: Path) -> dict[str, Any]:
    """Stats and the prompt (or class) check, recomputed only when codes or samples changed."""
    from pipeline.demo.check import demo_classifier, score_prompts, score_samples
    from pipeline.tools import analysis

    storage = Storage()
    upstream = {"codes": read_manifest(storage, str(run / "codes")).fingerprint,
                "samples": read_manifest(storage, str(run / "samples")).fingerprint}  # fmt: skip
    path = run / "demo-report.json"
    if path.exists():
        report = json.loads(path.read_text())
        if report.get("upstream") == upstream:
            return report
    stats = analysis.code_stats(analysis.read_codes(storage, str(run / "codes")))
    (run / "codes-stats.txt").write_text(analysis.format_stats(stats) + "\n")
    analysis.plot_usage(stats, str(run / "codes-usage.png"), storage)
    report = {
        "upstream": upstream,
        "code_perplexity_per_depth": [round(d["perplexity"], 1) for d in stats["depths"]],
    }
    classifier = None
    if (run / "demo-classifier" / "accuracy.json").exists():
        classifier = demo_classifier(storage, str(run / "demo-classifier"), 0)
    if (run / "ar" / "model" / "tokenizer.json").exists():  # a caption model
        report["prompt_check"] = score_prompts(storage, str(run / "samples"), classifier)
    else:
        labels = json.loads((run / "shards" / "labels.json").read_text())
        report["class_check"] = score_samples(storage, str(run / "samples"), labels, classifier)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _with_demo_classifier(run: Path, overrides: list[str]) -> list[str]:
    """The evaluate stage reads the demo's shape classifier's features (the "demo FID"), from
    RUN/demo-classifier, unless the overrides name other weights."""
    if any(o.startswith(("evaluate.weights=", "evaluate.features=")) for o in overrides):
        return overrides
    return [*overrides, f"evaluate.weights={run / 'demo-classifier'}"]


def _train_demo_classifier(run: Path, plan: list[PlannedStage]) -> None:
    """The demo's shape classifier, trained once into RUN/demo-classifier (when used)."""
    from pipeline.demo.check import demo_classifier

    evaluate = next((p.config for p in plan if p.stage.name == "evaluate"), None)
    if evaluate is not None and evaluate.weights == str(run / "demo-classifier"):
        image_size = next(p.config for p in plan if p.stage.name == "shard").image_size
        demo_classifier(Storage(), evaluate.weights, image_size)


def run_demo(run_dir: str, config_path: str, overrides: list[str] = (),
             overwrite: bool = False, ray_address: str | None = None) -> dict[str, Any]:  # fmt: skip
    from pipeline.core.ray_runtime import init_ray

    run_dir = absolute(run_dir)  # the stages resolve it too; the report paths need it here
    run = Path(run_dir)
    started = time.time()
    overrides = _with_demo_classifier(run, list(overrides))
    # a mistyped key is refused before the demo's data and classifier are made
    _train_demo_classifier(run, load_stage_configs(config_path, overrides))
    paths = write_demo_dataset(run / "demo-data")
    listing = demo_listing(run / "demo-data")
    print(f"demo data: {len(paths)} captioned images in {len(DEMO_CLASSES)} classes under "
          f"{run / 'demo-data'}, listed in {listing}")  # fmt: skip
    plan = plan_pipeline(config_path, overrides, str(listing))
    sample = next(p.config for p in plan if p.stage.name == "sample")
    text = next(p.config for p in plan if p.stage.name == "train-ar").conditioning == "text"
    if text and not (sample.prompts or sample.prompts_file):
        sample.prompts = demo_prompts()  # every shape in every colour, seen or not
    started_here = init_ray(ray_address)
    check_cluster(plan, started_here=started_here)  # what the stages ask of Ray fits the cluster
    records = run_pipeline(str(listing), run_dir, plan, overwrite)
    report = _report(run)
    vae_metrics = [json.loads(line) for line in (run / "vae" / "metrics.jsonl").open()]
    psnr = next((m["val_psnr"] for m in reversed(vae_metrics) if "val_psnr" in m), None)

    print(f"\ndemo finished in {time.time() - started:.0f} s")
    print(f"  RQ-VAE validation PSNR: {psnr:.2f} dB" if psnr is not None else "", end="")
    print(f"; code perplexity per depth: {report['code_perplexity_per_depth']}")
    if "prompt_check" in report:
        check = report["prompt_check"]
        for group in ("seen", "unseen"):
            if group in check:
                c = check[group]
                print(f"  prompt check, {group} shape-colour combinations ({c['samples']} "
                      f"samples): shape {c['shape']:.0%}, colour {c['colour']:.0%}, both "
                      f"{c['both']:.0%} as the prompt asked (chance {check['chance']['shape']:.0%}"
                      f" / {check['chance']['colour']:.0%})")  # fmt: skip
        print(f"  (the shape classifier scores {check['classifier_accuracy_on_real_images']:.0%}"
              f", the colour rule {check['colour_rule_accuracy_on_real_images']:.0%} on real "
              f"images)")  # fmt: skip
    else:
        check = report["class_check"]
        print(f"  class check: {check['accuracy']:.0%} of {check['samples']} samples classified "
              f"as the class they were sampled for (chance {check['chance']:.0%}; the classifier "
              f"scores {check['classifier_accuracy_on_real_images']:.0%} on real images)")  # fmt: skip
    metrics_path = run / "eval" / "metrics.json"
    if metrics_path.exists():  # the evaluate stage, on the demo classifier's features
        metrics = json.loads(metrics_path.read_text())
        vae, samples = metrics.get("vae"), metrics.get("samples")
        if vae:
            print(f"  RQ-VAE on {vae['images']} val images: demo rFID {vae['demo_rfid']:.3f}, "
                  f"PSNR by depth {' / '.join(f'{p:.1f}' for p in vae['psnr_per_depth'])} dB, "
                  f"SSIM {vae['ssim']:.3f}")  # fmt: skip
        if samples:
            pr = samples["precision_recall"]
            print(f"  samples: demo FID {samples['demo_fid']:.3f} ({samples['images']} samples "
                  f"against {samples['reference_images']} training images)"
                  + (f", precision {pr['precision']:.2f}, recall {pr['recall']:.2f}"
                     if isinstance(pr, dict) else "")
                  + "  (demo FID: the demo classifier's features, not Inception)")  # fmt: skip
    print("where to look:")
    print(f"  reconstructions: {run / 'vae' / 'reconstructions.png'}  (originals, then depth 1..4)")
    grids = sorted((run / "samples").glob("grid*.png"))
    for grid in grids[:6]:
        print(f"  samples:         {grid}")
    if len(grids) > 6:
        print(f"                   ... and {len(grids) - 6} more grids in {run / 'samples'}")
    print(f"  code stats:      {run / 'codes-stats.txt'}, {run / 'codes-usage.png'}")
    print(f"  code tables:     {run / 'codes'}  (rqpipe query {run} \"SELECT caption, count(*) "
          f"FROM codes GROUP BY caption ORDER BY 2 DESC LIMIT 5\")")  # fmt: skip
    print(f"  curves:          {run / 'vae' / 'curves.png'}, {run / 'ar' / 'curves.png'}  "
          f"(and MLflow: mlflow ui --backend-store-uri sqlite:///{run / 'mlflow' / 'mlflow.db'})")  # fmt: skip
    print(f"  evaluation:      {run / 'eval' / 'report.md'}, {run / 'eval' / 'metrics.json'}")
    kind = "prompt check" if "prompt_check" in report else "class check"
    print(f"  {kind + ':':<17}{run / 'demo-report.json'}")
    return {"stages": records, "report": report}
