from dataclasses import dataclass, field

import pytest

from model.losses import VAELossConfig
from pipeline.core.config import ConfigError, apply_overrides, load_config
from pipeline.stages.train_vae import TrainVAEConfig


@dataclass
class Inner:
    rate: float = 0.5
    name: str | None = None


@dataclass
class Outer:
    steps: int = 10
    flag: bool = False
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    inner: Inner = field(default_factory=Inner)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 20\ninner:\n  rate: 1\n")
    cfg = load_config(Outer, path, ["inner.name=x", "sizes=[3,4]", "flag=true", "inner.rate=2e-3"])
    assert cfg == Outer(steps=20, flag=True, sizes=[3, 4], inner=Inner(rate=0.002, name="x"))


def test_stage_section_is_selected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_vae:\n  steps: 7\n  loss:\n    gan_weight: 0\nother_stage:\n  x: 1\n")
    cfg = load_config(TrainVAEConfig, path)
    assert cfg.steps == 7 and cfg.loss == VAELossConfig(gan_weight=0.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stesp=3"], r"unknown config key\(s\) \['stesp'\]"),
        (["inner.nme=3"], r"inner.nme"),
        (["steps=many"], "steps: expected int"),
        (["flag=3"], "flag: expected true or false"),
        (["inner.rate=fast"], "inner.rate: expected a number"),
        (["steps"], "must look like key=value"),
    ],
)
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, overrides)


def test_stage_config_validation():
    with pytest.raises(ConfigError, match="unknown RQ-VAE preset"):
        load_config(TrainVAEConfig, None, ["model_preset=giant"])
    with pytest.raises(ConfigError, match="unknown RQ-VAE config keys"):
        load_config(TrainVAEConfig, None, ["model.chanels=3"])
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        load_config(TrainVAEConfig, None, ["steps=0"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainVAEConfig, "no/such.yaml")


def test_overrides_do_not_mutate_input():
    values = {"a": {"b": 1}}
    assert apply_overrides(values, ["a.b=2"]) == {"a": {"b": 2}}
    assert values == {"a": {"b": 1}}


def test_gradient_accumulation_takes_one_optimizer_step():
    import torch

    from model.training import build_train_state, vae_train_step

    config = TrainVAEConfig(steps=10, batch_size=2, grad_accum_steps=2)
    config.loss.gan_weight = 0.0
    state = build_train_state(config)
    before = state.model.decoder.conv_out.weight.detach().clone()
    micro = [torch.rand(2, 3, 32, 32) * 2 - 1 for _ in range(2)]
    terms = vae_train_step(state, micro, 0, config)
    assert state.optimizer.state_dict()["state"][0]["step"] == 1  # one step for both halves
    assert not torch.equal(before, state.model.decoder.conv_out.weight)
    assert terms["loss"] > 0
