"""FSDP against DDP on the demo's real codes: the same train-ar config, two workers each.

    python bench/fsdp_demo.py runs/demo [--steps 400]

Copies RUN/codes and RUN/vae of a finished demo run into two scratch runs and trains the
demo's RQ-Transformer (configs/demo.yaml's train_ar section, `steps` shortened) with
`num_workers=2`, once with `strategy=ddp` and once with `strategy=fsdp`, then prints the
validation loss at each log step and the wall time of each. Two-worker data order is not
reproducible, so the curves agree to a training's own noise, not bit for bit
(tests/test_fsdp.py checks the bit-level agreement on fixed batches).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.config import load_config  # noqa: E402
from pipeline.core.storage import Storage  # noqa: E402
from pipeline.core.training import read_metrics  # noqa: E402
from pipeline.stages.train_ar import TrainARConfig, run_train_ar_stage  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="rqpipe-bench-fsdp-"))
    curves, wall = {}, {}
    try:
        for strategy in ("ddp", "fsdp"):
            run = work / strategy
            for part in ("shards", "vae", "codes"):
                shutil.copytree(args.run_dir / part, run / part)
            config = load_config(TrainARConfig, ROOT / "configs" / "demo.yaml", [
                f"steps={args.steps}", "num_workers=2", "cpus_per_worker=1",
                "threads_per_worker=1", "preview_per_class=0", f"strategy={strategy}",
                "log_every=50", f"checkpoint_every={args.steps // 2}"])  # fmt: skip
            started = time.time()
            run_train_ar_stage(str(run), config)
            wall[strategy] = time.time() - started
            curves[strategy] = {r["step"]: r["val_loss"] for r in read_metrics(Storage(), str(run / "ar"))
                                if "val_loss" in r}  # fmt: skip
        print(f"{'step':>6} {'ddp val_loss':>13} {'fsdp val_loss':>14}")
        for step in sorted(curves["ddp"]):
            print(
                f"{step:>6} {curves['ddp'][step]:>13.4f} {curves['fsdp'].get(step, float('nan')):>14.4f}"
            )
        print(f"wall: ddp {wall['ddp']:.0f} s, fsdp {wall['fsdp']:.0f} s")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
