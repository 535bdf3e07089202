import dataclasses
import json

import pytest
import torch

from model.rqvae import RQVAE, RQVAEConfig


def smooth_images(n: int, seed: int = 0) -> torch.Tensor:
    """Low-frequency random colour fields in [-1, 1], (n, 3, 32, 32)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=32, mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def overfit_run():
    """A tiny RQ-VAE trained on 8 images: (model, images, first loss, last loss)."""
    torch.manual_seed(0)
    model = RQVAE(RQVAEConfig.preset("tiny"))
    images = smooth_images(8)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)  # 2e-3 learns nothing past depth 1
    losses = []
    for _ in range(150):
        out = model(images)
        loss = (out.recon - images).abs().mean() + 0.25 * out.commitment_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append((out.recon - images).abs().mean().item())
    return model.eval(), images, losses[0], losses[-1]


def test_tiny_rqvae_overfits_a_handful_of_images(overfit_run):
    _, _, first, last = overfit_run
    assert last < first / 4, (first, last)


def test_coarse_to_fine_decoding(overfit_run):
    model, images, _, _ = overfit_run
    codes = model.encode(images)
    assert codes.shape == (8, 8, 8, 4) and codes.dtype == torch.int64
    errors = [(model.decode_codes(codes, d) - images).pow(2).mean().item() for d in (1, 2, 4)]
    assert errors[0] > errors[1] > errors[2], errors
    # Depths 2-4 must earn their bits: measured 0.26x (0.97x before the init and lr fixes).
    assert errors[2] <= 0.5 * errors[0], errors


@pytest.mark.parametrize("base", ["local", "memory"])
def test_save_load_round_trip_gives_identical_codes(overfit_run, tmp_path, base):
    model, images, _, _ = overfit_run
    uri = str(tmp_path / "vae") if base == "local" else "memory://rqpipe-test/vae"
    model.save_pretrained(uri)
    loaded = RQVAE.from_pretrained(uri)
    assert torch.equal(loaded.encode(images), model.encode(images))
    assert loaded.config == model.config
    if base == "local":
        document = json.loads((tmp_path / "vae" / "config.json").read_text())
        assert document["model_type"] == "rqvae" and document["config"]["code_depth"] == 4
        written = sorted(p.name for p in (tmp_path / "vae").iterdir())
        assert written == ["config.json", "model.safetensors"], "no temporaries left"


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        RQVAE.from_pretrained(str(tmp_path / "nothing"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "rqtransformer"}')
    with pytest.raises(ValueError, match="not a 'rqvae' model"):
        RQVAE.from_pretrained(str(tmp_path / "other"))


def test_config_presets_and_validation():
    paper = RQVAEConfig.preset("imagenet256-8x8x4")
    assert paper.code_shape == (8, 8, 4) and paper.codebook_size == 16384
    assert paper.downsample_factor == 32
    assert RQVAEConfig.preset("tiny").code_shape == (8, 8, 4)
    with pytest.raises(KeyError, match="unknown RQ-VAE preset"):
        RQVAEConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown RQ-VAE config keys"):
        RQVAEConfig.from_dict({"chanels": 3})
    with pytest.raises(ValueError, match="not divisible"):
        RQVAEConfig(resolution=100)


def test_paper_preset_names_every_field():
    """The paper's preset does not lean on dataclass defaults: changing a default for the
    CPU presets must not change the paper's model."""
    fields = {f.name for f in dataclasses.fields(RQVAEConfig)}
    assert set(RQVAEConfig.presets["imagenet256-8x8x4"]) == fields


def test_wrong_image_shape_is_a_clear_error():
    model = RQVAE(RQVAEConfig.preset("tiny"))
    with pytest.raises(ValueError, match="expected images"):
        model.encode(torch.zeros(1, 3, 64, 64))
