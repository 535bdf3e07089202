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


# Training terms that are timings, not results: they differ between any two runs.
TIMINGS = ("per_s", "data_wait", "mfu")


def same_results(records: list[dict], reference: list[dict], after: int) -> None:
    """The results logged after step `after` are the reference's, to the bit. A reference that
    averaged its weights is compared by its raw weights' validation figures (`*_raw`)."""

    def results(record: dict) -> dict:
        raw = {k.removesuffix("_raw"): v for k, v in record.items() if k.endswith("_raw")}
        if raw:  # its other validation figures are the average's
            record = {k: v for k, v in record.items() if not k.startswith("val_")}
        kept = {k: v for k, v in {**record, **raw}.items() if not k.endswith("_raw")}
        return {k: v for k, v in kept.items() if not any(t in k for t in TIMINGS)}

    ours = [results(r) for r in records if "event" not in r and r["step"] > after]
    theirs = [results(r) for r in reference if "event" not in r and r["step"] > after]
    assert ours and len(ours) == len(theirs)
    for mine, their in zip(ours, theirs, strict=True):
        assert {k: mine.get(k) for k in their} == their
