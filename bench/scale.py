"""How each stage's cost grows with the number of units, on the object store the tests use.

    .venv/bin/python bench/scale.py --units 1000 10000 40000 --latency-ms 30 \\
        [--stages shard-folder encode ...] [--cases first resume noop] [--out runs/scale]

moto's S3 server runs as its own process behind bench/s3_meter.py, which adds LATENCY_MS to
every request (S3 from EC2 is ~30 ms) and counts requests by operation and client process. Each
stage's real driver code runs here, in this process, on a local Ray instance, for N units and
three cases: a first run, a resume with half the units done (half the outputs and the
manifest removed), and a no-op re-run. Measured: requests per unit by operation (the driver's,
and everyone's), the driver's time to its first task and in total, its peak RSS above where
it started, and the bytes that pass through it.

Inputs are tiny and synthetic: the planning and bookkeeping are what is measured, not pixels.
Where the per-unit work is not what is measured, it is stubbed (each stub writes the files its
real counterpart writes, with tiny contents, so the driver sees what it would):
- encode: the RQ-VAE actor (`StubEncoder`: each shard's tiny decoded images, all-zero codes);
- train-vae, train-ar: Ray Train's fit (`stub_fit`: the planning up to the trainer is real);
- sample: the sampler actor (`StubSampler`: one 8x8 PNG and its one-row table a chunk);
- evaluate: the feature actor (`StubFeatures`: 4-d features); its reduction runs for real;
- shard (from a folder, a Parquet listing, tars): nothing; its images are 8x8 PNGs, one a
  shard (samples_per_shard=1).
Results go to OUT/scale.jsonl; the table, the log-log slopes and the plots to stdout and OUT.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("shard-folder", "shard-listing", "shard-tars", "train-vae", "encode", "train-ar",
          "sample", "evaluate")  # fmt: skip
CASES = ("first", "resume", "noop")
FIRST_TASK: dict[str, float] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png8(seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# -- stubs: the per-unit work that is not what is measured (pickled by value to the workers) ----


def _first(tag: str) -> None:
    """The moment the stage's first unit of work started, told to the driver through a file."""
    path = Path(os.environ["RQPIPE_SCALE_MARK"])
    if not path.exists():
        path.write_text(f"{time.time()}")


class StubEncoder:
    def __init__(self, vae_uri: str, storage_config: Any, *args: Any) -> None:
        from pipeline.core.storage import Storage

        self.storage = Storage(storage_config)

    def encode(self, name: str, decoded: dict, out_uri: str, config: Any, vae_fp: str,
               stage_fp: str) -> dict:  # fmt: skip
        from pipeline.formats.codes_table import codes_table, to_parquet_bytes

        _first("encode")
        rows = len(decoded["keys"])
        table = codes_table(decoded["keys"], decoded["labels"], decoded["captions"],
                            np.zeros((rows, 8, 8, 4), np.int64), 256, vae_fp, None, None, stage_fp)  # fmt: skip
        data = to_parquet_bytes(table)
        self.storage.write_bytes(out_uri, data)
        return {"name": name, "rows": rows, "bytes": len(data)}


class StubSampler:
    def __init__(self, ar_uri: str, vae_uri: str, storage_config: Any, *args: Any) -> None:
        from pipeline.core.storage import Storage

        self.storage = Storage(storage_config)

    def sample(self, chunk: int, first: int, labels: Any, count: int, config: Any, out_dir: str,
               vae_fp: str, stage_fp: str, prompts: Any = None) -> dict:  # fmt: skip
        from pipeline.core.storage import join
        from pipeline.formats.codes_table import codes_table, to_parquet_bytes

        _first("sample")
        keys = [f"sample-{i:06d}" for i in range(first, first + count)]
        for key in keys:
            self.storage.write_bytes(join(out_dir, "images", f"{key}.png"), png8(0))
        table = codes_table(keys, labels or [None] * count, [None] * count,
                            np.zeros((count, 8, 8, 4), np.int64), 256, vae_fp, None, None,
                            stage_fp)  # fmt: skip
        data = to_parquet_bytes(table)
        name = f"chunk-{chunk:05d}.parquet"
        self.storage.write_bytes(join(out_dir, "codes", name), data)
        return {"chunk": chunk, "name": name, "rows": count, "bytes": len(data), "seconds": 0.0}


