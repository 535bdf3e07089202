"""`rqpipe import-official`: official-layout checkpoints (tests/official_layout.py) imported and
checked against what the official models compute; refusals; the pipeline from an imported
RQ-VAE. Nothing is downloaded: the state dicts are built from the published configs."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from model.rqtransformer import RQTransformer, RQTransformerConfig
from model.rqvae import RQVAE, RQVAEConfig
from model.weights import official
from pipeline.cli import main
from tests.official_layout import (
    PUBLISHED_RQTRANSFORMERS,
    PUBLISHED_RQVAE_IN256,
    PUBLISHED_RQVAES,
    SMALL_RQVAE,
    official_rqtransformer_state,
    official_rqvae_state,
    published_rqtransformer,
    published_rqvae,
    reference_rqtransformer,
    reference_rqvae,
    small_rqtransformer,
)

REPO = Path(__file__).resolve().parents[1]


def write_official(tmp_path: Path, name: str, document: dict, state: dict, **extra) -> tuple:
    checkpoint, config = tmp_path / f"{name}.pt", tmp_path / f"{name}.yaml"
    torch.save({"state_dict": state, **extra}, checkpoint)
    config.write_text(yaml.safe_dump(document))
    return str(checkpoint), str(config)


@pytest.fixture
def imported_vae(tmp_path, capsys):
    state = official_rqvae_state(SMALL_RQVAE)
    checkpoint, config = write_official(tmp_path, "stage1", SMALL_RQVAE, state,
                                        discriminator={"w": torch.zeros(2)}, epoch=3,
                                        optimizer={"state": {}, "param_groups": []})  # fmt: skip
    out = tmp_path / "rqvae"
    assert main(["import-official", "--kind", "rqvae", "--checkpoint", checkpoint,
                 "--config", config, "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "dropped optimizer" in printed and "dropped discriminator" in printed
    assert "dropped quantizer.codebooks.0.weight[32]: padding row" in printed
    return state, out


def test_published_configs_are_the_paper_presets():
    """Every released model's config imports to the rqpipe preset of the same name."""
    assert official.rqvae_config(PUBLISHED_RQVAE_IN256) == RQVAEConfig.preset("imagenet256-8x8x4")
    for preset, shape in PUBLISHED_RQVAES.items():
        assert official.rqvae_config(published_rqvae(*shape)) == RQVAEConfig.preset(preset)
    for preset, shape in PUBLISHED_RQTRANSFORMERS.items():
        imported = official.rqtransformer_config(published_rqtransformer(*shape))
        assert imported == RQTransformerConfig.preset(preset), preset


def test_rqvae_import_computes_what_the_official_model_computes(imported_vae):
    state, out = imported_vae
    record = json.loads((out / "import.json").read_text())
    assert record["tensors_imported"] + sum("[" not in k for k in record["dropped_tensors"]) \
        == len(state)  # every official tensor is used or listed  # fmt: skip
    ours = RQVAE.from_pretrained(str(out))
    assert ours.config.ema_update == "per_depth"  # the official schedule

    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents, codes, recon = reference_rqvae(state, SMALL_RQVAE, images)
    assert len(codes.unique()) > 10  # the check is not vacuous
    torch.testing.assert_close(ours.encode_latents(images), latents, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours.encode(images), codes)
    torch.testing.assert_close(ours.decode_codes(codes), recon, rtol=1e-4, atol=1e-4)
    # The EMA state came along (fine-tuning continues it): book 0 is every depth's book
    assert torch.equal(ours.quantizer.ema_count[0], state["quantizer.codebooks.0.cluster_size_ema"])
    assert torch.equal(ours.quantizer.ema_sum[0], state["quantizer.codebooks.2.embed_ema"])


