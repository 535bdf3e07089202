"""rqpipe convert-lpips: LPIPS weights from a torchvision VGG16 file and the lpips heads file,
and the paper config's check of that file before any stage runs."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.losses import _VGG16_CONVS, LPIPS_CHANNELS, PerceptualLoss
from pipeline.cli import main
from pipeline.run import plan_pipeline

PAPER_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "imagenet256-8x8x4.yaml")


def torchvision_vgg16_state(seed=0) -> dict[str, torch.Tensor]:
    """A randomly initialised state dict with torchvision's vgg16 names and shapes."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, (cin, cout) in _VGG16_CONVS.items():
        state[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * 0.05
        state[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.01
    for i, (cin, cout) in {0: (25088, 64), 3: (64, 64), 6: (64, 10)}.items():  # small classifier
        state[f"classifier.{i}.weight"] = torch.randn(cout, cin, generator=g) * 0.01
        state[f"classifier.{i}.bias"] = torch.zeros(cout)
    return state


def lpips_heads_state(seed=1) -> dict[str, torch.Tensor]:
    """The lpips package's v0.1/vgg.pth layout: lin{j}.model.1.weight (dropout at model.0)."""
    g = torch.Generator().manual_seed(seed)
    return {f"lin{j}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
            for j, c in enumerate(LPIPS_CHANNELS)}  # fmt: skip


@pytest.fixture
def weight_files(tmp_path):
    vgg, heads = tmp_path / "vgg16-397923af.pth", tmp_path / "vgg.pth"
    torch.save(torchvision_vgg16_state(), vgg)
    torch.save(lpips_heads_state(), heads)
    return vgg, heads


def test_convert_lpips_maps_every_tensor(weight_files, tmp_path, capsys):
    vgg, heads = weight_files
    out = tmp_path / "lpips" / "lpips_vgg16.safetensors"
    assert (
        main(["convert-lpips", "--vgg16", str(vgg), "--heads", str(heads), "--out", str(out)]) == 0
    )
    said = capsys.readouterr().out
    assert "31 tensors" in said and "dropped 6 classifier tensors" in said, said
    written = load_file(str(out))
    source, head_source = torchvision_vgg16_state(), lpips_heads_state()
    assert len(written) == 2 * len(_VGG16_CONVS) + len(LPIPS_CHANNELS)
    for i in _VGG16_CONVS:
        assert torch.equal(written[f"features.{i}.weight"], source[f"features.{i}.weight"])
        assert torch.equal(written[f"features.{i}.bias"], source[f"features.{i}.bias"])
    for j in range(len(LPIPS_CHANNELS)):
        assert torch.equal(written[f"lin{j}.weight"], head_source[f"lin{j}.model.1.weight"])
    loss = PerceptualLoss(str(out))
    assert torch.equal(loss.lins[2].weight, head_source["lin2.model.1.weight"])
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)


def test_convert_lpips_refuses_wrong_files(weight_files, tmp_path, capsys):
    _, heads = weight_files
    out = str(tmp_path / "out.safetensors")
    bad = torchvision_vgg16_state()
    bad["features.7.weight"] = bad["features.7.weight"][:, :64]
    torch.save(bad, tmp_path / "bad.pth")
    assert main(["convert-lpips", "--vgg16", str(tmp_path / "bad.pth"), "--heads", str(heads),
                 "--out", out]) == 1  # fmt: skip
    assert "features.7.weight has shape (128, 64, 3, 3), expected (128, 128, 3, 3)" in (
        capsys.readouterr().err
    )
    # the heads file given as the VGG file: a missing tensor is named
    assert main(["convert-lpips", "--vgg16", str(heads), "--heads", str(heads), "--out", out]) == 1
    assert "has no tensor 'features.0.weight'" in capsys.readouterr().err
    # a pickle that is more than tensors is not unpickled
    torch.save({"features.0.weight": object()}, tmp_path / "evil.pth")
    assert main(["convert-lpips", "--vgg16", str(tmp_path / "evil.pth"), "--heads", str(heads),
                 "--out", out]) == 1  # fmt: skip
    assert "not a plain tensor state dict" in capsys.readouterr().err


def test_paper_config_checks_the_lpips_file_before_any_stage(weight_files, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="rqpipe convert-lpips"):
        plan_pipeline(PAPER_CONFIG)
    vgg, heads = weight_files
    out = tmp_path / "lpips.safetensors"
    assert (
        main(["convert-lpips", "--vgg16", str(vgg), "--heads", str(heads), "--out", str(out)]) == 0
    )
    monkeypatch.chdir(tmp_path)  # a relative path, as typed: resolved for the Ray workers
    plan = plan_pipeline(PAPER_CONFIG, ["train_vae.loss.perceptual_weights_path=lpips.safetensors",
                                        "evaluate.enabled=false"])  # fmt: skip
    vae = next(p.config for p in plan if p.stage.name == "train-vae")
    assert vae.loss.perceptual_weights_path == str(out)
    assert vae.loss.recon_loss == "mse" and vae.use_gpu  # the paper's loss; a GPU recipe


def test_the_imagenet_recipe_plans_against_a_small_local_input(weight_files, tmp_path,
                                                               monkeypatch):  # fmt: skip
    from model.evaluation.inception import FIDInception
    from pipeline.demo.data import write_demo_dataset

    vgg, heads = weight_files
    lpips = tmp_path / "lpips.safetensors"
    assert main(["convert-lpips", "--vgg16", str(vgg), "--heads", str(heads), "--out",
                 str(lpips)]) == 0  # fmt: skip
    write_demo_dataset(tmp_path / "in", per_class=2)
    weights = [f"train_vae.loss.perceptual_weights_path={lpips}"]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty hub cache
    with pytest.raises(FileNotFoundError, match=r"no Inception weights given.*evaluate.weights"):
        plan_pipeline(PAPER_CONFIG, weights, str(tmp_path / "in"))
    inception = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(FIDInception().state_dict(), inception)
    weights.append(f"evaluate.weights={inception}")
    plan = plan_pipeline(PAPER_CONFIG, weights, str(tmp_path / "in"))
    configs = {p.stage.name: p.config for p in plan}
    assert list(configs) == ["shard", "train-vae", "encode", "train-ar", "sample", "evaluate"]
    assert configs["evaluate"].features == "inception" and configs["evaluate"].gpus_per_actor == 1
    assert configs["train-vae"].use_gpu and configs["train-ar"].use_gpu
    assert configs["encode"].gpus_per_actor == 1 and configs["sample"].gpus_per_actor == 1
    assert configs["train-ar"].max_failures >= 3 and configs["train-vae"].max_failures >= 3
    with pytest.raises(FileNotFoundError, match=r"--input .*nowhere: nothing there"):
        plan_pipeline(PAPER_CONFIG, weights, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"train_ar.vae=.*: no exported model there"):
        plan_pipeline(PAPER_CONFIG, [*weights, f"train_ar.vae={tmp_path}/vae"])
