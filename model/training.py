"""One optimisation step of each model, and the figures training reports: Ray-free torch.

The stages (pipeline/stages/train_vae.py, train_ar.py) run these steps inside Ray Train
workers; benchmarks and tests run them in a plain loop. `config` is the stage's config
(TrainVAEConfig, TrainARConfig), read for its optimisation fields only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from model.losses import VAELoss
from model.quantizer import ResidualQuantizer
from model.rqtransformer import RQTransformer
from model.rqvae import RQVAE

LR_DECAYS = ("cosine", "linear", "constant")


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, decay: str = "cosine",
                  final_ratio: float = 0.1) -> float:  # fmt: skip
    """Multiplier of the base learning rate at `step`: a linear warmup over `warmup_steps`,
    then `decay` ("cosine" or "linear" to `final_ratio` at the last step, or "constant").
    The official recipes: stage 1 constant after its warmup (cosine to min_lr = init_lr),
    stage 2 no warmup and cosine to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if decay == "constant":
        return 1.0
    if decay == "linear":
        return 1.0 - (1.0 - final_ratio) * progress
    if decay == "cosine":
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr decay {decay!r}: use one of {list(LR_DECAYS)}")


def learning_rate(step: int, config: Any) -> float:
    """The learning rate of `step` under a training config's schedule fields (lr, steps,
    warmup_steps, lr_decay, final_lr_ratio)."""
    return config.lr * lr_multiplier(step, config.steps, config.warmup_steps, config.lr_decay,
                                     config.final_lr_ratio)  # fmt: skip


def psnr_per_image(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """(B,) PSNR in dB of (B, 3, H, W) reconstructions against images, both in [-1, 1]."""
    mse = (recon.clamp(-1, 1) - images).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)  # peak-to-peak range 2 -> peak^2 = 4


class WeightEMA:
    """An exponential moving average of a model's weights, held in `average`: a module of the
    same architecture (and, under FSDP, sharded the same way) whose every floating tensor of
    the state dict (parameters and buffers, as the official `ExponentialMovingAverage`
    averages the whole state dict) moves towards the model's after each optimizer step, with
    the official warmup decay_t = min(decay, (1 + t) / (10 + t)), so the first steps do not
    keep the random init. Under FSDP the tensors are the rank's shards (DTensors) and so is
    the average: nothing is gathered to update it. Checkpoints save `average`'s state dict
    bit for bit; the exported model is `average`."""

    def __init__(self, average: torch.nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.average, self.decay = average.eval().requires_grad_(False), decay

    @classmethod
    def of(cls, model: torch.nn.Module, decay: float) -> WeightEMA:
        """The average of `model`, starting at its weights (before any sharding)."""
        import copy

        return cls(copy.deepcopy(model), decay)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """After optimizer step `step` (0-based). State-dict tensors alias the modules' own."""
        decay = min(self.decay, (1.0 + step) / (10.0 + step))
        state = model.state_dict()
        for name, average in self.average.state_dict().items():
            if average.is_floating_point():
                average.lerp_(state[name].detach(), 1.0 - decay)
            else:
                average.copy_(state[name])


# -- RQ-VAE ---------------------------------------------------------------------------------------


@dataclass
class VAETrainState:
    model: RQVAE
    loss: VAELoss
    optimizer: torch.optim.Optimizer
    disc_optimizer: torch.optim.Optimizer | None
    forward: torch.nn.Module | None = None  # the model as called: a DDP wrapper, or None


def build_train_state(config: Any) -> VAETrainState:
    torch.manual_seed(config.seed)
    model = RQVAE(config.model_config())
    loss = VAELoss(config.loss, model.config.in_channels)
    betas = tuple(config.betas)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=betas)
    disc_optimizer = (
        torch.optim.Adam(loss.discriminator.parameters(), lr=config.disc_lr, betas=betas)
        if loss.discriminator is not None
        else None
    )
    return VAETrainState(model.train(), loss, optimizer, disc_optimizer)


def micro_shares(micro_batches: list[Tensor]) -> list[float]:
    """What each micro-batch's mean loss is divided by so that their gradients sum to the
    step's mean over all rows: total rows / its rows (n for n micro-batches of one size; an
    elastic worker count can make them differ by one row)."""
    total = sum(len(m) for m in micro_batches)
    return [total / len(m) for m in micro_batches]