class StubFeatures:
    def __init__(self, kind: str, weights: Any, vae_uri: Any, lpips: Any, storage_config: Any,
                 *args: Any) -> None:  # fmt: skip
        from pipeline.core.storage import Storage

        self.storage = Storage(storage_config)

    def _unit(self, name: str, rows: int, units_dir: str, fp: str, plan: Any, extra: dict) -> dict:
        from pipeline.stages.evaluate.features import feature_sums, write_unit

        _first("evaluate")
        features = np.random.default_rng(len(name)).normal(size=(rows, 4)).astype(np.float32)
        arrays = feature_sums(name, features, np.zeros(rows, np.int64), plan)
        arrays.update(extra)
        return write_unit(self.storage, units_dir, name, arrays, fp)

    def shard_unit(self, name: str, decoded: dict, units_dir: str, recon: bool, fp: str,
                   plan: Any) -> dict:  # fmt: skip
        extra = {"recon_count": np.array(1), "recon_feature_sum": np.zeros(4),
                 "recon_feature_outer": np.eye(4), "psnr_depth_sum": np.full(4, 30.0),
                 "ssim_sum": np.array(0.9), "lpips_sum": np.array(np.nan)} if recon else {}  # fmt: skip
        return self._unit(name, len(decoded["keys"]), units_dir, fp, plan, extra)

    def sample_unit(self, name: str, samples_dir: str, table: str, units_dir: str, fp: str,
                    plan: Any) -> dict:  # fmt: skip
        from model.evaluation.metrics import InceptionScoreSums

        score = InceptionScoreSums.of(np.zeros((1, 4)), plan.first, plan.total, plan.splits)
        extra = {"is_count": score.count, "is_p_sum": score.p_sum,
                 "is_plogp_sum": score.plogp_sum}  # fmt: skip
        return self._unit(name, 1, units_dir, fp, plan, extra)


def stub_fit(folder: Any, worker: Any, loop_config: dict, config: Any, dataset: Any) -> None:
    """Ray Train's fit, stubbed: the planning before it is what is measured."""
    from model.rqvae import RQVAE, RQVAEConfig

    _first("fit")
    if folder.stage == "train-vae":
        RQVAE(RQVAEConfig.preset("tiny")).save_pretrained(folder.path("model"),
                                                          folder.storage.options(folder.uri))  # fmt: skip
    else:
        folder.storage.write_bytes(folder.path("model", "model.safetensors"), b"stub")


# -- the services ---------------------------------------------------------------------------------


class Services:
    """moto's server and the meter in front of it, each a process of its own."""

    def __init__(self, latency_ms: float, log: Path) -> None:
        self.moto_port, self.port = free_port(), free_port()
        env = {**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"}
        self.moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                      "-p", str(self.moto_port)], stdout=log.open("wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True, env=env)  # fmt: skip
        self.latency_ms = latency_ms
        self.start_meter()
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", self.moto_port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        self.url = f"http://127.0.0.1:{self.port}"
        self.direct = f"http://127.0.0.1:{self.moto_port}"

    def start_meter(self) -> None:
        """The meter in front of moto (again, after `stop_meter`: the outage ends)."""
        self.meter = subprocess.Popen([sys.executable, str(REPO / "bench" / "s3_meter.py"),
                                       str(self.port), str(self.moto_port), str(self.latency_ms)],
                                      stdout=subprocess.PIPE, start_new_session=True)  # fmt: skip
        assert self.meter.stdout.readline().strip() == b"listening"

    def stop_meter(self) -> None:
        """An endpoint outage: connections refused, open ones cut, the objects kept."""
        os.killpg(self.meter.pid, signal.SIGKILL)
        self.meter.wait()

    def log(self) -> list[str]:
        """The latest requests, "pid OP target", oldest first."""
        import urllib.request

        with urllib.request.urlopen(f"{self.url}/__meter?log") as response:
            return response.read().decode().splitlines()

    def latency(self, milliseconds: float) -> None:
        import urllib.request

        request = urllib.request.Request(f"{self.url}/__meter?latency_ms={milliseconds}",
                                         method="POST")  # fmt: skip
        urllib.request.urlopen(request).read()

    def counts(self, reset: bool = False) -> dict[int, dict[str, int]]:
        import urllib.request

        request = urllib.request.Request(f"{self.url}/__meter", method="POST" if reset else "GET")
        with urllib.request.urlopen(request) as response:
            return {int(pid): ops for pid, ops in json.loads(response.read()).items()}

    def stop(self) -> None:
        for process in (self.meter, self.moto):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# -- measuring one run ----------------------------------------------------------------------------


class PeakRSS:
    """The driver's peak resident memory above where it was when measuring started."""

    def __init__(self) -> None:
        self.process, self.peak, self.running = psutil.Process(), 0, True
        self.base = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return max(0, self.peak - self.base)


def measure(services: Services, run: Any, show: bool = False) -> dict[str, Any]:
    """Run `run()` (a stage's driver) and what it cost."""
    mark = Path(os.environ["RQPIPE_SCALE_MARK"])
    mark.unlink(missing_ok=True)
    services.counts(reset=True)
    rss = PeakRSS()
    started = time.time()
    run()
    seconds = time.time() - started
    peak = rss.stop()
    counts = services.counts()
    if show:  # the driver's requests, one a line
        print("\n".join(line for line in services.log() if line.startswith(f"{os.getpid()} ")))
    driver = counts.get(os.getpid(), {})
    everyone: dict[str, int] = {}
    for ops in counts.values():
        for op, n in ops.items():
            everyone[op] = everyone.get(op, 0) + n
    first = float(mark.read_text()) - started if mark.exists() else None
    ops = ("LIST", "HEAD", "GET", "PUT", "POST", "DELETE")
    return {"seconds": round(seconds, 2), "first_task_s": first and round(first, 2),
            "peak_rss_mb": round(peak / 2**20, 1),
            "driver": {op: driver.get(op, 0) for op in ops},
            "all": {op: everyone.get(op, 0) for op in ops},
            "driver_bytes": driver.get("bytes_in", 0) + driver.get("bytes_out", 0)}  # fmt: skip


# -- the stages' setups ---------------------------------------------------------------------------


def put_many(client: Any, bucket: str, objects: list[tuple[str, bytes]]) -> None:
    """Setup uploads, straight to moto (not metered), 16 at a time."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), objects))


def delete_half(client: Any, bucket: str, prefix: str, suffix: str, extra: list[str]) -> None:
    """A resume with half the units done: every other unit's output and the manifest removed."""
    keys = sorted(o["Key"] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix) for o in page.get("Contents", []) if o["Key"].endswith(suffix))  # fmt: skip
    doomed = keys[::2] + extra
    for i in range(0, len(doomed), 1000):
        client.delete_objects(
            Bucket=bucket, Delete={"Objects": [{"Key": k} for k in doomed[i : i + 1000]]}
        )


