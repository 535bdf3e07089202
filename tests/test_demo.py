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


def test_demo_command_trains_saves_and_is_idempotent(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    first = rqpipe("demo", "--run-dir", str(run), "steps=3", "log_every=1", cwd=repo)
    assert first.returncode == 0, first.stderr
    assert "reconstructions" in first.stdout
    grid = np.asarray(Image.open(run / "vae" / "reconstructions.png"))
    assert grid.shape[0] > 5 * 32  # originals + D = 4 depth rows
    metrics = [
        json.loads(line) for line in (run / "vae" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert {"recon", "commitment", "val_psnr", "perplexity_d1", "usage_d4"} <= set(metrics[0])
    model = RQVAE.from_pretrained(str(run / "vae" / "model"))
    assert model.config.code_shape == (8, 8, 4)

    weights = (run / "vae" / "model" / "model.safetensors").stat().st_mtime_ns
    again = rqpipe("demo", "--run-dir", str(run), "steps=3", "log_every=1", cwd=repo)
    assert again.returncode == 0 and "up to date" in again.stdout
    assert (run / "vae" / "model" / "model.safetensors").stat().st_mtime_ns == weights

    changed = rqpipe("demo", "--run-dir", str(run), "steps=4", cwd=repo)
    assert changed.returncode != 0 and "--overwrite" in changed.stderr
    bad = rqpipe("demo", "--run-dir", str(run), "stpes=4", cwd=repo)
    assert bad.returncode == 2 and "stpes" in bad.stderr
