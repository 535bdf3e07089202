"""The demo's figures under other settings: each variant is `rqpipe demo` on a copy of a
finished demo run with some overrides, so the stages whose config is unchanged (shards, the
RQ-VAE, the codes) are kept and only what the overrides touch is redone (`--overwrite`).

    .venv/bin/python bench/demo_variants.py runs/demo runs/variants \\
        '[]' '["train_ar.seed=1"]' '["train_ar.ema_decay=0.999"]' '["encode.views=2"]'

Prints one table row per variant: the prompt check (seen and unseen shape and colour), the demo
FID, train-ar's last train and validation loss and the stage times; each variant's run dir is
kept under OUT for its grids.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Everything of the base run is copied: `--overwrite` redoes exactly the stages whose config
# the overrides change (and those downstream of them); the rest stays up to date.
KEPT = (
    "demo-data",
    "demo-data.csv",
    "demo-classifier",
    "shards",
    "vae",
    "codes",
    "ar",
    "samples",
    "eval",
    "mlflow",
)


def last(records: list[dict], key: str) -> float | None:
    return next((r[key] for r in reversed(records) if key in r), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="a finished demo run dir (runs/demo)")
    parser.add_argument("out", help="where the variants' run dirs go")
    parser.add_argument("variants", nargs="+", help="JSON lists of rqpipe demo overrides")
    args = parser.parse_args()
    base, out = Path(args.base), Path(args.out)
    print("| overrides | seen shape / colour | unseen shape / colour | demo FID | train / val loss "
          "| train-ar s | total s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
    for index, spec in enumerate(args.variants):
        overrides = json.loads(spec)
        run = out / f"variant-{index:02d}"
        if not (run / "demo-report.json").exists():
            run.mkdir(parents=True, exist_ok=True)
            for name in KEPT:
                if (base / name).is_dir() and not (run / name).exists():
                    shutil.copytree(base / name, run / name)
                elif (base / name).is_file():
                    shutil.copy2(base / name, run / name)
        started = time.time()
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", "demo", "--run-dir",
                               str(run), "--overwrite", *overrides],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            print(f"| `{spec}` | failed: {done.stderr.strip().splitlines()[-1]} |", flush=True)
            continue
        seconds = {line.split()[2]: line.split()[-2] for line in done.stdout.splitlines()
                   if line.startswith("rqpipe run: ")}  # fmt: skip
        check = json.loads((run / "demo-report.json").read_text())["prompt_check"]
        metrics = [json.loads(x) for x in (run / "ar" / "metrics.jsonl").read_text().splitlines()]
        evaluation = json.loads((run / "eval" / "metrics.json").read_text())
        seen, unseen = check["seen"], check.get("unseen", {"shape": 0, "colour": 0})
        print(f"| `{' '.join(overrides) or '(the config)'}` | {seen['shape']:.1%} / "
              f"{seen['colour']:.1%} | {unseen['shape']:.1%} / {unseen['colour']:.1%} | "
              f"{evaluation['samples']['demo_fid']:.2f} | {last(metrics, 'loss'):.3f} / "
              f"{last(metrics, 'val_loss'):.3f} | {seconds.get('train-ar', '?')} | "
              f"{time.time() - started:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