def vae_train_step(
    state: VAETrainState, micro_batches: list[Tensor], step: int, config: Any
) -> dict[str, float]:
    """One optimisation step over (B, 3, R, R) micro-batches in [-1, 1] -> scalar metrics."""
    lr = learning_rate(step, config)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    forward = state.model if state.forward is None else state.forward
    use_gan = state.disc_optimizer is not None and state.loss.gan_active(step)
    terms: dict[str, float] = {}
    recons, stats = [], []
    state.optimizer.zero_grad(set_to_none=True)
    for images, n in zip(micro_batches, micro_shares(micro_batches), strict=True):
        with _autocast(images, config):
            out = forward(images)
            total, micro_terms = state.loss.generator_loss(
                images, out.recon, out.commitment_loss, state.model.config.commitment_weight,
                step, state.model.last_layer,
            )  # fmt: skip
        (total / n).backward()
        recons.append(out.recon.detach())
        stats.append((out.perplexity, out.usage))
        for k, v in micro_terms.items():
            terms[k] = terms.get(k, 0.0) + v / n
    state.optimizer.step()
    if use_gan:
        state.disc_optimizer.zero_grad(set_to_none=True)
        for images, recon, n in zip(micro_batches, recons, micro_shares(micro_batches),
                                    strict=True):  # fmt: skip
            with _autocast(images, config):
                d_loss, d_terms = state.loss.discriminator_loss(images, recon)
            (d_loss / n).backward()
            for k, v in d_terms.items():
                terms[k] = terms.get(k, 0.0) + v / n
        state.disc_optimizer.step()
    terms["lr"] = lr
    perplexity, usage = stats[-1]
    for d, (p, u) in enumerate(zip(perplexity.tolist(), usage.tolist(), strict=True)):
        terms[f"perplexity_d{d + 1}"], terms[f"usage_d{d + 1}"] = p, u
    return terms


def _autocast(images: Tensor, config: Any) -> torch.autocast:
    on_gpu = images.device.type == "cuda"
    return torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=on_gpu and config.bf16)


@torch.no_grad()
def psnr(model: RQVAE, images: Tensor) -> float:
    """Mean PSNR (dB) of full-depth reconstructions, images in [-1, 1] (peak-to-peak 2)."""
    return psnr_per_image(model.decode_codes(model.encode(images)), images).mean().item()


# -- RQ-Transformer -------------------------------------------------------------------------------


def build_optimizer(model: RQTransformer, config: Any) -> torch.optim.Optimizer:
    """AdamW with weight decay on the Linear layers' weight matrices only: embeddings (class,
    position, depth), LayerNorms and biases are not decayed, as in the official recipe."""
    decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if id(p) in decay_ids]
    other = [p for p in trainable if id(p) not in decay_ids]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": other, "weight_decay": 0.0}]  # fmt: skip
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas))


def soft_quantizer(code_embeddings: torch.Tensor, depth: int) -> ResidualQuantizer:
    """A quantizer holding the frozen codebook (D or 1, K, C): soft codes from latents."""
    books, k, c = code_embeddings.shape
    quantizer = ResidualQuantizer(c, k, depth, shared_codebook=books == 1)
    quantizer.codebooks.copy_(code_embeddings)
    return quantizer.eval()


@torch.no_grad()
def soft_target_sharpness(quantizer: ResidualQuantizer, latents: Tensor, temperature: float,
                          seed: int = 0) -> dict[str, list[float]]:  # fmt: skip
    """How sharp the soft targets q_d are on these latents (N, C): their mean entropy a depth
    (nats; uniform is ln K) and how often a stochastic code is the nearest codeword. The
    temperature divides squared distances, so it is not scale-free: the paper's 0.5 on a VAE
    whose latents are small gives near-uniform targets (docs/benchmarks.md)."""
    z = latents.reshape(-1, 1, 1, quantizer.dim).float()  # (N, 1, 1, C)
    generator = torch.Generator().manual_seed(seed)
    codes, probs = quantizer.soft_codes(z, temperature, generator=generator)  # (N,1,1,D), (..,K)
    nearest = quantizer.encode(z)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).reshape(-1, quantizer.depth)
    same = (codes == nearest).float().reshape(-1, quantizer.depth)
    return {"entropy": [round(v, 2) for v in entropy.mean(0).tolist()],
            "uniform_entropy": round(math.log(quantizer.codebook_size), 2),
            "nearest_fraction": [round(v, 3) for v in same.mean(0).tolist()]}  # fmt: skip


def _condition(batch: dict[str, torch.Tensor], condition: str) -> dict[str, torch.Tensor]:
    """The forward's conditioning keywords for a batch: labels, or caption tokens (the model
    drops either in training, with its label_dropout / caption_dropout, for guidance)."""
    if condition == "class":
        return {"labels": batch["label"].long()}
    if condition != "text":
        return {}
    return {"text": batch["text"].long(), "return_text_logits": True}


