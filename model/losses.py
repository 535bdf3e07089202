"""RQ-VAE training losses: reconstruction, commitment, perceptual (LPIPS-style), PatchGAN hinge.

generator loss = recon_weight * rec + perceptual_weight * lpips + commitment_weight * commit
                 + gan_weight * lambda_adaptive * (-mean D(recon))       (from gan_start_step on)
where lambda_adaptive = ||grad_last nll|| / (||grad_last g|| + 1e-4), clamped to [0, max], is
measured at the decoder's last layer (Esser et al., VQGAN).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn


@dataclass
class VAELossConfig:
    recon_loss: str = "l1"  # "l1" or "mse"
    recon_weight: float = 1.0
    perceptual_weight: float = 0.0  # the paper uses 1.0; needs perceptual_weights_path
    perceptual_weights_path: str | None = None  # local .safetensors, see PerceptualLoss
    gan_weight: float = 0.75  # the generator's GAN term (x the adaptive weight)
    gan_start_step: int = 0
    adaptive_weight_max: float = 1e4
    # The discriminator: the official one by default (in256-rqvae-8x8x4.yaml: 2 layers,
    # convolutions initialised N(0, 0.02), its hinge loss scaled by disc_weight 0.75);
    # disc_layers: 3, disc_init: default, disc_loss_weight: 1.0 is rqpipe's earlier one.
    disc_channels: int = 64
    disc_layers: int = 2
    disc_init: str = "normal"  # normal: N(0, 0.02) convs, N(1, 0.02) norms; default: PyTorch's
    disc_loss_weight: float = 0.75


RECON_LOSSES = ("l1", "mse")
DISC_INITS = ("normal", "default")


def _check_recon_kind(kind: str) -> None:
    if kind not in RECON_LOSSES:
        raise ValueError(f"recon_loss={kind!r} is not supported; use one of {RECON_LOSSES}")


def reconstruction_loss(recon: Tensor, target: Tensor, kind: str = "l1") -> Tensor:
    _check_recon_kind(kind)
    if kind == "l1":
        return (recon - target).abs().mean()
    return (recon - target).pow(2).mean()


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix, as taming's NLayerDiscriminator): a logit per overlapping patch,
    (B, 3, R, R) -> (B, 1, ~R/2^L, ~R/2^L) for L = num_layers.

    GroupNorm instead of BatchNorm: batch statistics would differ between DDP ranks.
    init="normal" is the official weights_init: convolutions N(0, 0.02), norm scales
    N(1, 0.02) and shifts 0.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 2,
                 init: str = "normal") -> None:  # fmt: skip
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, channels, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        width = channels
        for i in range(1, num_layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < num_layers else 1
            layers += [
                nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(math.gcd(32, out), out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        if init not in DISC_INITS:
            raise ValueError(f"disc_init={init!r}: use one of {DISC_INITS}")
        if init == "normal":
            for module in self.net:
                if isinstance(module, nn.Conv2d):
                    nn.init.normal_(module.weight, 0.0, 0.02)
                elif isinstance(module, nn.GroupNorm):
                    nn.init.normal_(module.weight, 1.0, 0.02)
                    nn.init.zeros_(module.bias)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


def hinge_discriminator_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_generator_weight(
    nll_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4
) -> Tensor:
    """Balance the GAN gradient against the reconstruction gradient at the last layer."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (gan_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


# VGG16 convolutions (in, out) of torchvision's `features`, by index, and the ReLU outputs
# LPIPS compares (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
_VGG16_CONVS = {
    0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256),
    14: (256, 256), 17: (256, 512), 19: (512, 512), 21: (512, 512), 24: (512, 512),
    26: (512, 512), 28: (512, 512),
}  # fmt: skip
# LPIPS compares the outputs of those ReLUs (layers 3, 8, 15, 22, 29): each slice of
# `features` ends one past its ReLU, as lpips.pretrained_networks.vgg16 slices it.
_VGG16_TAPS = (4, 9, 16, 23, 30)
_VGG16_POOLS = (4, 9, 16, 23)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)  # channels at each tap, one linear head each


