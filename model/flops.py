"""Model FLOPs per training sample, and MFU: what fraction of the hardware a run uses.

A multiply-add counts as 2 FLOPs; a training step as 3 forward passes (the backward pass costs
about twice the forward). Attention scores count in full (as torch's FLOP counter and most MFU
reports do), not halved for the causal mask.

- RQ-Transformer, analytic from its config (T = H*W positions, D depths, E width, K codebook,
  C code width, r mlp_ratio), per sample, forward:
      spatial: T * Ls * (2 E^2 (4 + 2r) + 4 T E) + (T - 1) * 2 C E
      depth:   T * D * Ld * (2 E^2 (4 + 2r) + 4 D E) + T * (D - 1) * 2 C E
      head:    T * D * 2 E K
  A text-conditioned model (L caption tokens, vocabulary V) runs its spatial stack over
  n = L - 1 + T positions (n for T in the spatial term) and adds (L - 1) * 2 E V for its text head.
  (per block and token: qkv 6E^2, output 2E^2, MLP 4rE^2; attention 4nE over n positions).
- RQ-VAE: counted by torch's FLOP counter over one forward of the model the config builds
  (encoder, quantizer, decoder); the perceptual and discriminator networks are not counted.
MFU = model FLOPs per second / the device's peak dense bf16 FLOP/s (`PEAK_BF16_FLOPS`). On a
CPU, or a GPU not in the table, only FLOP/s are reported.
"""

from __future__ import annotations

from typing import Any

import torch

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, by device-name substring.
PEAK_BF16_FLOPS: dict[str, float | None] = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is lower (756e12)
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": None,  # AWS's A10 variant (g5): no published peak; FLOP/s only
    "A10": 125e12,
}


def rqtransformer_flops_per_sample(config: Any, code_dim: int, training: bool = True) -> float:
    """`config`: an RQTransformerConfig; `code_dim`: C, the RQ-VAE's code width."""
    h, w, d = config.code_shape
    t, e, k, r, c = h * w, config.width, config.codebook_size, config.mlp_ratio, code_dim
    block = 2 * e * e * (4 + 2 * r)
    prefix = max(config.text_length, 1) - 1  # caption tokens before position 0
    n = prefix + t  # positions the spatial stack runs over
    spatial = n * config.spatial_layers * (block + 4 * n * e) + (t - 1) * 2 * c * e
    spatial += prefix * 2 * e * config.text_vocab_size  # the text head
    depth = t * d * config.depth_layers * (block + 4 * d * e) + t * (d - 1) * 2 * c * e
    head = t * d * 2 * e * k
    forward = spatial + depth + head
    return float(3 * forward if training else forward)


def counted_flops(module: torch.nn.Module, *inputs: Any) -> float:
    """FLOPs of one forward of `module` (in eval mode) on `inputs`, by torch's FLOP counter.
    Attention runs on the math backend here: the counter does not see the CPU's fused kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    was_training = module.training
    module.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        module(*inputs)
    module.train(was_training)
    return float(counter.get_total_flops())


def throughput_terms(rows_per_s: float, flops_per_row: float,
                     device: torch.device | str) -> dict[str, float]:  # fmt: skip
    """The metrics a training log gets: model TFLOP/s per worker, and MFU where the peak is
    known."""
    flops_per_s = rows_per_s * flops_per_row
    terms = {"model_tflops_per_s_per_worker": flops_per_s / 1e12}
    peak = peak_flops(device)
    if peak:
        terms["mfu"] = flops_per_s / peak
    return terms


def peak_flops(device: torch.device | str) -> float | None:
    """The device's dense bf16 peak, or None (CPU, unknown GPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return peak_of(torch.cuda.get_device_name(device))


def peak_of(device_name: str) -> float | None:
    """The peak of a device by its name ("NVIDIA H100 80GB HBM3"); the first key it contains
    wins, so longer names come first in the table (L40S before L4, A100 and A10G before A10)."""
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in device_name), None)
