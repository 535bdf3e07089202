"""Model FLOPs and MFU: the RQ-Transformer's analytic count against torch's FLOP counter, the
RQ-VAE's count, and the peak table."""

import pytest
import torch

from model.flops import counted_flops, peak_of, rqtransformer_flops_per_sample, throughput_terms
from model.rqtransformer import RQTransformer, RQTransformerConfig
from model.rqvae import RQVAE, RQVAEConfig


@pytest.mark.parametrize("shape, layers", [([8, 8, 4], (3, 2)), ([4, 6, 3], (2, 1))])
def test_rqtransformer_analytic_flops_equal_torchs_count(shape, layers):
    config = RQTransformerConfig.preset("tiny", code_shape=shape, codebook_size=64, num_classes=3,
                                        spatial_layers=layers[0], depth_layers=layers[1])  # fmt: skip
    model = RQTransformer(config, torch.randn(64, 24))
    codes = torch.randint(0, 64, (2, *shape))
    counted = counted_flops(model, codes, torch.tensor([0, 2]))
    assert rqtransformer_flops_per_sample(config, 24, training=False) * 2 == counted
    assert rqtransformer_flops_per_sample(config, 24) == 3 * counted / 2


def test_paper_presets_flops_follow_the_6n_rule():
    """Training FLOPs per token about 6 x the matmul parameters a token passes through."""
    config = RQTransformerConfig.preset("imagenet256-1.4B")
    per_sample = rqtransformer_flops_per_sample(config, 256)
    e, r = config.width, config.mlp_ratio
    block = e * e * (4 + 2 * r)  # parameters of one block's matmuls
    passed = 64 * config.spatial_layers * block + 256 * config.depth_layers * block  # 8x8x4
    assert 1.0 < per_sample / (6 * passed) < 1.15  # the rest: attention, head, projections


def test_rqvae_flops_are_counted_and_the_model_is_left_as_it_was():
    model = RQVAE(RQVAEConfig.preset("tiny")).train()
    flops = counted_flops(model, torch.zeros(1, 3, 32, 32))
    assert flops > 1e7 and model.training
    assert counted_flops(model, torch.zeros(2, 3, 32, 32)) == pytest.approx(2 * flops, rel=1e-6)


def test_peaks_by_device_name_and_mfu():
    assert peak_of("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_of("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_of("NVIDIA L40S") == 362e12 and peak_of("NVIDIA L4") == 121e12
    assert peak_of("NVIDIA A10G") is None and peak_of("NVIDIA A10") == 125e12
    assert peak_of("Tesla T4") is None
    assert throughput_terms(100.0, 1e9, "cpu") == {"model_tflops_per_s_per_worker": 0.1}
