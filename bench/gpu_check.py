"""GPU smoke test and throughput of the model code: RQ-VAE training and encoding, RQ-Transformer
training, at the paper's sizes, in bf16 autocast.

    python bench/gpu_check.py                    # needs a CUDA device
    python bench/gpu_check.py --deterministic    # the same steps with deterministic kernels
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.flops import rqtransformer_flops_per_sample, throughput_terms
from model.losses import VAELossConfig
from model.rqtransformer import RQTransformer, RQTransformerConfig
from model.training import build_train_state, vae_train_step
from pipeline.stages.train_vae import TrainVAEConfig

DEVICE = "cuda"


def timed(fn, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def vae_check(batch: int = 16, encode_batches: tuple[int, ...] = (64, 256)) -> None:
    cfg = TrainVAEConfig(model_preset="imagenet256-8x8x4", batch_size=batch, steps=1000,
                         loss=VAELossConfig(gan_weight=0.75))  # fmt: skip
    state = build_train_state(cfg)
    state.model.to(DEVICE)
    state.loss.to(DEVICE)
    images = torch.rand(batch, 3, 256, 256, device=DEVICE) * 2 - 1
    terms = {}

    def step():
        nonlocal terms
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            terms = vae_train_step(state, [images], 10, cfg)

    seconds = timed(step, 10)
    assert all(math.isfinite(v) for v in terms.values()), terms
    params = sum(p.numel() for p in state.model.parameters()) / 1e6
    print(
        f"rqvae train  imagenet256-8x8x4 ({params:.0f}M) batch {batch} bf16+GAN: "
        f"{batch / seconds:.1f} images/s, {seconds * 1e3:.0f} ms/step, "
        f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, loss {terms['loss']:.3f}"
    )

    model = state.model.eval()
    for enc_batch in encode_batches:
        x = torch.rand(enc_batch, 3, 256, 256, device=DEVICE) * 2 - 1
        s32 = timed(lambda x=x: model.encode(x), 5, 2)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            s16 = timed(lambda x=x: model.encode(x), 5, 2)
            codes16 = model.encode(x)
        agree = (codes16 == model.encode(x)).float().mean().item()
        print(
            f"rqvae encode batch {enc_batch}: fp32 {enc_batch / s32:.0f} images/s, "
            f"bf16 {enc_batch / s16:.0f} images/s, bf16/fp32 code agreement {agree:.4f}"
        )


def ar_check(batch: int = 32, compile: bool = False) -> None:
    """One train-ar step of the paper's 480M model in bf16: tokens/s and MFU (model FLOPs from
    the config, model/flops.py), eager or under torch.compile (the stage's `compile: true`)."""
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    config = RQTransformerConfig.preset("imagenet256-480M")
    with torch.device(DEVICE):
        model = RQTransformer(config, torch.randn(16384, 256))
    model.train()
    forward = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    codes = torch.randint(16384, (batch, 8, 8, 4), device=DEVICE)
    labels = torch.randint(1000, (batch,), device=DEVICE)
    losses = []

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss, _ = RQTransformer.loss(forward(codes, labels), codes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())

    started = time.perf_counter()
    step()  # compilation, if any
    first = time.perf_counter() - started
    seconds = timed(step, 10)
    terms = throughput_terms(batch / seconds, rqtransformer_flops_per_sample(config, 256), DEVICE)
    tokens = batch * 8 * 8 * 4
    mfu = f"MFU {terms['mfu']:.1%}" if "mfu" in terms else "MFU n/a (GPU not in the table)"
    print(
        f"rqtransformer train imagenet256-480M ({model.num_parameters() / 1e6:.0f}M) batch "
        f"{batch} bf16 {'compiled' if compile else 'eager'}: {tokens / seconds:,.0f} tokens/s, "
        f"{seconds * 1e3:.0f} ms/step, {terms['model_tflops_per_s_per_worker']:.0f} model "
        f"TFLOP/s, {mfu}, first step {first:.1f} s, peak "
        f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, loss {losses[0].item():.2f} -> "
        f"{losses[-1].item():.2f} (log K = {math.log(16384):.2f})"
    )


def deterministic_check() -> None:
    """The cost of `deterministic: true` (both training stages): the steps above with
    deterministic kernels, and the ops that have none (they warn and void exactness)."""
    import warnings

    from pipeline.core.training import use_deterministic_kernels

    use_deterministic_kernels()  # before this process's first CUDA work
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vae_check()
        ar_check(128)
    ops = sorted({str(w.message).split(" does not have a deterministic")[0] for w in caught
                  if "deterministic" in str(w.message)})  # fmt: skip
    print(f"deterministic kernels: ops without one: {ops or 'none'}")


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name())
    if "--deterministic" in sys.argv:  # its own process: see deterministic_check
        deterministic_check()
        sys.exit()
    vae_check()
    for batch in (32, 128):
        ar_check(batch)
    ar_check(128, compile=True)
