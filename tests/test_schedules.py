"""The learning-rate schedules and the weights' moving average of model/training.py."""

import itertools
import math

import pytest
import torch

from model.training import WeightEMA, lr_multiplier
from pipeline.stages.train_ar import TrainARConfig


def test_the_official_schedules():
    """Stage 1: warmup then constant (cosine to min_lr = init_lr); stage 2: no warmup, cosine
    to 0; ours: warmup then cosine to 0.1; linear decay too."""
    constant = [lr_multiplier(s, 100, 10, "constant") for s in range(100)]
    assert constant[:3] == [0.1, 0.2, 0.3] and set(constant[10:]) == {1.0}
    stage2 = [lr_multiplier(s, 100, 0, "cosine", 0.0) for s in range(101)]
    assert stage2[0] == 1.0 and stage2[50] == pytest.approx(0.5) and stage2[100] == 0.0
    assert all(a >= b for a, b in itertools.pairwise(stage2))
    ours = lr_multiplier(100, 100, 10, "cosine", 0.1)
    assert ours == pytest.approx(0.1) and lr_multiplier(55, 100, 10) == pytest.approx(0.55)
    assert lr_multiplier(55, 100, 10, "linear", 0.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lr_decay"):
        TrainARConfig(lr_decay="step")
    with pytest.raises(ValueError, match="final_lr_ratio"):
        TrainARConfig(final_lr_ratio=1.5)


def test_the_weight_average_follows_the_official_formula():
    """average <- d average + (1 - d) weights, d = min(decay, (1 + t) / (10 + t)), over every
    floating tensor of the state dict (buffers too); other tensors are copied."""
    torch.manual_seed(0)
    model = torch.nn.BatchNorm1d(3)  # a parameter, floating buffers and an integer counter
    ema = WeightEMA.of(model, decay=0.9)
    expected = model.weight.detach().clone()
    for step in range(30):
        with torch.no_grad():
            model.weight.add_(torch.randn(3))
            model.num_batches_tracked += 1
        ema.update(model, step)
        d = min(0.9, (1 + step) / (10 + step))
        expected = d * expected + (1 - d) * model.weight.detach()
    torch.testing.assert_close(ema.average.weight, expected)
    assert ema.average.num_batches_tracked == 30
    assert not ema.average.weight.requires_grad and not ema.average.training
    assert math.isclose(min(0.9, 11 / 20), 0.55)  # the warmup caps the decay early on
    with pytest.raises(ValueError, match="ema_decay"):
        WeightEMA.of(model, decay=1.0)