@pytest.mark.parametrize("classes", [10, 1])  # class-conditional; unconditional (a start token)
def test_rqtransformer_import_gives_the_official_logits(imported_vae, tmp_path, classes):
    _, vae_dir = imported_vae
    document = small_rqtransformer(classes)
    state = official_rqtransformer_state(document)
    checkpoint, config = write_official(tmp_path, "stage2", document, state)
    out = tmp_path / "ar"
    assert main(["import-official", "--kind", "rqtransformer", "--checkpoint", checkpoint,
                 "--config", config, "--out", str(out), "--rqvae", str(vae_dir)]) == 0  # fmt: skip
    ours = RQTransformer.from_pretrained(str(out))
    codebook = RQVAE.from_pretrained(str(vae_dir)).quantizer.codebooks[0]
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 32, (3, 4, 4, 3), generator=g)
    cond = torch.randint(0, classes, (3,), generator=g) if classes > 1 else None
    expected = reference_rqtransformer(state, document, codes, cond, codebook)
    torch.testing.assert_close(ours(codes, cond), expected, rtol=1e-4, atol=1e-4)
    # Sampling runs on it (no guidance: the paper's models have no no-label row)
    labels = [0, 1] if classes > 1 else None
    assert ours.generate(num_samples=2, labels=labels, top_k=4).shape == (2, 4, 4, 3)
    with pytest.raises(ValueError, match="cfg_scale=1"):
        ours.generate(labels=[0, 1], cfg_scale=2.0) if classes > 1 else ours._sampling_plan(
            2, [0, 0], 1.0, None, None, 2.0, None)  # fmt: skip


def test_wrong_shape_unknown_and_missing_tensors_are_refused_by_name(tmp_path):
    cfg = official.rqvae_config(SMALL_RQVAE)
    state = official_rqvae_state(SMALL_RQVAE)
    bad = dict(state, **{"encoder.conv_in.weight": torch.zeros(64, 3, 3, 3)})
    with pytest.raises(official.OfficialFormatError, match=r"encoder\.conv_in\.weight"):
        official.import_rqvae(bad, cfg)
    with pytest.raises(official.OfficialFormatError, match=r"encoder\.down\.0\.attn\.7\.q"):
        official.import_rqvae(dict(state, **{"encoder.down.0.attn.7.q.weight": torch.zeros(1)}),
                              cfg)  # fmt: skip
    missing = {k: v for k, v in state.items() if k != "decoder.up.1.upsample.conv.bias"}
    with pytest.raises(official.OfficialFormatError, match=r"decoder\.up\.1\.upsample\.conv\.bias"):
        official.import_rqvae(missing, cfg)
    # A shared codebook whose copies differ is not what the config says
    split = dict(state, **{"quantizer.codebooks.1.weight": torch.zeros(33, 16)})
    with pytest.raises(official.OfficialFormatError, match="shared_codebook"):
        official.import_rqvae(split, cfg)
    # Through the command: one line naming the tensor, exit status 1
    checkpoint, config = write_official(tmp_path, "bad", SMALL_RQVAE, bad)
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "import-official", "--kind",
                             "rqvae", "--checkpoint", checkpoint, "--config", config, "--out",
                             str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 1 and "encoder.conv_in.weight" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_caption_conditioned_import_gives_the_official_logits(imported_vae, tmp_path):
    """The CC-3M form: a caption of L tokens conditions the model and is itself predicted."""
    _, vae_dir = imported_vae
    document = small_rqtransformer(50, text_length=5)
    state = official_rqtransformer_state(document)
    checkpoint, config = write_official(tmp_path, "t2i", document, state)
    assert main(["import-official", "--kind", "rqtransformer", "--checkpoint", checkpoint,
                 "--config", config, "--out", str(tmp_path / "t2i"), "--rqvae",
                 str(vae_dir)]) == 0  # fmt: skip
    ours = RQTransformer.from_pretrained(str(tmp_path / "t2i"))
    assert (ours.config.text_vocab_size, ours.config.text_length) == (50, 5)
    codebook = RQVAE.from_pretrained(str(vae_dir)).quantizer.codebooks[0]
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 32, (2, 4, 4, 3), generator=g)
    text = torch.randint(0, 50, (2, 5), generator=g)
    logits, text_logits = reference_rqtransformer(state, document, codes, text, codebook)
    ours_logits, ours_text = ours(codes, text=text, return_text_logits=True)
    torch.testing.assert_close(ours_logits, logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours_text, text_logits, rtol=1e-4, atol=1e-4)
    # The cached sampler (caption prefilled into the KV caches) draws what the uncached does
    cached = ours.generate(text=text, top_k=8, generator=torch.Generator().manual_seed(0))
    uncached = ours.generate(text=text, top_k=8, generator=torch.Generator().manual_seed(0),
                             use_cache=False)  # fmt: skip
    assert torch.equal(cached, uncached)
    with pytest.raises(ValueError, match="text-conditioned"):
        ours(codes, torch.tensor([0, 1]))


