"""Experiment tracking and curves for the training stages.

Ray Train's documented pattern: the tracking library's own calls inside the training function,
on rank 0 only. `RunMetrics` (core/training.py) forwards every record it logs to the tracker.

- `mlflow` (default): no server needed. A local run dir gets a sqlite store in RUN/mlflow/
  (`mlflow ui --backend-store-uri sqlite:///RUN/mlflow/mlflow.db`); an object-store run dir
  needs `tracking.uri` (an MLflow server), else tracking is off with one printed line. One
  MLflow experiment per run dir, one MLflow run per stage; a resumed stage continues its MLflow
  run (its id is kept in RUN/{stage}/tracking.json). Parameters: the resolved config,
  flattened, credentials redacted; metrics: what metrics.jsonl holds; artifacts: the grids and
  curves.png.
- `wandb`: optional (`pip install wandb`), project `tracking.project`.
- `none`.
`curves.png` (loss, per-depth loss, validation, throughput by step) is drawn from the metrics
log by `plot_curves`, whatever the tracker.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from pipeline.core.storage import Storage, is_local, join, redact

BACKENDS = ("mlflow", "wandb", "none")


@dataclass
class TrackingConfig:
    backend: str = "mlflow"  # mlflow | wandb | none
    uri: str | None = None  # MLflow tracking URI; default: sqlite in RUN/mlflow (local run dirs)
    experiment: str | None = None  # MLflow experiment / W&B group; default: the run dir's name
    project: str = "rqpipe"  # W&B project

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"tracking.backend={self.backend!r}: use one of {list(BACKENDS)}")

    def preflight(self) -> None:
        """Before any stage starts: the tracking library is installed."""
        import importlib.util

        if self.backend == "wandb" and importlib.util.find_spec("wandb") is None:
            raise ImportError("tracking.backend=wandb needs the wandb package: pip install wandb "
                              "(and WANDB_API_KEY in the workers' environment), or "
                              "tracking.backend=mlflow")  # fmt: skip


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow parameters: dotted keys, string values, URLs redacted."""
    params: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            params.update(flat_params(value, f"{prefix}{key}."))
        else:
            params[f"{prefix}{key}"] = redact(json.dumps(value))[:500]  # MLflow's value limit
    return params


class Tracker:
    """No tracking: the base every backend overrides."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def artifact(self, name: str, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool)}  # fmt: skip


class MLflowTracker(Tracker):
    def __init__(self, uri: str, experiment: str, stage: str, stage_dir: str,
                 artifact_root: str | None, params: dict[str, str], storage: Storage) -> None:  # fmt: skip
        import logging

        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # no "Creating tables" chatter
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = (found.experiment_id if found else
                         self.client.create_experiment(experiment, artifact_location=artifact_root))  # fmt: skip
        state_uri = join(stage_dir, "tracking.json")
        state = json.loads(storage.read_bytes(state_uri)) if storage.exists(state_uri) else {}
        if state.get("mlflow_run_id") and state.get("mlflow_uri") == redact(uri):
            self.run_id = state["mlflow_run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=stage).info.run_id
            storage.write_bytes(state_uri, json.dumps({"mlflow_run_id": self.run_id,
                                                       "mlflow_uri": redact(uri)}).encode())  # fmt: skip
            items = list(params.items())
            for start in range(0, len(items), 100):  # MLflow's batch limit
                self.client.log_batch(self.run_id, params=[
                    mlflow.entities.Param(k, v) for k, v in items[start:start + 100]])  # fmt: skip

    def log(self, record: dict[str, Any]) -> None:
        import time

        import mlflow

        now, step = int(time.time() * 1000), int(record.get("step", 0))
        metrics = [mlflow.entities.Metric(k, v, now, step) for k, v in _numbers(record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def artifact(self, name: str, data: bytes) -> None:
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, name)
            with open(path, "wb") as f:
                f.write(data)
            self.client.log_artifact(self.run_id, path)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker(Tracker):
    def __init__(self, project: str, group: str, stage: str, params: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise ImportError("tracking.backend=wandb needs the wandb package: pip install "
                              "wandb (and WANDB_API_KEY in the workers' environment)") from None  # fmt: skip
        self.wandb = wandb
        self.run = wandb.init(project=project, group=group, name=stage, config=params,
                              resume="allow")  # fmt: skip

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(_numbers(record), step=int(record.get("step", 0)))

    def artifact(self, name: str, data: bytes) -> None:
        import io

        from PIL import Image

        self.run.log({name: self.wandb.Image(Image.open(io.BytesIO(data)))})

    def close(self) -> None:
        self.run.finish()


def open_tracker(config: TrackingConfig, run_dir: str, stage: str, params: dict[str, Any],
                 storage: Storage) -> Tracker:  # fmt: skip
    """The tracker of one training stage (call on rank 0)."""
    experiment = config.experiment or run_dir.rstrip("/").rsplit("/", 1)[-1]
    stage_dir = join(run_dir, stage.replace("train-", ""))
    if config.backend == "wandb":
        redacted = json.loads(redact(json.dumps(params)))  # W&B keeps types and nesting
        return WandbTracker(config.project, experiment, stage, redacted)
    if config.backend == "none":
        return Tracker()
    if config.uri is None and not is_local(run_dir):
        print(f"{stage}: MLflow tracking is off: the run dir is on an object store; set "
              f"tracking.uri to an MLflow server to track it", flush=True)  # fmt: skip
        return Tracker()
    uri, artifacts = config.uri, None
    if uri is None:
        root = storage.fs(join(run_dir, "mlflow"))[1]
        os.makedirs(root, exist_ok=True)
        uri, artifacts = f"sqlite:///{root}/mlflow.db", f"file://{root}/artifacts"
    return MLflowTracker(uri, experiment, stage, stage_dir, artifacts, flat_params(params),
                         storage)  # fmt: skip


# -- curves ---------------------------------------------------------------------------------------


def plot_curves(records: list[dict[str, Any]], title: str) -> bytes:
    """curves.png of a training stage: training loss (and each depth's), validation, and
    throughput by step. Returns the PNG's bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if "loss" in r]
    keys = list(rows[0]) if rows else []
    losses = ("loss", "recon", "commitment", "perceptual", "gan", "disc")
    panels = [
        ("training loss", [k for k in keys if k in losses or k.startswith("loss_d")]),
        ("validation", [k for k in keys if k.startswith("val_")]),
        ("code use (perplexity by depth)", [k for k in keys if k.startswith("perplexity_d")]),
        ("throughput", [k for k in keys if k.endswith("_per_s_per_worker") and "flops" not in k]),
        ("model TFLOP/s per worker", [k for k in keys if k == "model_tflops_per_s_per_worker"]),
    ]
    panels = [p for p in panels if p[1]] or [("no metrics yet", [])]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for axis, (name, names) in zip(axes[0], panels, strict=True):
        for key in names:
            axis.plot([r["step"] for r in rows], [r.get(key, float("nan")) for r in rows],
                      label=key, linewidth=1.2)  # fmt: skip
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("step")
        if names:
            axis.legend(fontsize=7)
        if name == "training loss" and all(r.get(k, 1) > 0 for r in rows for k in names):
            axis.set_yscale("log")
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return buffer.getvalue()
