import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from model.rqtransformer import RQTransformer
from model.rqvae import RQVAE, RQVAEConfig
from pipeline.core.config import ConfigError, load_config
from pipeline.core.storage import Storage
from pipeline.stages.train_ar import TrainARConfig, run_train_ar_stage
from tests.train_helpers import committed_checkpoints, metrics, same_results

REPO = Path(__file__).resolve().parents[1]


def ar_config(**kw) -> TrainARConfig:
    values = dict(steps=24, batch_size=8, lr=2e-3, warmup_steps=2, num_workers=2,
                  cpus_per_worker=0.5, log_every=4, checkpoint_every=12, preview_per_class=2)  # fmt: skip
    values.update(kw)
    config = TrainARConfig(**values)
    config.tracking.backend = "none"  # MLflow's tables cost seconds a run: tests/test_long_runs.py
    return config


def copy_run(encoded_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(encoded_run, run)
    return run


def edit_encode_manifest(run: Path, **properties) -> None:
    """The tables were edited by hand: say so in the encode manifest, which train-ar plans from
    (no properties at all: train-ar reads the tables, as for an older encode manifest)."""
    path = run / "codes" / "_manifest.json"
    manifest = json.loads(path.read_text())
    if properties:
        manifest["properties"].update(properties)
    else:
        manifest.pop("properties")
    path.write_text(json.dumps(manifest))


def losses(ar_dir: Path) -> list[float]:
    return [m["loss"] for m in metrics(ar_dir) if "event" not in m]


def test_soft_targets_without_latents_is_a_clear_error(encoded_run, tmp_path):
    run = copy_run(encoded_run, tmp_path)
    for table in (run / "codes").glob("*.parquet"):
        pq.write_table(pq.read_table(table).drop_columns(["latents"]), table)
    edit_encode_manifest(run, latents=False)
    with pytest.raises(ValueError, match="with_latents=true"):
        run_train_ar_stage(str(run), ar_config(targets="soft"))


def test_codebook_from_another_vae_is_refused(encoded_run, tmp_path):
    run = copy_run(encoded_run, tmp_path)
    torch.manual_seed(1)
    RQVAE(RQVAEConfig.preset("tiny")).save_pretrained(str(tmp_path / "other-vae"))
    with pytest.raises(ValueError, match=r"were encoded with RQ-VAE .* but .*other-vae"):
        run_train_ar_stage(str(run), ar_config(vae=str(tmp_path / "other-vae")))


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="targets"):
        load_config(TrainARConfig, None, ["targets=fuzzy"])
    with pytest.raises(ConfigError, match="codebook_size comes from the code tables"):
        load_config(TrainARConfig, None, ["model.codebook_size=512"])
    with pytest.raises(ConfigError, match="unknown RQ-Transformer config keys"):
        load_config(TrainARConfig, None, ["model.widht=64"])
    with pytest.raises(ConfigError, match=r"strategy='zero3': use one of \['ddp', 'fsdp'\]"):
        load_config(TrainARConfig, None, ["strategy=zero3"])