def stage_runner(
    stage: str, units: int, bucket: str, client: Any, storage: Any
) -> tuple[Any, str, str]:
    """-> (the stage's driver call, the unit output suffix a resume removes, its folder)."""
    from pipeline.stages import encode, evaluate, sample, train_ar, train_vae
    from pipeline.stages.shard import ShardConfig, run_shard_stage

    run = f"s3://{bucket}/run"
    shard_config = ShardConfig(image_size=8, samples_per_shard=1, val_fraction=0.0,
                               cpus_per_task=0.5, storage=storage)  # fmt: skip
    if stage.startswith("shard"):
        kind = stage.split("-", 1)[1]
        source = {"folder": f"s3://{bucket}/in", "listing": f"s3://{bucket}/listing.parquet",
                  "tars": f"s3://{bucket}/tars"}[kind]  # fmt: skip
        return (lambda: run_shard_stage(source, run, shard_config)), ".stats.json", "run/shards/"
    if stage == "train-vae":
        config = train_vae.TrainVAEConfig(steps=1, batch_size=1, storage=storage)
        return (lambda: train_vae.run_train_vae_stage(run, config)), "", "run/vae/"
    if stage == "encode":
        config = encode.EncodeConfig(cpus_per_actor=0.5, storage=storage)
        return (lambda: encode.run_encode_stage(run, config)), ".parquet", "run/codes/"
    if stage == "train-ar":
        config = train_ar.TrainARConfig(steps=1, batch_size=1, storage=storage)
        return (lambda: train_ar.run_train_ar_stage(run, config)), "", "run/ar/"
    if stage == "sample":
        config = sample.SampleConfig(num_samples=units, chunk_size=1, grid_size=1,
                                     cpus_per_actor=0.5, storage=storage)  # fmt: skip
        return (lambda: sample.run_sample_stage(run, config)), ".parquet", "run/samples/codes/"
    config = evaluate.EvaluateConfig(features="classifier", weights=WEIGHTS, reference="train",
                                     reconstructions=False, cpus_per_actor=0.5, storage=storage)  # fmt: skip
    return (lambda: evaluate.run_evaluate_stage(run, config)), ".json", "run/eval/units/"


WEIGHTS = ""


