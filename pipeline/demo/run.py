"""The README's first command: the whole pipeline on the bundled demo dataset.

Generates the labelled demo images (real PNGs in class folders) under RUN/demo-data/, starts
a local Ray instance (or joins --ray-address) and runs shard -> train-vae -> encode -> train-ar
-> sample with configs/demo.yaml. Then it reports on what came out: the code tables' stats
(RUN/codes-stats.txt, RUN/codes-usage.png) and whether the class-conditional samples look like
their class (pipeline/demo_check.py), in RUN/demo-report.json. A second run finds every stage
up to date and the report current, and rewrites nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline.core.manifest import read_manifest
from pipeline.core.storage import Storage, absolute
from pipeline.demo.data import DEMO_CLASSES, write_demo_dataset
from pipeline.run import plan_pipeline, run_pipeline


def _report(run: Path) -> dict[str, Any]:
    """Stats and the class check, recomputed only when the codes or samples changed."""
    from pipeline.demo.check import score_samples
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
        "class_check": score_samples(
            storage, str(run / "samples"), json.loads((run / "shards" / "labels.json").read_text())
        ),
    }
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def run_demo(run_dir: str, config_path: str, overrides: list[str] = (),
             overwrite: bool = False, ray_address: str | None = None) -> dict[str, Any]:  # fmt: skip
    from pipeline.core.ray_runtime import init_ray

    run_dir = absolute(run_dir)  # the stages resolve it too; the report paths need it here
    run = Path(run_dir)
    started = time.time()
    plan = plan_pipeline(config_path, overrides)
    paths = write_demo_dataset(run / "demo-data")
    print(f"demo data: {len(paths)} images in {len(DEMO_CLASSES)} classes under "
          f"{run / 'demo-data'}")  # fmt: skip
    init_ray(ray_address)
    records = run_pipeline(str(run / "demo-data"), run_dir, plan, overwrite)
    report = _report(run)
    check = report["class_check"]
    vae_metrics = [json.loads(line) for line in (run / "vae" / "metrics.jsonl").open()]
    psnr = next((m["val_psnr"] for m in reversed(vae_metrics) if "val_psnr" in m), None)

    print(f"\ndemo finished in {time.time() - started:.0f} s")
    print(f"  RQ-VAE validation PSNR: {psnr:.2f} dB" if psnr is not None else "", end="")
    print(f"; code perplexity per depth: {report['code_perplexity_per_depth']}")
    print(f"  class check: {check['accuracy']:.0%} of {check['samples']} samples classified as "
          f"the class they were sampled for (chance {check['chance']:.0%}; the classifier "
          f"scores {check['classifier_accuracy_on_real_images']:.0%} on real images)")  # fmt: skip
    print("where to look:")
    print(f"  reconstructions: {run / 'vae' / 'reconstructions.png'}  (originals, then depth 1..4)")
    for grid in sorted((run / "samples").glob("grid-*.png")):
        print(f"  samples:         {grid}")
    print(f"  code stats:      {run / 'codes-stats.txt'}, {run / 'codes-usage.png'}")
    print(f"  code tables:     {run / 'codes'}  (rqpipe query {run} \"SELECT label, count(*) "
          f"FROM codes GROUP BY label\")")  # fmt: skip
    print(f"  curves:          {run / 'vae' / 'curves.png'}, {run / 'ar' / 'curves.png'}  "
          f"(and MLflow: mlflow ui --backend-store-uri sqlite:///{run / 'mlflow' / 'mlflow.db'})")  # fmt: skip
    print(f"  report:          {run / 'demo-report.json'}")
    return {"stages": records, "report": report}
