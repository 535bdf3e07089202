"""Helpers for tests of the Ray Train stages (train-vae, train-ar)."""

import json
from pathlib import Path


def committed_checkpoints(stage_dir: Path) -> list[str]:
    """Checkpoints Ray Train has committed (listed in its snapshot): what a resume sees."""
    snapshot = stage_dir / "checkpoint_manager_snapshot.json"
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return []
    return [r["checkpoint_dir_name"] for r in results]


def metrics(stage_dir: Path | str, storage=None) -> list[dict]:
    from pipeline.core.storage import Storage
    from pipeline.core.training import read_metrics

    return read_metrics(storage or Storage(), str(stage_dir))


def capture(errors: list, fn, *args) -> None:
    """Run fn(*args) (in a thread), keeping any exception for the test to assert on."""
    try:
        fn(*args)
    except BaseException as e:  # surfaced by the test thread's assertion
        errors.append(e)
