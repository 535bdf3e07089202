"""The README's demo command, run as a user would (a real subprocess), at a few steps."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from model.rqvae import RQVAE
from pipeline.demo_data import DEMO_CLASSES, write_demo_dataset


def rqpipe(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_demo_dataset_is_deterministic_real_pngs(tmp_path):
    a = write_demo_dataset(tmp_path / "a", per_class=3)
    b = write_demo_dataset(tmp_path / "b", per_class=3)
    assert [p.relative_to(tmp_path / "a") for p in a] == [p.relative_to(tmp_path / "b") for p in b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b, strict=True))
    assert {p.parent.name for p in a} == set(DEMO_CLASSES)
    with Image.open(a[0]) as image:
        assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"


# configs/demo.yaml cut to seconds: the full run (`make demo`) is measured in docs/benchmarks.md.
FAST = ["train_vae.steps=6", "train_vae.log_every=3", "train_vae.checkpoint_every=6",
        "train_vae.cpus_per_worker=0.5", "encode.cpus_per_actor=0.5", "train_ar.steps=4",
        "train_ar.log_every=2", "train_ar.preview_per_class=2", "train_ar.cpus_per_worker=0.5",
        "sample.num_samples=8", "sample.chunk_size=4", "sample.cpus_per_actor=0.5"]  # fmt: skip


def files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_demo_runs_every_stage_reports_and_is_idempotent(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    first = rqpipe("demo", "--run-dir", str(run), *FAST, cwd=repo)
    assert first.returncode == 0, first.stderr[-3000:]
    lines = [x for x in first.stdout.splitlines() if x.startswith("rqpipe run: ")]
    assert [x.split()[2:4] for x in lines] == [[s, "ran"] for s in
                                              ("shard", "train-vae", "encode", "train-ar", "sample")]  # fmt: skip
    assert "where to look:" in first.stdout

    grid = np.asarray(Image.open(run / "vae" / "reconstructions.png"))
    assert grid.shape[0] > 5 * 32  # originals + D = 4 depth rows
    for name in DEMO_CLASSES:  # one grid per class, named after it
        assert len(list((run / "samples").glob(f"grid-*-{name}.png"))) == 1
        assert str(next((run / "samples").glob(f"grid-*-{name}.png"))) in first.stdout
    assert "rows: 512" in (run / "codes-stats.txt").read_text()
    assert (run / "codes-usage.png").exists()
    check = json.loads((run / "demo-report.json").read_text())["class_check"]
    assert check["samples"] == 8 and set(check["per_class"]) == set(DEMO_CLASSES)
    assert check["classifier_accuracy_on_real_images"] >= 0.95  # the yardstick itself works
    assert 0.0 <= check["accuracy"] <= 1.0
    model = RQVAE.from_pretrained(str(run / "vae" / "model"))
    assert model.config.code_shape == (8, 8, 4)

    before = files(run)
    again = rqpipe("demo", "--run-dir", str(run), *FAST, cwd=repo)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("up to date") >= 5
    assert files(run) == before  # nothing rewritten, the report included

    changed = rqpipe("demo", "--run-dir", str(run), *FAST[:-1], "sample.chunk_size=2", cwd=repo)
    assert changed.returncode == 1 and "chunk_size: 4 -> 2" in changed.stderr
    assert "--overwrite" in changed.stderr
    bad = rqpipe("demo", "--run-dir", str(run), "train_vae.stpes=4", cwd=repo)
    assert bad.returncode == 2 and "stpes" in bad.stderr
    unprefixed = rqpipe("demo", "--run-dir", str(run), "steps=4", cwd=repo)
    assert unprefixed.returncode == 2 and "train_vae.steps=100" in unprefixed.stderr
