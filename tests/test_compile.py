"""`compile: true`: the training steps of both models through torch.compile (inductor, on this
CPU) give the eager steps' losses. Compiling takes tens of seconds cold: marked slow."""

import pytest
import torch

from model.rqtransformer import RQTransformer, RQTransformerConfig
from model.training import ar_train_step, build_optimizer, build_train_state, vae_train_step
from pipeline.stages.train_ar import TrainARConfig
from pipeline.stages.train_vae import TrainVAEConfig

pytestmark = pytest.mark.slow


def test_compiled_rqtransformer_steps_match_eager():
    config = RQTransformerConfig.preset("tiny", code_shape=[8, 8, 4], codebook_size=64,
                                        num_classes=3)  # fmt: skip
    train = TrainARConfig(steps=10, warmup_steps=0, lr=1e-3, compile=True)
    codebook = torch.randn(64, 16)
    generator = torch.Generator().manual_seed(1)
    batch = {"codes": torch.randint(0, 64, (8, 8, 8, 4), generator=generator),
             "label": torch.randint(0, 3, (8,), generator=generator)}  # fmt: skip
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = RQTransformer(config, codebook)
        optimizer = build_optimizer(model, train)
        forward = torch.compile(model) if compiled else model
        losses[compiled] = [ar_train_step(forward, optimizer, [batch], step, train, "class", None)
                            ["loss"] for step in range(3)]  # fmt: skip
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-4)
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)  # Adam amplifies float noise
    assert losses[True][2] < losses[True][0]


def test_compiled_rqvae_steps_match_eager():
    train = TrainVAEConfig(steps=10, warmup_steps=0, compile=True)
    train.loss.gan_weight = 0.0
    images = [torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1]
    losses = {}
    for compiled in (False, True):
        state = build_train_state(train)
        if compiled:
            state.forward = torch.compile(state.model)
        losses[compiled] = [vae_train_step(state, images, step, train)["loss"] for step in range(2)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