class PerceptualLoss(nn.Module):
    """LPIPS (Zhang et al. 2018) with a VGG16 trunk, weights from a local safetensors file.

    Nothing is downloaded: build the file once with `rqpipe convert-lpips` (pipeline/tools/
    lpips_weights.py) and pass its path. Expected keys:
    `features.{i}.weight` / `features.{i}.bias` for torchvision VGG16 conv indices i in
    {0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28}, and `lin{j}.weight` of shape (1, C_j, 1, 1)
    for the five LPIPS linear heads j = 0..4. Inputs are images in [-1, 1].
    """

    def __init__(self, weights_path: str) -> None:
        super().__init__()
        if not weights_path or not os.path.isfile(weights_path):
            raise FileNotFoundError(
                f"perceptual loss weights not found at {weights_path!r}: build the file with "
                "`rqpipe convert-lpips --vgg16 vgg16-397923af.pth --out lpips_vgg16.safetensors` "
                "and set perceptual_weights_path to it, or set perceptual_weight: 0 to train "
                "without the perceptual loss"
            )
        layers: list[nn.Module] = []
        for i in range(_VGG16_TAPS[-1]):
            if i in _VGG16_CONVS:
                layers.append(nn.Conv2d(*_VGG16_CONVS[i], 3, padding=1))
            elif i in _VGG16_POOLS:
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(nn.ReLU())
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in LPIPS_CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

        state = load_file(weights_path)
        renamed = {k.replace("lin", "lins.", 1) if k.startswith("lin") else k: v
                   for k, v in state.items()}  # fmt: skip
        missing, unexpected = self.load_state_dict(renamed, strict=False)
        missing = [k for k in missing if k not in ("shift", "scale")]
        if missing or unexpected:
            raise ValueError(
                f"{weights_path!r} does not hold LPIPS-VGG16 weights: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        self.requires_grad_(False)
        self.eval()

    def _taps(self, x: Tensor) -> list[Tensor]:
        outs = []
        h = (x - self.shift) / self.scale
        start = 0
        for end in _VGG16_TAPS:
            h = self.features[start:end](h)
            outs.append(h)
            start = end
        return outs

    def per_image(self, recon: Tensor, target: Tensor) -> Tensor:
        """(B,) LPIPS distance of each image pair."""
        total = recon.new_zeros(len(recon))
        for lin, a, b in zip(self.lins, self._taps(recon), self._taps(target), strict=True):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit length over channels
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + lin((a - b).pow(2)).mean((1, 2, 3))  # (B, 1, h, w) -> (B,)
        return total

    def forward(self, recon: Tensor, target: Tensor) -> Tensor:
        return self.per_image(recon, target).mean()  # the batch's mean, the training loss


class VAELoss(nn.Module):
    """The RQ-VAE objective; owns the discriminator (trained with its own optimizer)."""

    def __init__(self, config: VAELossConfig, in_channels: int = 3) -> None:
        super().__init__()
        self.config = config
        _check_recon_kind(config.recon_loss)
        self.perceptual = (
            PerceptualLoss(config.perceptual_weights_path or "")
            if config.perceptual_weight > 0
            else None
        )
        self.discriminator = None
        if config.gan_weight > 0:
            self.discriminator = PatchDiscriminator(in_channels, config.disc_channels,
                                                    config.disc_layers, config.disc_init)  # fmt: skip

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.config.gan_start_step

    def generator_loss(
        self,
        images: Tensor,
        recon: Tensor,
        commitment_loss: Tensor,
        commitment_weight: float,
        step: int,
        last_layer: Tensor,
    ) -> tuple[Tensor, dict[str, float]]:
        cfg = self.config
        rec = reconstruction_loss(recon, images, cfg.recon_loss)
        nll = cfg.recon_weight * rec
        terms = {"recon": rec.item(), "commitment": commitment_loss.item()}
        if self.perceptual is not None:
            perceptual = self.perceptual(recon, images)
            nll = nll + cfg.perceptual_weight * perceptual
            terms["perceptual"] = perceptual.item()
        total = nll + commitment_weight * commitment_loss
        if self.gan_active(step):
            assert self.discriminator is not None
            gan = -self.discriminator(recon).mean()
            weight = adaptive_generator_weight(nll, gan, last_layer, cfg.adaptive_weight_max)
            total = total + cfg.gan_weight * weight * gan
            terms["gan"], terms["gan_adaptive_weight"] = gan.item(), weight.item()
        terms["loss"] = total.item()
        return total, terms

    def discriminator_loss(self, images: Tensor, recon: Tensor) -> tuple[Tensor, dict[str, float]]:
        if self.discriminator is None:
            raise RuntimeError("discriminator_loss called with gan_weight = 0")
        # One forward over both halves: DDP expects one forward per backward.
        logits = self.discriminator(torch.cat([images.detach(), recon.detach()]))
        logits_real, logits_fake = logits.chunk(2)
        hinge = hinge_discriminator_loss(logits_real, logits_fake)
        loss = self.config.disc_loss_weight * hinge  # the official (disc_weight * loss_disc)
        return loss, {
            "disc": hinge.item(),
            "logits_real": logits_real.mean().item(),
            "logits_fake": logits_fake.mean().item(),
        }