@pytest.mark.slow
def test_a_killed_driver_resubmitted_trains_the_uninterrupted_model(encoded_run, ray_local,
                                                                    tmp_path):  # fmt: skip
    """`jobs/train_ar.py` on two workers, its driver SIGKILLed at a random moment after a
    checkpoint is committed: the same command resumes the step count (not from scratch) and
    exports the weights of an uninterrupted run of the config, bit for bit, with the same
    figures at every step logged after the resume (exact resumption). The model learns from
    the local tables and exports; the command once more is a no-op. The uninterrupted run also
    averages the weights (ema_decay), which changes nothing of training: its model-raw/ is what
    is compared, its model/ is the average, validated beside the raw weights."""
    run, reference = copy_run(encoded_run, tmp_path), tmp_path / "reference"
    shutil.copytree(encoded_run, reference)
    overrides = ["steps=24", "batch_size=8", "lr=2e-3", "warmup_steps=2", "num_workers=2",
                 "cpus_per_worker=0.5", "checkpoint_every=8", "log_every=4",
                 "preview_per_class=2", "tracking.backend=none"]  # fmt: skip
    address = ray_local.get_runtime_context().gcs_address
    command = [sys.executable, str(REPO / "jobs" / "train_ar.py"), "--run-dir", str(run),
               "--ray-address", address, *overrides]  # fmt: skip
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    deadline = time.time() + 180
    while not committed_checkpoints(run / "ar") and time.time() < deadline:
        time.sleep(0.05)
    delay = random.uniform(0.0, 1.0)  # anywhere before the next checkpoint, or past it
    print(f"killing the driver {delay:.2f} s after the first checkpoint")
    time.sleep(delay)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert committed_checkpoints(run / "ar") and not (run / "ar" / "_manifest.json").exists()

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    logged = metrics(run / "ar")
    events = [m for m in logged if m.get("event") == "resumed"]
    assert len(events) == 1 and events[0]["step"] >= 8, events
    after = [m["step"] for m in logged[logged.index(events[0]) + 1 :]]
    assert after[0] > events[0]["step"] and after[-1] == 24, after  # continued, not restarted
    records = [m for m in logged if "event" not in m]
    assert [m["step"] for m in records] == [4, 8, 12, 16, 20, 24]
    assert records[-1]["loss"] < records[0]["loss"] - 0.5, [m["loss"] for m in records]
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    assert {"loss_d1", "loss_d4", "tokens_per_s_per_worker", "grad_norm", "lr",
            "model_tflops_per_s_per_worker"} <= set(records[0])  # fmt: skip
    assert "mfu" not in records[0]  # a CPU has no peak in the table: FLOP/s only
    manifest = json.loads((run / "ar" / "_manifest.json").read_text())
    assert manifest["upstream"]["encode"] == json.loads(
        (run / "codes" / "_manifest.json").read_text())["fingerprint"]  # fmt: skip
    assert manifest["counts"]["num_classes"] == 4
    assert (run / "ar" / "samples.png").exists() and (run / "ar" / "config.yaml").exists()

    model = RQTransformer.from_pretrained(str(run / "ar" / "model"))
    assert model.config.code_shape == [8, 8, 4] and model.config.num_classes == 4
    vae = RQVAE.from_pretrained(str(run / "vae" / "model"))
    assert torch.equal(model.code_embeddings, vae.quantizer.codebooks)  # frozen, from the VAE
    assert model.generate(labels=[0, 3]).shape == (2, 8, 8, 4)

    weights = (run / "ar" / "model" / "model.safetensors").stat().st_mtime_ns
    run_train_ar_stage(str(run), load_config(TrainARConfig, None, overrides))  # up to date
    assert (run / "ar" / "model" / "model.safetensors").stat().st_mtime_ns == weights

    run_train_ar_stage(str(reference),
                       load_config(TrainARConfig, None, [*overrides, "ema_decay=0.9"]))  # fmt: skip
    assert (run / "ar" / "model" / "model.safetensors").read_bytes() == (
        reference / "ar" / "model-raw" / "model.safetensors").read_bytes()  # fmt: skip
    same_results(logged, metrics(reference / "ar"), after=events[0]["step"])
    average = RQTransformer.from_pretrained(str(reference / "ar" / "model"))
    assert not torch.equal(average.head.weight, model.head.weight)
    last = metrics(reference / "ar")[-1]
    assert last["val_loss"] != last["val_loss_raw"]


