"""RQ-VAE: a VQGAN-style convolutional autoencoder with a residual quantizer in the middle.

Images are (B, 3, R, R) floats in [-1, 1]. The encoder downsamples by f = 2^(len(ch_mult)-1)
to a (B, embed_dim, R/f, R/f) map, which is quantized channels-last into codes (B, R/f, R/f, D).
The paper's ImageNet model: 256x256 -> 8x8x4, K = 16384, f = 32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.quantizer import ResidualQuantizer
from model.weights.serialization import ModelConfig, Pretrained

RQVAE_PRESETS: dict[str, dict[str, Any]] = {
    # The paper's ImageNet/FFHQ/LSUN autoencoder (f = 32, 8x8x4 codes), every field spelled
    # out so that a change of a default never changes it.
    "imagenet256-8x8x4": dict(
        resolution=256,
        in_channels=3,
        ch=128,
        ch_mult=[1, 1, 2, 2, 4, 4],
        num_res_blocks=2,
        attn_resolutions=[8],
        dropout=0.0,
        z_channels=256,
        embed_dim=256,
        codebook_size=16384,
        code_depth=4,
        shared_codebook=True,
        decay=0.99,
        restart_threshold=1.0,
        kmeans_init=False,
        commitment_weight=0.25,
        distance_dtype="float32",
        ema_update="per_depth",
    ),
    # FFHQ's released RQ-VAE: a smaller codebook, attention one level up.
    "ffhq256-8x8x4": dict(),  # filled in below from the ImageNet model
    # CPU-sized: 32x32 -> 8x8x4, for the demo and the tests.
    "tiny": dict(
        resolution=32,
        ch=32,
        ch_mult=[1, 2, 2],
        num_res_blocks=1,
        attn_resolutions=[8],
        z_channels=32,
        embed_dim=32,
        codebook_size=256,
    ),
}


RQVAE_PRESETS["ffhq256-8x8x4"] = {
    **RQVAE_PRESETS["imagenet256-8x8x4"],
    "codebook_size": 2048,
    "attn_resolutions": [16],
}  # LSUN church, cat and bedroom use the ImageNet shapes


@dataclass
class RQVAEConfig(ModelConfig):
    kind: ClassVar[str] = "RQ-VAE"
    presets: ClassVar[dict[str, dict[str, Any]]] = RQVAE_PRESETS

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [8])
    dropout: float = 0.0
    z_channels: int = 256
    embed_dim: int = 256
    codebook_size: int = 16384
    code_depth: int = 4
    shared_codebook: bool = True
    decay: float = 0.99
    restart_threshold: float = 1.0
    kmeans_init: bool = False
    commitment_weight: float = 0.25
    distance_dtype: str = "float32"
    # When the codebook's EMA moves: after each depth (the paper's, the official code) or once
    # per pass from all depths (our earlier choice; the demo's tiny model was tuned with it).
    ema_update: str = "joint"

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def code_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.downsample_factor
        return (side, side, self.code_depth)

    def __post_init__(self) -> None:
        self.ch_mult, self.attn_resolutions = list(self.ch_mult), list(self.attn_resolutions)
        if self.resolution % self.downsample_factor:
            raise ValueError(
                f"resolution {self.resolution} is not divisible by the downsampling factor "
                f"{self.downsample_factor} of ch_mult={self.ch_mult}"
            )


def _group_norm(channels: int) -> nn.GroupNorm:
    # VQGAN's 32 groups, but never fewer than 4 channels a group: one channel a group is
    # instance norm, which erases flat colours in narrow (CPU-sized) models.
    return nn.GroupNorm(math.gcd(32, max(1, channels // 4)), channels, eps=1e-6)


def _zero(layer: nn.Conv2d) -> nn.Conv2d:
    """A residual branch's last layer starts at zero, so every block starts as the identity (or
    its skip projection), as in ADM/guided-diffusion's `zero_module`. With VQGAN's default init
    the branches add noise at every block, and the tiny RQ-VAE reached 22.4 dB instead of 27.1 dB
    after 400 steps (docs/benchmarks.md, the ablation). Init only: no effect on loaded weights."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = _group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _group_norm(out_ch)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm = _group_norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1))
        out = out.squeeze(1).transpose(-1, -2).reshape(b, c, h, w)  # (B, C, H, W)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad keeps H/2 exactly


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(in_ch: int, out_ch: int, blocks: int, attn: bool, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(blocks):
        layers.append(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, dropout))
        if attn:
            layers.append(AttnBlock(out_ch))
    return nn.Sequential(*layers)


