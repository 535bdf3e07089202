import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from model.rqtransformer import RQTransformer, RQTransformerConfig
from model.rqvae import RQVAE
from pipeline.cli import main
from pipeline.formats.codes_table import codes_array, table_metadata
from pipeline.stages.sample import SampleConfig, run_sample_stage


def sample_config(**kw) -> SampleConfig:
    values = dict(num_samples=10, chunk_size=4, num_actors=2, cpus_per_actor=0.5, top_k=32)
    values.update(kw)
    return SampleConfig(**values)


def sampled_codes(out: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(out / "codes")
    table = table.replace_schema_metadata(pq.read_schema(next((out / "codes").iterdir())).metadata)
    return dict(zip(table.column("key").to_pylist(), codes_array(table), strict=True))


def test_writes_images_grids_and_a_codes_table(sampled_run):
    manifest = run_sample_stage(str(sampled_run), sample_config())
    out = sampled_run / "samples"
    pngs = sorted((out / "images").glob("*.png"))
    assert [p.name for p in pngs] == [f"sample-{i:06d}.png" for i in range(10)]
    for png in pngs:
        with Image.open(png) as image:
            assert image.size == (32, 32) and image.mode == "RGB"
    grids = sorted(p.name for p in out.glob("grid-*.png"))
    assert grids == ["grid-0-circle.png", "grid-1-cross.png", "grid-2-square.png",
                     "grid-3-triangle.png"]  # fmt: skip

    encoded = next((sampled_run / "codes").glob("*.parquet"))
    sampled = next((out / "codes").glob("*.parquet"))
    expected_schema = pq.read_schema(encoded).remove(
        pq.read_schema(encoded).get_field_index("latents")
    )
    assert pq.read_schema(sampled).remove_metadata().equals(expected_schema.remove_metadata())
    meta = table_metadata(pq.read_schema(sampled))
    assert meta["code_shape"] == [8, 8, 4] and meta["codebook_size"] == 256
    assert meta["vae_fingerprint"] == table_metadata(pq.read_schema(encoded))["vae_fingerprint"]
    labels = pq.read_table(out / "codes").column("label").to_pylist()
    assert sorted(labels) == sorted([i % 4 for i in range(10)])

    report = json.loads((out / "sampling.json").read_text())
    assert report["samples"] == 10 and report["samples_per_s"] > 0
    assert manifest.counts == {"samples": 10, "chunks": 3}

    # The decoded PNG is the VAE's decoding of the stored codes.
    vae = RQVAE.from_pretrained(str(sampled_run / "vae" / "model"))
    codes = sampled_codes(out)["sample-000003"]
    decoded = ((vae.decode_codes(torch.tensor(codes)[None]).clamp(-1, 1) + 1) * 127.5).round()
    decoded = decoded[0].permute(1, 2, 0).to(torch.uint8).numpy()
    assert np.array_equal(np.asarray(Image.open(out / "images" / "sample-000003.png")), decoded)


def test_same_seed_same_images_whatever_the_actor_count(sampled_run, tmp_path):
    run_sample_stage(str(sampled_run), sample_config(seed=7, out=str(tmp_path / "a")))
    run_sample_stage(str(sampled_run), sample_config(seed=7, num_actors=1,
                                                     out=str(tmp_path / "b")))  # fmt: skip
    run_sample_stage(str(sampled_run), sample_config(seed=8, out=str(tmp_path / "c")))
    a, b, c = (sampled_codes(tmp_path / x) for x in "abc")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    for key in a:
        assert (tmp_path / "a" / "images" / f"{key}.png").read_bytes() == (
            tmp_path / "b" / "images" / f"{key}.png").read_bytes()  # fmt: skip
    assert sum(not np.array_equal(a[k], c[k]) for k in a) >= 9


def test_labels_reach_the_model(sampled_run, tmp_path):
    for label in (0, 1):
        run_sample_stage(str(sampled_run), sample_config(labels=[label], num_samples=4,
                                                         out=str(tmp_path / f"l{label}")))  # fmt: skip
    zero, one = sampled_codes(tmp_path / "l0"), sampled_codes(tmp_path / "l1")
    assert all(not np.array_equal(zero[k], one[k]) for k in zero)
    labels = pq.read_table(tmp_path / "l1" / "codes").column("label").to_pylist()
    assert labels == [1, 1, 1, 1]


def test_resume_redoes_only_missing_chunks_then_noops(sampled_run):
    config = sample_config()
    run_sample_stage(str(sampled_run), config)
    out = sampled_run / "samples"
    (out / "_manifest.json").unlink()  # as if the driver died before the end
    (out / "codes" / "chunk-00001.parquet").unlink()
    kept = (out / "codes" / "chunk-00000.parquet").stat().st_mtime_ns
    before = sampled_codes(out)
    run_sample_stage(str(sampled_run), config)
    assert (out / "codes" / "chunk-00000.parquet").stat().st_mtime_ns == kept
    after = sampled_codes(out)
    assert after.keys() == set(before) | {f"sample-{i:06d}" for i in range(4, 8)}
    assert json.loads((out / "sampling.json").read_text())["sampled_now"] == 4
    run_sample_stage(str(sampled_run), config)  # finished: a no-op
    assert (out / "codes" / "chunk-00000.parquet").stat().st_mtime_ns == kept


def test_cli_flags_and_class_names(sampled_run, capsys):
    argv = ["sample", "--run-dir", str(sampled_run), "--num-samples", "3", "--labels", "triangle",
            "--seed", "3", "--top-k", "16", "chunk_size=2", "cpus_per_actor=0.5"]  # fmt: skip
    assert main(argv) == 0
    labels = pq.read_table(sampled_run / "samples" / "codes").column("label").to_pylist()
    assert labels == [3, 3, 3]
    config = (sampled_run / "samples" / "config.yaml").read_text()
    assert "seed: 3" in config and "top_k: 16" in config
    assert main(["sample", "--run-dir", str(sampled_run), "--num-samples", "3", "--labels",
                 "hexagon", "--overwrite"]) == 1  # fmt: skip
    assert "label 'hexagon' is not a class" in capsys.readouterr().err


def test_unconditional_model_refuses_labels(sampled_run):
    vae = RQVAE.from_pretrained(str(sampled_run / "vae" / "model"))
    config = RQTransformerConfig.preset("tiny", code_shape=[8, 8, 4], codebook_size=256,
                                        num_classes=0)  # fmt: skip
    RQTransformer(config, vae.quantizer.codebooks).save_pretrained(
        str(sampled_run / "ar" / "model")
    )
    with pytest.raises(ValueError, match="unconditional"):
        run_sample_stage(str(sampled_run), sample_config(labels=[1]))
    run_sample_stage(str(sampled_run), sample_config(num_samples=3))
    assert (sampled_run / "samples" / "grid.png").exists()


def test_class_names_cannot_escape_and_credentials_are_not_saved(sampled_run):
    from pipeline.core.storage import StorageConfig

    hostile = {"../../escaped": 0, ".hidden/../x": 1, "a b/c": 2, "": 3}
    (sampled_run / "shards" / "labels.json").write_text(json.dumps(hostile))
    storage = StorageConfig(endpoint_url="http://AKIAEXAMPLE:s3cr3t@127.0.0.1:9/")
    run_sample_stage(str(sampled_run), sample_config(num_samples=4, storage=storage))
    out = sampled_run / "samples"
    grids = sorted(p.name for p in out.glob("grid-*.png"))
    assert grids == ["grid-0-_.._escaped.png", "grid-1-hidden_.._x.png", "grid-2-a_b_c.png",
                     "grid-3-_.png"], grids  # fmt: skip
    assert not list(sampled_run.parent.glob("escaped*")) and not list(out.glob(".*"))
    saved = (out / "config.yaml").read_text()
    assert (
        "s3cr3t" not in saved and "AKIAEXAMPLE" not in saved and "http://***@127.0.0.1:9/" in saved
    )


def test_resnets_have_torchvisions_names_and_sizes():
    from model.evaluation.resnet import ResNet

    # torchvision's documented parameter counts of the ImageNet models
    for arch, params in {"resnet18": 11_689_512, "resnet50": 25_557_032,
                         "resnet101": 44_549_160}.items():  # fmt: skip
        assert sum(p.numel() for p in ResNet(arch).parameters()) == params, arch
    names = ResNet("resnet50").state_dict()
    assert {"conv1.weight", "bn1.running_var", "layer1.0.conv3.weight",
            "layer2.0.downsample.0.weight", "layer2.0.downsample.1.bias",
            "layer4.2.bn3.weight", "fc.bias"} <= set(names)  # fmt: skip
    assert tuple(names["fc.weight"].shape) == (1000, 2048)


def test_rejection_sampling_keeps_the_best_candidate_of_each_slot(sampled_run, tmp_path):
    from model.evaluation.resnet import ResNet, load_resnet

    torch.manual_seed(0)
    checkpoint = tmp_path / "resnet18-4.pth"
    torch.save(ResNet("resnet18", num_classes=4).state_dict(), checkpoint)
    plain, rejected = tmp_path / "plain", tmp_path / "rejected"
    run_sample_stage(str(sampled_run), sample_config(num_samples=8, out=str(plain)))
    run_sample_stage(str(sampled_run), sample_config(
        num_samples=8, out=str(rejected), acceptance_rate=0.25,
        rejection_classifier=str(checkpoint), rejection_arch="resnet18"))  # fmt: skip
    assert json.loads((rejected / "sampling.json").read_text())["candidates"] == 32
    classifier = load_resnet(str(checkpoint), "resnet18")
    labels = [0, 1, 2, 3, 0, 1, 2, 3]  # every class in turn

    def scores(out: Path) -> torch.Tensor:
        pixels = np.stack([np.asarray(Image.open(out / "images" / f"sample-{i:06d}.png"))
                           for i in range(8)])  # fmt: skip
        with torch.no_grad():
            logits = classifier(torch.from_numpy(pixels).permute(0, 3, 1, 2))
        return logits.log_softmax(1)[torch.arange(8), torch.tensor(labels)]

    # The first of each slot's 4 candidates is the plain run's sample: the kept one scores as
    # well or better, and strictly better somewhere.
    kept, first = scores(rejected), scores(plain)
    assert (kept >= first - 1e-4).all() and (kept > first + 1e-4).any()
    with pytest.raises(ValueError, match="needs rejection_classifier"):
        sample_config(acceptance_rate=0.05)
    with pytest.raises(FileNotFoundError, match="no such file"):
        sample_config(
            acceptance_rate=0.05, rejection_classifier=str(tmp_path / "no.pth")
        ).preflight()