@pytest.mark.slow
def test_unlabeled_tables_and_soft_targets(encoded_run, tmp_path):
    """The other paths than the class model's on hard codes: tables without labels (an
    unconditional model), soft targets from latents."""
    run = copy_run(encoded_run, tmp_path)
    for path in (run / "codes").glob("*.parquet"):
        table = pq.read_table(path)
        nulls = pa.nulls(len(table), pa.int32())
        table = table.set_column(table.schema.get_field_index("label"), "label", nulls)
        pq.write_table(table, path)
    edit_encode_manifest(run)  # read from the tables themselves
    config = ar_config(num_workers=1, cpus_per_worker=1.0, steps=16, log_every=8,
                       checkpoint_every=16, preview_per_class=2, targets="soft")  # fmt: skip
    manifest = run_train_ar_stage(str(run), config)
    trained = RQTransformer.from_pretrained(str(run / "ar" / "model"))

    # Soft targets learn. Validation is scored on the training targets (soft), with the
    # hard-code NLL beside it: the soft cross-entropy includes the targets' entropy, so the two
    # figures differ.
    loss = losses(run / "ar")
    assert all(torch.isfinite(torch.tensor(loss))) and loss[-1] < loss[0], loss
    logged = [m for m in metrics(run / "ar") if "val_loss" in m]
    assert logged and all("val_loss_hard" in m for m in logged)
    assert all(m["val_loss"] != pytest.approx(m["val_loss_hard"], rel=1e-3) for m in logged)

    # No labels: an unconditional model, previewed as rows of unconditional samples.
    assert manifest.counts["num_classes"] == 0 and trained.config.num_classes == 0
    with pytest.raises(ValueError, match="unconditional"):
        trained.generate(labels=[0])
    assert trained.generate(num_samples=2).shape == (2, 8, 8, 4)
    assert (run / "ar" / "samples.png").exists()


def test_weight_decay_only_on_linear_weights():
    from model.training import build_optimizer

    config = ar_config(weight_decay=0.1)
    model = RQTransformer(config.model_config([2, 2, 2], 16, 3), torch.randn(16, 8))
    decayed, plain = build_optimizer(model, config).param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    plain_names = {names[id(p)] for p in plain["params"]}
    for embedding in ("class_embedding.weight", "pos_embedding", "depth_embedding"):
        assert embedding in plain_names
    assert all(n.endswith(".weight") and "ln" not in n for n in decayed_names), decayed_names
    assert "head.weight" in decayed_names and "proj_spatial.weight" in decayed_names
    assert len(decayed_names) + len(plain_names) == len(list(model.parameters()))


def test_one_batch_of_class_sorted_tables_spans_the_classes(ray_local, tmp_path):
    """Tables that each hold one class (a class-sorted corpus sharded in order): the stage's
    dataset and its workers' batches (random table order + shuffle buffer) mix them."""
    import numpy as np

    from pipeline.core.training import shuffled_batches
    from pipeline.formats.codes_table import CodeTables
    from pipeline.stages.train_ar import train_dataset

    shape, paths = [2, 2, 2], []
    for i in range(8):  # 2 tables per class, 64 rows each
        label = i // 2
        codes = pa.array(np.full((64, 8), i, np.uint16).tolist(), pa.list_(pa.uint16(), 8))
        table = pa.table({"key": [f"{i}-{r}" for r in range(64)], "codes": codes,
                          "label": pa.array([label] * 64, pa.int32())})  # fmt: skip
        paths.append(str(tmp_path / f"train-{i:06d}.parquet"))
        pq.write_table(table, paths[-1])
    # the folder is read as a listing: its other tables are skipped, not trained on
    pq.write_table(table, tmp_path / "val-000000.parquet")
    tables = CodeTables(paths, [], shape, 16, "fp", 4, False, 512, 512)
    dataset = train_dataset(Storage(), tables, ["codes", "label"])
    assert dataset.count() == 8 * 64
    config = ar_config(batch_size=64)
    first = next(iter(shuffled_batches(dataset, config.batch_size, config.shuffle_buffer, "cpu")))
    assert first["codes"].shape == (64, 2, 2, 2)
    assert set(first["label"].tolist()) == {0, 1, 2, 3}
    assert len(set(first["codes"][:, 0, 0, 0].tolist())) >= 6  # rows from most of the 8 tables
    # without the buffer, a batch is one table's rows: one class
    plain = next(iter(shuffled_batches(dataset, 64, 0, "cpu")))
    assert len(set(plain["label"].tolist())) == 1
