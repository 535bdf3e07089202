import pytest
import torch
from safetensors.torch import save_file

from model.losses import (
    _VGG16_CONVS,
    PatchDiscriminator,
    PerceptualLoss,
    VAELoss,
    VAELossConfig,
    adaptive_generator_weight,
    hinge_discriminator_loss,
    reconstruction_loss,
)


def random_lpips_weights(path, seed=0):
    torch.manual_seed(seed)
    state = {}
    for i, (cin, cout) in _VGG16_CONVS.items():
        state[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3) * (2 / (9 * cin)) ** 0.5
        state[f"features.{i}.bias"] = torch.zeros(cout)
    for j, c in enumerate((64, 128, 256, 512, 512)):
        state[f"lin{j}.weight"] = torch.rand(1, c, 1, 1)
    save_file(state, str(path))


def test_reconstruction_losses():
    a, b = torch.zeros(2, 3), torch.full((2, 3), 2.0)
    assert reconstruction_loss(a, b, "l1") == 2.0
    assert reconstruction_loss(a, b, "mse") == 4.0
    with pytest.raises(ValueError, match="recon_loss"):
        reconstruction_loss(a, b, "huber")


def test_hinge_discriminator_loss_values():
    confident = hinge_discriminator_loss(torch.full((4,), 2.0), torch.full((4,), -2.0))
    assert confident == 0.0
    undecided = hinge_discriminator_loss(torch.zeros(4), torch.zeros(4))
    assert undecided == 1.0


def test_adaptive_weight_is_gradient_norm_ratio():
    w = torch.nn.Parameter(torch.ones(3))
    nll = (torch.tensor([3.0, 0.0, 4.0]) * w).sum()  # grad norm 5
    gan = (torch.tensor([0.0, 0.5, 0.0]) * w).sum()  # grad norm 0.5
    weight = adaptive_generator_weight(nll, gan, w)
    assert torch.isclose(weight, torch.tensor(5.0 / (0.5 + 1e-4)))
    assert adaptive_generator_weight(nll, gan, w, max_weight=2.0) == 2.0


def test_patch_discriminator_gives_a_logit_map():
    logits = PatchDiscriminator(channels=16)(torch.zeros(2, 3, 64, 64))
    assert logits.shape[:2] == (2, 1) and logits.shape[-1] > 1


def test_perceptual_loss_needs_weights_only_when_asked():
    VAELoss(VAELossConfig(perceptual_weight=0.0))  # no weights needed
    with pytest.raises(FileNotFoundError, match="perceptual_weights_path"):
        VAELoss(VAELossConfig(perceptual_weight=1.0))


def test_perceptual_loss_from_user_weights(tmp_path):
    path = tmp_path / "lpips.safetensors"
    random_lpips_weights(path)
    loss = PerceptualLoss(str(path))
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert loss(x, x + 0.3 * torch.randn_like(x)).item() > 0.0
    save_file({"features.0.weight": torch.zeros(64, 3, 3, 3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="LPIPS-VGG16"):
        PerceptualLoss(str(tmp_path / "bad.safetensors"))


def test_generator_loss_terms_and_gan_start():
    torch.manual_seed(0)
    last = torch.nn.Conv2d(4, 3, 3, padding=1)
    feats = torch.randn(2, 4, 32, 32)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    loss = VAELoss(VAELossConfig(gan_start_step=10, disc_channels=8))
    commit = torch.tensor(0.4)
    _, before = loss.generator_loss(images, last(feats), commit, 0.25, 5, last.weight)
    assert "gan" not in before
    assert before["loss"] == pytest.approx(before["recon"] + 0.25 * 0.4, rel=1e-5)
    total, after = loss.generator_loss(images, last(feats), commit, 0.25, 10, last.weight)
    assert "gan" in after and after["gan_adaptive_weight"] > 0
    total.backward()
    assert last.weight.grad is not None
    d_loss, d_terms = loss.discriminator_loss(images, last(feats))
    assert d_loss.requires_grad and "logits_real" in d_terms
