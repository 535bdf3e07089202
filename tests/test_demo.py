"""The README's demo command, run as a user would (a real subprocess), at a few steps."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.rqvae import RQVAE
from pipeline.demo.data import DEMO_CLASSES, write_demo_dataset


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


def checkout_copy(repo: Path, dest: Path) -> Path:
    """The files a fresh clone of this working tree has (tracked, and new files git does not
    ignore), so the test runs the uncommitted code exactly as a user's clone would."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=repo,
                            capture_output=True, text=True, check=True).stdout.split("\n")  # fmt: skip
    for name in filter(None, listed):
        if (repo / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / name, dest / name)
    return dest


def make_demo(clone: Path, venv: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`make demo` as the README types it (run dir: the relative default runs/demo), through
    the Makefile, with this checkout's virtual environment and shorter steps."""
    return subprocess.run(["make", "demo", f"VENV={venv}", f"DEMO_ARGS={' '.join(overrides)}"],
                          cwd=clone, capture_output=True, text=True, timeout=400)  # fmt: skip


@pytest.mark.slow
def test_demo_runs_every_stage_reports_and_is_idempotent(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    clone = checkout_copy(repo, tmp_path / "clone")
    venv = Path(sys.executable).parents[1]
    run = clone / "runs" / "demo"
    first = make_demo(clone, venv, *FAST)
    assert first.returncode == 0, first.stderr[-3000:]
    # Every stage's output is under the relative run dir, none in a Ray worker's directory.
    for artifact in ("shards/_manifest.json", "vae/metrics.jsonl", "vae/model/model.safetensors",
                     "codes/_manifest.json", "ar/model/model.safetensors",
                     "samples/_manifest.json", "eval/metrics.json", "eval/report.md",
                     "demo-classifier/model.safetensors"):  # fmt: skip
        assert (run / artifact).is_file(), artifact
    lines = [x for x in first.stdout.splitlines() if x.startswith("rqpipe run: ")]
    assert [x.split()[2:4] for x in lines] == [[s, "ran"] for s in
                                              ("shard", "train-vae", "encode", "train-ar", "sample",
                                               "evaluate")]  # fmt: skip
    assert "samples: demo FID" in first.stdout and "not Inception" in first.stdout
    assert "where to look:" in first.stdout

    grid = np.asarray(Image.open(run / "vae" / "reconstructions.png"))
    assert grid.shape[0] > 5 * 32  # originals + D = 4 depth rows
    # A caption model: its tokenizer beside it, one grid per prompt, titled and named by it
    assert (run / "ar" / "model" / "tokenizer.json").is_file()
    grids = sorted((run / "samples").glob("grid-*.png"))
    assert [g.name for g in grids[:2]] == ["grid-000-a_large_red_circle.png",
                                          "grid-001-a_large_green_circle.png"]  # fmt: skip
    assert len(grids) == 8 and str(grids[0]) in first.stdout  # 8 samples: the first 8 prompts
    assert "rows: 2,048" in (run / "codes-stats.txt").read_text()
    assert (run / "codes-usage.png").exists()
    check = json.loads((run / "demo-report.json").read_text())["prompt_check"]
    assert check["samples"] == 8 and check["seen"]["samples"] + check.get(
        "unseen", {"samples": 0})["samples"] == 8  # fmt: skip
    assert check["classifier_accuracy_on_real_images"] >= 0.95  # the yardsticks work
    assert check["colour_rule_accuracy_on_real_images"] >= 0.95
    assert 0.0 <= check["seen"]["shape"] <= 1.0 and "prompt check, seen" in first.stdout
    model = RQVAE.from_pretrained(str(run / "vae" / "model"))
    assert model.config.code_shape == (8, 8, 4)

    before = files(run)
    again = make_demo(clone, venv, *FAST)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("up to date") >= 6
    assert files(run) == before  # nothing rewritten, the report included

    changed = rqpipe("demo", "--run-dir", "runs/demo", *FAST[:-1], "sample.chunk_size=2",
                     cwd=clone)  # fmt: skip
    assert changed.returncode == 1 and "chunk_size: 4 -> 2" in changed.stderr
    assert "--overwrite" in changed.stderr
    bad = rqpipe("demo", "--run-dir", "runs/typo", "train_vae.stpes=4", cwd=clone)
    assert bad.returncode == 2 and "stpes" in bad.stderr
    assert not (clone / "runs" / "typo").exists()  # refused before the demo data were written
    unprefixed = rqpipe("demo", "--run-dir", "runs/demo", "steps=4", cwd=clone)
    assert unprefixed.returncode == 2 and "train_vae.steps=100" in unprefixed.stderr


@pytest.mark.slow
def test_the_readme_your_data_command_refuses_a_conditioning_the_input_cannot_serve(tmp_path):
    """README, "Your data, on one machine": class folders with configs/demo.yaml and a caption
    conditioning are refused before any stage starts (the command itself, on class folders,
    runs in tests/test_official_import.py's imported-RQ-VAE pipeline)."""
    repo = Path(__file__).resolve().parents[1]
    clone = checkout_copy(repo, tmp_path / "clone")
    write_demo_dataset(clone / "photos", per_class=2)
    (clone / "photos.csv").unlink()  # the folders alone, no listing
    venv = Path(sys.executable).parents[1]
    command = [str(venv / "bin" / "python"), "-m", "pipeline.cli", "run", "--input", "photos",
               "--run-dir", "runs/photos", "--config", "configs/demo.yaml",
               "evaluate.enabled=false", "train_ar.conditioning=text"]  # fmt: skip
    refused = subprocess.run(command, cwd=clone, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1, refused.stderr[-2000:]
    assert "conditioning=text needs captions" in refused.stderr
    assert not (clone / "runs").exists()  # nothing ran