def prepare(stage: str, units: int, bucket: str, client: Any, services: Services,
            storage: Any, work: Path) -> None:  # fmt: skip
    """The inputs and upstream stages of `stage` for `units` units, built without the meter."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.formats.shard_tar import tar_bytes

    if stage == "shard-folder":
        put_many(client, bucket, [(f"in/c{i % 10}/{i:07d}.png", png8(i)) for i in range(units)])
    elif stage == "shard-listing":
        put_many(client, bucket, [(f"in/{i:07d}.png", png8(i)) for i in range(units)])
        buffer = io.BytesIO()
        pq.write_table(pa.table({"path": [f"in/{i:07d}.png" for i in range(units)],
                                 "label": [i % 10 for i in range(units)]}), buffer)  # fmt: skip
        client.put_object(Bucket=bucket, Key="listing.parquet", Body=buffer.getvalue())
    elif stage == "shard-tars":
        put_many(client, bucket, [(f"tars/t-{i:07d}.tar", tar_bytes([(f"k{i}.png", png8(i)),
              (f"k{i}.json", b'{"label": 1}')])) for i in range(units)])  # fmt: skip
    else:  # the stages after shard: their upstream made by the real shard stage, unmetered
        from pipeline.stages.shard import ShardConfig, run_shard_stage

        put_many(client, bucket, [(f"in/c{i % 10}/{i:07d}.png", png8(i)) for i in range(units)])
        direct = type(storage)(endpoint_url=services.direct)
        run_shard_stage(f"s3://{bucket}/in", f"s3://{bucket}/run",
                        ShardConfig(image_size=32, samples_per_shard=1, val_fraction=0.0,
                                    cpus_per_task=0.5, storage=direct))  # fmt: skip
        _upstream(stage, units, bucket, direct, work)


def _upstream(stage: str, units: int, bucket: str, direct: Any, work: Path) -> None:
    """The stages between shard and `stage`, run unmetered with their stubs."""
    from pipeline.stages import encode, train_vae

    run = f"s3://{bucket}/run"
    if stage == "train-vae":
        return
    train_vae.run_train_vae_stage(run, train_vae.TrainVAEConfig(steps=1, batch_size=1,
                                                                storage=direct))  # fmt: skip
    if stage in ("encode", "evaluate"):
        if stage == "evaluate":
            _sampled(run, units, direct)
        return
    encode.run_encode_stage(run, encode.EncodeConfig(cpus_per_actor=0.5, storage=direct))
    if stage == "sample":
        _ar_model(run, direct)


def _ar_model(run: str, storage: Any) -> None:
    import torch

    from model.rqtransformer import RQTransformer, RQTransformerConfig
    from model.rqvae import RQVAE
    from pipeline.core.storage import Storage

    s = Storage(storage)
    vae = RQVAE.from_pretrained(f"{run}/vae/model", storage_options=s.options(run))
    config = RQTransformerConfig.preset("tiny", code_shape=[8, 8, 4], codebook_size=256,
                                        num_classes=10)  # fmt: skip
    torch.manual_seed(0)
    RQTransformer(config, vae.quantizer.codebooks).save_pretrained(
        f"{run}/ar/model", s.options(run)
    )


def _sampled(run: str, units: int, storage: Any) -> None:
    from pipeline.stages import sample

    _ar_model(run, storage)
    sample.run_sample_stage(run, sample.SampleConfig(num_samples=units, chunk_size=1, grid_size=1,
                                                     cpus_per_actor=0.5, storage=storage))  # fmt: skip


def marked_write_shard_group(*args: Any, **kwargs: Any) -> Any:
    """The shard stage's real writer, marking when the first shard started (not a stub)."""
    from pipeline.stages.shard.writer import write_shard_group

    _first("shard")
    return write_shard_group(*args, **kwargs)


def install_stubs() -> None:
    from pipeline.stages import encode, evaluate, sample, shard, train_ar, train_vae

    shard.write_shard_group = marked_write_shard_group
    encode.ShardEncoder = StubEncoder
    sample.ChunkSampler = StubSampler
    evaluate.FeatureWorker = StubFeatures
    train_vae.fit = train_ar.fit = stub_fit


# -- the report -----------------------------------------------------------------------------------


def slope(points: list[tuple[int, float]]) -> float | None:
    """The log-log slope of a cost against units (1: linear)."""
    points = [(u, v) for u, v in points if v and v > 0]
    if len(points) < 2:
        return None
    x, y = np.log([u for u, _ in points]), np.log([v for _, v in points])
    return float(np.polyfit(x, y, 1)[0])