def test_unsupported_configs_and_wrong_kinds_are_refused(tmp_path):
    per_depth_heads = copy.deepcopy(small_rqtransformer(10))
    per_depth_heads["arch"]["shared_cls_emb"] = False
    with pytest.raises(official.OfficialFormatError, match="shared_cls_emb"):
        official.rqtransformer_config(per_depth_heads)
    gelu2 = copy.deepcopy(small_rqtransformer(10))
    gelu2["arch"]["body"]["block"]["gelu"] = "v2"
    with pytest.raises(official.OfficialFormatError, match="gelu"):
        official.rqtransformer_config(gelu2)
    with pytest.raises(official.OfficialFormatError, match="--kind rqtransformer"):
        official.rqvae_config(small_rqtransformer(10))
    checkpoint, config = write_official(tmp_path, "ar", small_rqtransformer(10),
                                        official_rqtransformer_state(small_rqtransformer(10)))  # fmt: skip
    assert main(["import-official", "--kind", "rqtransformer", "--checkpoint", checkpoint,
                 "--config", config, "--out", str(tmp_path / "o")]) == 1  # no --rqvae  # fmt: skip


class Payload:
    """Unpickling this would create a file: weights_only=True must never run it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoints_are_never_unpickled(tmp_path, capsys):
    marker = tmp_path / "pwned"
    state = official_rqvae_state(SMALL_RQVAE)
    checkpoint, config = write_official(tmp_path, "evil", SMALL_RQVAE, state,
                                        scheduler=Payload(str(marker)))  # fmt: skip
    assert main(["import-official", "--kind", "rqvae", "--checkpoint", checkpoint,
                 "--config", config, "--out", str(tmp_path / "out")]) == 1  # fmt: skip
    assert "refused to unpickle" in capsys.readouterr().err
    assert not marker.exists()


def test_ema_weights_and_bare_state_dicts(tmp_path):
    state = official_rqvae_state(SMALL_RQVAE)
    ema = official_rqvae_state(SMALL_RQVAE, seed=5)
    checkpoint, config = write_official(tmp_path, "both", SMALL_RQVAE, state, state_dict_ema=ema)
    assert main(["import-official", "--kind", "rqvae", "--checkpoint", checkpoint, "--config",
                 config, "--out", str(tmp_path / "ema"), "--ema"]) == 0  # fmt: skip
    imported = RQVAE.from_pretrained(str(tmp_path / "ema"))
    assert torch.equal(imported.quant_conv.weight, ema["quant_conv.weight"])
    torch.save(state, tmp_path / "bare.pt")  # a plain state dict, as some re-uploads have it
    assert main(["import-official", "--kind", "rqvae", "--checkpoint", str(tmp_path / "bare.pt"),
                 "--config", config, "--out", str(tmp_path / "bare")]) == 0  # fmt: skip
    assert torch.equal(RQVAE.from_pretrained(str(tmp_path / "bare")).quant_conv.weight,
                       state["quant_conv.weight"])  # fmt: skip


@pytest.mark.slow
def test_pipeline_from_an_imported_rqvae(imported_vae, ray_local, tmp_path):
    """shard -> (imported RQ-VAE, no training) -> encode -> train-ar -> sample, via `rqpipe run`
    in its own process (on the tests' Ray instance: `make demo` starts a local one), as a user
    would: the codes come from the imported model. The input is class folders with
    configs/demo.yaml, the README's "your data" command: a class model."""
    from pipeline.demo.data import DEMO_CLASSES, write_demo_dataset

    _, vae_dir = imported_vae
    write_demo_dataset(tmp_path / "in", per_class=6)
    (tmp_path / "in.csv").unlink()  # the folders alone, no listing
    run = tmp_path / "run"
    command = [sys.executable, "-m", "pipeline.cli", "run", "--input", str(tmp_path / "in"),
               "--run-dir", str(run), "--config", "configs/demo.yaml",
               "--ray-address", ray_local.get_runtime_context().gcs_address,
               f"train_vae.pretrained={vae_dir}", "shard.val_fraction=0.2",
               "train_ar.steps=2", "train_ar.batch_size=4", "train_ar.log_every=1",
               "train_ar.checkpoint_every=2", "train_ar.preview_per_class=1",
               "train_ar.tracking.backend=none",  # MLflow is tested in test_long_runs.py
               "sample.num_samples=4", "sample.chunk_size=2",
               "sample.grid_size=2", "evaluate.enabled=false"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0] == (
        "rqpipe plan: the input is a folder with labels: the RQ-Transformer will be conditioned "
        "on class labels (auto)"
    )
    assert "using " in result.stdout and "(no training)" in result.stdout
    config = json.loads((run / "ar" / "model" / "config.json").read_text())["config"]
    assert config["num_classes"] == 4 and not config["text_vocab_size"]
    assert not (run / "ar" / "model" / "tokenizer.json").exists()
    assert sorted(g.name for g in (run / "samples").glob("grid-*.png")) == [
        f"grid-{i}-{name}.png" for i, name in enumerate(sorted(DEMO_CLASSES))
    ]
    manifest = json.loads((run / "vae" / "_manifest.json").read_text())
    assert manifest["counts"]["steps"] == 0 and "pretrained" in manifest["upstream"]
    assert (run / "vae" / "reconstructions.png").exists()
    assert json.loads((run / "vae" / "model" / "import.json").read_text())["kind"] == "rqvae"
    imported = RQVAE.from_pretrained(str(vae_dir))
    ours = RQVAE.from_pretrained(str(run / "vae" / "model"))
    theirs = imported.state_dict()
    assert all(torch.equal(theirs[name], value) for name, value in ours.state_dict().items())
    assert len(list((run / "samples").glob("*.png"))) >= 1
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    statuses = [line for line in again.stdout.splitlines() if line.startswith("rqpipe run: ")]
    assert again.returncode == 0 and len(statuses) == 5
    assert all("up to date" in line for line in statuses), statuses


@pytest.mark.slow
def test_rqpipe_sample_draws_from_imported_models(imported_vae, ray_local, tmp_path):
    """The paper's models through the sample stage: an imported class-conditional
    RQ-Transformer and its RQ-VAE, given as sample.ar / sample.vae; a caption model needs
    prompts and the tokenizer it was trained with beside it."""
    from pipeline.stages.sample import SampleConfig, run_sample_stage

    _, vae_dir = imported_vae
    for name, document in (("cin", small_rqtransformer(10)),
                           ("t2i", small_rqtransformer(50, text_length=5))):  # fmt: skip
        document["arch"]["block_size"] = [8, 8, 3]  # the small RQ-VAE's code shape
        checkpoint, config = write_official(tmp_path, name, document,
                                            official_rqtransformer_state(document))  # fmt: skip
        assert main(["import-official", "--kind", "rqtransformer", "--checkpoint", checkpoint,
                     "--config", config, "--out", str(tmp_path / name), "--rqvae",
                     str(vae_dir)]) == 0  # fmt: skip
    config = SampleConfig(num_samples=4, labels=[3, 7], chunk_size=2, grid_size=2, top_k=8,
                          ar=str(tmp_path / "cin"), vae=str(vae_dir), cpus_per_actor=0.5)  # fmt: skip
    manifest = run_sample_stage(str(tmp_path / "run"), config)
    assert manifest.counts["samples"] == 4
    pngs = sorted((tmp_path / "run" / "samples").rglob("*.png"))
    assert len(pngs) >= 4
    config.ar = str(tmp_path / "t2i")
    with pytest.raises(ValueError, match="text-conditioned: give prompts, not labels"):
        run_sample_stage(str(tmp_path / "run2"), config)
    config.labels, config.prompts = None, ["a caption"]
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json beside"):
        run_sample_stage(str(tmp_path / "run2"), config)


def test_pretrained_and_init_from_exclude_each_other():
    from pipeline.stages.train_vae import TrainVAEConfig

    with pytest.raises(ValueError, match="not both"):
        TrainVAEConfig(pretrained="models/a", init_from="models/b")
    TrainVAEConfig(pretrained="hf://org/rqvae").preflight()  # a Hub model is fetched at run time
    with pytest.raises(FileNotFoundError, match=r"train_vae\.pretrained="):
        TrainVAEConfig(pretrained="/nonexistent/model").preflight()
