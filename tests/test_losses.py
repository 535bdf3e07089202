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


def test_the_default_discriminator_is_the_official_one():
    """in256-rqvae-8x8x4.yaml's: taming's NLayerDiscriminator with num_layers 2, ndf 64 (convs
    3->64 s2, 64->128 s2, 128->256 s1, 256->1 s1, 4x4 kernels: a 62x62 logit map at 256 px),
    convolutions drawn from N(0, 0.02), its hinge loss scaled by disc_weight 0.75; rqpipe's
    earlier 3-layer one stays available."""
    torch.manual_seed(0)
    loss = VAELoss(VAELossConfig(gan_weight=0.75))
    convs = [m for m in loss.discriminator.net if isinstance(m, torch.nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(64, 3, 4, 4), (128, 64, 4, 4),
                                                     (256, 128, 4, 4), (1, 256, 4, 4)]  # fmt: skip
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (1, 1), (1, 1)]
    assert loss.discriminator(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 62, 62)
    big = convs[2].weight
    assert abs(big.mean().item()) < 1e-3 and 0.019 < big.std().item() < 0.021
    norms = [m for m in loss.discriminator.net if isinstance(m, torch.nn.GroupNorm)]
    assert all(0.9 < n.weight.mean() < 1.1 and n.bias.abs().max() == 0 for n in norms)
    images, recon = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    scaled, terms = loss.discriminator_loss(images, recon)
    assert torch.isclose(scaled, torch.tensor(0.75 * terms["disc"]))

    earlier = VAELoss(VAELossConfig(disc_layers=3, disc_init="default", disc_loss_weight=1.0))
    assert earlier.discriminator(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    with pytest.raises(ValueError, match="disc_init"):
        VAELoss(VAELossConfig(disc_init="xavier"))


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


def reference_lpips(state, x, y):
    """LPIPS as its paper defines it, written out layer by layer: VGG16 activations at
    relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 (after the ReLU), unit-normalised over
    channels, squared differences weighted by the linear heads, averaged over space."""
    import torch.nn.functional as F

    blocks = [[0, 2], [5, 7], [10, 12, 14], [17, 19, 21], [24, 26, 28]]  # conv indices per block
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(h):
        h, outs = (h - shift) / scale, []
        for b, convs in enumerate(blocks):
            if b > 0:
                h = F.max_pool2d(h, 2, 2)
            for i in convs:
                h = F.relu(F.conv2d(h, state[f"features.{i}.weight"], state[f"features.{i}.bias"],
                                    padding=1))  # fmt: skip
            outs.append(h)
        return outs

    total = 0.0
    for j, (a, b) in enumerate(zip(taps(x), taps(y), strict=True)):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + ((a - b).pow(2) * state[f"lin{j}.weight"]).sum(1).mean()
    return taps(x), total


def test_perceptual_loss_taps_the_relu_outputs_lpips_defines(tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "lpips.safetensors"
    random_lpips_weights(path, seed=3)
    state = load_file(str(path))
    for j in range(5):  # biases away from zero: a tap before its ReLU would show negatives
        i = [0, 5, 10, 17, 24][j]
        state[f"features.{i}.bias"] = torch.randn_like(state[f"features.{i}.bias"])
    save_file(state, str(path))
    loss = PerceptualLoss(str(path))
    torch.manual_seed(1)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    expected_taps, expected = reference_lpips(state, x, y)
    for ours, theirs in zip(loss._taps(x), expected_taps, strict=True):
        assert ours.shape == theirs.shape and ours.min() >= 0
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss(x, y), expected, rtol=1e-4, atol=1e-6)
