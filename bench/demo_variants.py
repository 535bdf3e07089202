"""The demo's figures under other settings, on the shards, RQ-VAE and codes of a finished demo
run: each variant is `rqpipe run` on the base run's own input, in a run dir of its own that
starts from a copy of the base's stages, with `--overwrite` and some overrides, so only the
stages the overrides change (and those after them) are redone; then the demo's prompt check.

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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The base run's stages: the same input URI (the base's listing) keeps their fingerprints, so
# a variant redoes only what its overrides change.
KEPT = ("demo-classifier", "shards", "vae", "codes", "ar", "samples", "eval")
REPORT = "from pathlib import Path; import sys; from pipeline.demo.run import _report; " \
         "_report(Path(sys.argv[1]))"  # fmt: skip


def last(records: list[dict], key: str) -> float | None:
    return next((r[key] for r in reversed(records) if key in r), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="a finished demo run dir (runs/demo)")
    parser.add_argument("out", help="where the variants' run dirs go")
    parser.add_argument("variants", nargs="+", help="JSON lists of rqpipe run overrides")
    args = parser.parse_args()
    base, out = Path(args.base).resolve(), Path(args.out).resolve()
    from pipeline.demo.data import demo_prompts

    common = ["--input", str(base / "demo-data.csv"), "--config", str(REPO / "configs" /
              "demo.yaml"), "--overwrite", f"evaluate.weights={base / 'demo-classifier'}",
              f"sample.prompts={json.dumps(demo_prompts())}"]  # fmt: skip
    print("| overrides | seen shape / colour | unseen shape / colour | demo FID | train / val loss "
          "| train-ar s | total s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|", flush=True)
    for index, spec in enumerate(args.variants):
        overrides = json.loads(spec)
        run = out / f"variant-{index:02d}"
        for name in KEPT:
            if (base / name).is_dir() and not (run / name).exists():
                shutil.copytree(base / name, run / name)
        started = time.time()
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--run-dir", str(run),
                               *common, *overrides], capture_output=True, text=True)  # fmt: skip
        report = done
        if done.returncode == 0:
            report = subprocess.run([sys.executable, "-c", REPORT, str(run)],
                                    capture_output=True, text=True)  # fmt: skip
        if report.returncode != 0:
            print(f"| `{spec}` | failed: {report.stderr.strip().splitlines()[-1]} |", flush=True)
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