def report(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a stage, case and size measured again: the latest run counts
    latest = {(r["stage"], r["case"], r["units"]): r for r in results}
    order = lambda r: (STAGES.index(r["stage"]), CASES.index(r["case"]), r["units"])  # noqa: E731
    results = sorted(latest.values(), key=order)
    print("\n| stage | case | units | ms a request | requests (driver) / unit | all requests / unit "
          "| LIST pages | first task s | total s | driver RSS MB | driver bytes / unit |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        d, a = sum(r["driver"].values()), sum(r["all"].values())
        print(f"| {r['stage']} | {r['case']} | {r['units']:,} | {r['latency_ms']:g} | "
              f"{d / r['units']:.3f} | "
              f"{a / r['units']:.2f} | {r['all']['LIST']} | {r['first_task_s']} | "
              f"{r['seconds']} | {r['peak_rss_mb']} | {r['driver_bytes'] / r['units']:.0f} |")  # fmt: skip
    print("\nlog-log slopes in units (1: linear):")
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    colours = dict(zip(STAGES, plt.get_cmap("tab10").colors, strict=False))
    styles = {"first": "o-", "resume": "s--", "noop": "^:"}
    for stage in STAGES:
        for case in CASES:
            rows = sorted((r for r in results if r["stage"] == stage and r["case"] == case),
                          key=lambda r: r["units"])  # fmt: skip
            if not rows:
                continue
            total = [(r["units"], float(sum(r["all"].values()))) for r in rows]
            seconds = [(r["units"], r["seconds"]) for r in rows]
            shown = [f"{x:.2f}" if x is not None else "-" for x in (slope(total), slope(seconds))]
            print(f"  {stage:<14} {case:<7} requests {shown[0]:>5}  seconds {shown[1]:>5}")
            look = dict(color=colours[stage], label=f"{stage} {case}")
            axes[0].loglog(*zip(*total, strict=True), styles[case], **look)
            axes[1].loglog(*zip(*seconds, strict=True), styles[case], **look)
    axes[0].set(xlabel="units", ylabel="requests (everyone's)", title="object-store requests")
    axes[1].set(xlabel="units", ylabel="seconds", title="the stage's time (the driver waits)")
    axes[1].legend(fontsize=7, ncol=1, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    figure.savefig(out / "scale.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--latency-ms", type=float, default=30.0)
    parser.add_argument("--out", default="runs/scale")
    parser.add_argument("--show-requests", action="store_true", help="print the driver's requests")
    parser.add_argument("--first-latency-ms", type=float, default=None,
                        help="another latency for the first runs (which also set up the resume "
                             "and no-op cases): 0 makes 40,000-unit runs affordable on moto")  # fmt: skip
    parser.add_argument("--report", action="store_true",
                        help="run nothing: the table, slopes and plots of every run in "
                             "OUT/scale.jsonl (runs of several invocations together)")  # fmt: skip
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        lines = (out / "scale.jsonl").read_text().splitlines()
        return report([json.loads(line) for line in lines if line.strip()], out)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "scale")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "scale-secret")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ["RQPIPE_SCALE_MARK"] = str(out / "first-task.mark")
    services = Services(args.latency_ms, out / "moto.log")
    try:
        import boto3
        import ray

        from pipeline.core.storage import StorageConfig

        global WEIGHTS
        from model.evaluation.classifier import ImageClassifier, ImageClassifierConfig

        WEIGHTS = str(out / "classifier")
        ImageClassifier(ImageClassifierConfig(num_classes=10)).save_pretrained(WEIGHTS)
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RQPIPE_SCALE_MARK": os.environ["RQPIPE_SCALE_MARK"]}})  # fmt: skip
        install_stubs()
        client = boto3.client("s3", endpoint_url=services.direct)
        storage = StorageConfig(endpoint_url=services.url)
        results = []
        with (out / "scale.jsonl").open("a") as log:
            for units in args.units:
                for stage in args.stages:
                    bucket = f"scale-{stage}-{units}".replace("_", "-")
                    client.create_bucket(Bucket=bucket)
                    prepare(stage, units, bucket, client, services, storage, out)
                    run, suffix, folder = stage_runner(stage, units, bucket, client, storage)
                    for case in args.cases:
                        first = case == "first" and args.first_latency_ms is not None
                        services.latency(args.first_latency_ms if first else args.latency_ms)
                        if case == "resume":
                            if not suffix:
                                continue  # a training stage resumes from its checkpoint
                            delete_half(client, bucket, folder, suffix,
                                        [f"{folder.split('/')[0]}/{folder.split('/')[1]}/_manifest.json"])  # fmt: skip
                        result = {"stage": stage, "case": case, "units": units,
                                  "latency_ms": args.first_latency_ms if first else args.latency_ms,
                                  **measure(services, run, args.show_requests)}  # fmt: skip
                        print(json.dumps(result), flush=True)
                        log.write(json.dumps(result) + "\n")
                        results.append(result)
        report(results, out)
    finally:
        services.stop()


if __name__ == "__main__":
    main()