def _middle(ch: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(ResnetBlock(ch, ch, dropout), AttnBlock(ch), ResnetBlock(ch, ch, dropout))


class Encoder(nn.Module):
    def __init__(self, cfg: RQVAEConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        layers: list[nn.Module] = []
        in_ch, res = cfg.ch, cfg.resolution
        for i, out_ch in enumerate(widths):
            attn = res in cfg.attn_resolutions
            layers.append(_level(in_ch, out_ch, cfg.num_res_blocks, attn, cfg.dropout))
            if i < len(widths) - 1:
                layers.append(Downsample(out_ch))
                res //= 2
            in_ch = out_ch
        self.down = nn.Sequential(*layers)
        self.mid = _middle(in_ch, cfg.dropout)
        self.norm_out = _group_norm(in_ch)
        self.conv_out = nn.Conv2d(in_ch, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(self.down(self.conv_in(x)))  # (B, ch*mult[-1], R/f, R/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, z_channels, R/f, R/f)


class Decoder(nn.Module):
    def __init__(self, cfg: RQVAEConfig) -> None:
        super().__init__()
        widths = [cfg.ch * m for m in reversed(cfg.ch_mult)]
        res = cfg.resolution // cfg.downsample_factor
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[0], 3, padding=1)
        self.mid = _middle(widths[0], cfg.dropout)
        layers: list[nn.Module] = []
        in_ch = widths[0]
        for i, out_ch in enumerate(widths):
            attn = res in cfg.attn_resolutions
            layers.append(_level(in_ch, out_ch, cfg.num_res_blocks + 1, attn, cfg.dropout))
            if i < len(widths) - 1:
                layers.append(Upsample(out_ch))
                res *= 2
            in_ch = out_ch
        self.up = nn.Sequential(*layers)
        self.norm_out = _group_norm(in_ch)
        self.conv_out = nn.Conv2d(in_ch, cfg.in_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.up(self.mid(self.conv_in(z)))  # (B, ch*mult[0], R, R)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, R, R)


class RQVAEOutput(NamedTuple):
    recon: Tensor  # (B, 3, R, R) in [-1, 1] (unclamped)
    codes: Tensor  # (B, h, w, D) int64
    commitment_loss: Tensor  # scalar, unweighted
    perplexity: Tensor  # (D,)
    usage: Tensor  # (D,)


class RQVAE(Pretrained, nn.Module):
    model_type = "rqvae"
    config_class = RQVAEConfig

    def __init__(self, config: RQVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.quantizer = ResidualQuantizer(
            dim=config.embed_dim,
            codebook_size=config.codebook_size,
            depth=config.code_depth,
            shared_codebook=config.shared_codebook,
            decay=config.decay,
            restart_threshold=config.restart_threshold,
            kmeans_init=config.kmeans_init,
            distance_dtype=config.distance_dtype,
            ema_update=config.ema_update,
        )
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.decoder = Decoder(config)

    @property
    def last_layer(self) -> Tensor:
        """The decoder's output weight, where the adaptive GAN weight is measured."""
        return self.decoder.conv_out.weight

    def _check_images(self, images: Tensor) -> None:
        expected = (self.config.in_channels, self.config.resolution, self.config.resolution)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"expected images (B, {expected}) in [-1, 1], got {tuple(images.shape)}"
            )

    def encode_latents(self, images: Tensor) -> Tensor:
        """(B, 3, R, R) -> continuous latents (B, h, w, embed_dim), channels-last."""
        self._check_images(images)
        return self.quant_conv(self.encoder(images)).permute(0, 2, 3, 1)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """(B, h, w, embed_dim) -> images (B, 3, R, R)."""
        return self.decoder(self.post_quant_conv(latents.permute(0, 3, 1, 2)))

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, R, R) in [-1, 1] -> codes (B, h, w, D) int64."""
        return self.quantizer.encode(self.encode_latents(images))

    @torch.no_grad()
    def decode_codes(self, codes: Tensor, depth: int | None = None) -> Tensor:
        """(B, h, w, D) codes -> images (B, 3, R, R); depth < D gives a coarse reconstruction."""
        return self.decode_latents(self.quantizer.decode_codes(codes, depth))

    def forward(self, images: Tensor) -> RQVAEOutput:
        out = self.quantizer(self.encode_latents(images))
        recon = self.decode_latents(out.quantized)
        return RQVAEOutput(recon, out.codes, out.commitment_loss, out.perplexity, out.usage)