def _ar_loss(forward: Any, codes: torch.Tensor, targets: torch.Tensor | None,
             kwargs: dict[str, torch.Tensor], config: Any, bf16: bool) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """-> (loss, per-depth image loss (D,), image loss, caption loss or None). A caption
    model's loss is (1 - w) image + w caption (the paper's 0.9 / 0.1)."""
    with torch.autocast(codes.device.type, torch.bfloat16, enabled=bf16):
        out = forward(codes, **kwargs)  # (B, H, W, D, K) [, (B, L-1, V)]
    logits, text_logits = out if isinstance(out, tuple) else (out, None)
    image, depth_loss = RQTransformer.loss(logits, codes, targets)
    if text_logits is None:
        return image, depth_loss, image, None
    text = kwargs["text"]
    caption = F.cross_entropy(text_logits.float().flatten(0, 1), text[:, 1:].flatten())
    w = config.text.loss_weight
    return (1 - w) * image + w * caption, depth_loss, image, caption


def ar_train_step(
    forward: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict[str, torch.Tensor]],
    step: int,
    config: Any,
    condition: str,
    quantizer: ResidualQuantizer | None,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One optimisation step over micro-batches of {"codes" (B, H, W, D), "label" (B,),
    ["latents" (B, H, W, C)], ["text" (B, L)]} -> scalar metrics. condition: "class",
    "text" or "none"."""
    lr = learning_rate(step, config)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    sums, per_depth = {}, None
    for batch, n in zip(micro_batches, micro_shares([b["codes"] for b in micro_batches]),
                        strict=True):  # fmt: skip
        codes, targets = batch["codes"].long(), None
        if quantizer is not None:
            codes, targets = quantizer.soft_codes(batch["latents"].float(),
                                                  config.soft_temperature, generator=generator)  # fmt: skip
        kwargs = _condition(batch, condition)
        bf16 = codes.device.type == "cuda" and config.bf16
        loss, depth_loss, image, caption = _ar_loss(forward, codes, targets, kwargs, config, bf16)
        (loss / n).backward()
        for name, value in (("loss", loss), ("loss_image", image), ("loss_text", caption)):
            if value is not None and (name == "loss" or caption is not None):
                sums[name] = sums.get(name, 0.0) + value.item() / n
        depth_loss = depth_loss.detach() / n
        per_depth = depth_loss if per_depth is None else per_depth + depth_loss
    grad_norm = torch.nn.utils.clip_grad_norm_(forward.parameters(), config.grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor, the norm over every rank's shards
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    terms = {**sums, "lr": lr, "grad_norm": float(grad_norm)}
    for d, value in enumerate(per_depth.tolist()):
        terms[f"loss_d{d + 1}"] = value
    return terms


@torch.no_grad()
def validation_loss(
    model: RQTransformer,
    val: dict[str, torch.Tensor],
    condition: str,
    quantizer: ResidualQuantizer | None,
    config: Any,
) -> dict[str, float]:
    """The held-out loss of the image codes on the targets training uses: {"val_loss"}; with
    soft targets also {"val_loss_hard"}, the NLL of the stored (argmin) codes; a caption
    model also {"val_loss_text"}. Soft codes are drawn with a fixed seed, so the figure moves
    only when the model does."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(val["codes"].device).manual_seed(0)
    sums = {"val_loss": 0.0, "val_loss_hard": 0.0, "val_loss_text": 0.0}
    for start in range(0, len(val["codes"]), 64):
        batch = {k: v[start : start + 64] for k, v in val.items()}
        codes = batch["codes"].long()
        kwargs = _condition(batch, condition)
        _, _, hard, caption = _ar_loss(model, codes, None, kwargs, config, False)
        sums["val_loss_hard"] += hard.item() * len(codes)
        if caption is not None:
            sums["val_loss_text"] += caption.item() * len(codes)
        if quantizer is not None:
            soft_codes, targets = quantizer.soft_codes(batch["latents"].float(),
                                                       config.soft_temperature,
                                                       generator=generator)  # fmt: skip
            loss = _ar_loss(model, soft_codes, targets, kwargs, config, False)[2]
            sums["val_loss"] += loss.item() * len(codes)
    model.train(was_training)
    out = {k: v / len(val["codes"]) for k, v in sums.items()}
    if condition != "text":
        out.pop("val_loss_text")
    if quantizer is None:
        out["val_loss"] = out.pop("val_loss_hard")  # the same targets as training: one figure
    return out
