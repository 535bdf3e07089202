"""The evaluate stage and its metrics: the FID Inception network's loading and resizing, the
Fréchet distance against torchmetrics' implementation, IS and precision/recall on sets whose
answer is known, and the stage on a real run (shards, an RQ-VAE, samples) with the real
loading code on randomly initialised networks. Nothing is downloaded."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from model.evaluation.classifier import ImageClassifier, ImageClassifierConfig
from model.evaluation.inception import (
    FIDInception,
    find_inception_weights,
    load_fid_inception,
    tf1_bilinear_resize,
)
from model.evaluation.metrics import (
    FeatureMoments,
    frechet_distance,
    inception_score,
    precision_recall,
    ssim_per_image,
)
from model.rqvae import RQVAE
from pipeline.cli import main
from pipeline.formats.shard_tar import decode_shard
from pipeline.stages.evaluate import EvaluateConfig, run_evaluate_stage
from pipeline.stages.sample import SampleConfig, run_sample_stage


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    """A randomly initialised FID Inception saved as the published file is: a plain state dict
    (with BatchNorm statistics that are not the identity)."""
    torch.manual_seed(0)
    state = FIDInception().state_dict()
    for key, value in state.items():
        if key.endswith("running_var"):
            value.uniform_(0.5, 2.0)
        elif key.endswith("running_mean"):
            value.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    return path


def test_tf1_resize_samples_without_half_pixel_offset():
    ramp = torch.arange(8, dtype=torch.float32).view(1, 1, 1, 8).expand(1, 1, 8, 8)
    out = tf1_bilinear_resize(ramp.contiguous(), 20)  # output i samples input i * 8 / 20
    expected = torch.tensor([min(i * 0.4, 7.0) for i in range(20)])
    assert torch.allclose(out[0, 0, 3], expected, atol=1e-5)
    assert torch.allclose(out[0, 0, :, 5], out[0, 0, 0, 5].expand(20))  # constant along y


def test_inception_loads_the_published_layout_and_gives_pool_features_and_logits(inception_file):
    model = load_fid_inception(str(inception_file))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    features, logits = model(images)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    assert (features >= 0).all()  # the pool of ReLU outputs
    # logits are the fc without its bias (torch-fidelity's "logits_unbiased", the IS input)
    assert torch.allclose(logits, features @ model.fc.weight.T)
    # the same images at another size go through the 299x299 resize: same feature shapes
    assert model(torch.randint(0, 256, (1, 3, 64, 48), dtype=torch.uint8))[0].shape == (1, 2048)
    with pytest.raises(ValueError, match="uint8"):
        model(images.float())


def test_inception_weights_errors_and_cache(inception_file, tmp_path, monkeypatch):
    state = torch.load(inception_file, weights_only=True)
    state["fc.weight"] = state["fc.weight"][:1000]
    del state["Mixed_7c.branch_pool.conv.weight"]
    state["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(
        ValueError, match=r"Mixed_7c.branch_pool.conv.weight.*extra.weight.*fc.weight"
    ):
        load_fid_inception(str(bad))
    with pytest.raises(FileNotFoundError, match="torch-fidelity/releases"):
        load_fid_inception(str(tmp_path / "missing.pth"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError, match="none in"):
        find_inception_weights(None)
    cache = tmp_path / "home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    shutil.copy(inception_file, cache / "pt_inception-2015-12-05-6726825d.pth")  # pytorch-fid's
    assert find_inception_weights(None) == str(cache / "pt_inception-2015-12-05-6726825d.pth")


def test_frechet_distance_matches_torchmetrics():
    from torchmetrics.image.fid import _compute_fid

    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32))
    b = rng.normal(0.3, 1.2, size=(300, 32)) @ rng.normal(size=(32, 32))
    ma, sa = FeatureMoments.of(a).mean_cov()
    mb, sb = FeatureMoments.of(b).mean_cov()
    ours = frechet_distance(ma, sa, mb, sb)
    theirs = _compute_fid(*(torch.tensor(x, dtype=torch.float64) for x in (ma, sa, mb, sb)))
    assert ours == pytest.approx(float(theirs), rel=1e-6)
    assert frechet_distance(ma, sa, ma, sa) == pytest.approx(0, abs=1e-6)
    shift = np.full(32, 0.5)  # a pure shift of the mean adds its squared length
    assert frechet_distance(ma + shift, sa, ma, sa) == pytest.approx(32 * 0.25, rel=1e-6)


def test_frechet_distance_never_fails_on_singular_covariances():
    """50 against 50 ReLU features of 64 dimensions, rank 8: both covariances singular. A
    matrix square root (scipy's sqrtm, what this used before) leaves an imaginary part of
    0.046 and the report used to abort; the eigenvalue trace gives the figure the symmetric
    form Tr((S1^1/2 S2 S1^1/2)^1/2) gives, and warns that it is biased."""
    from scipy import linalg

    rng = np.random.default_rng(39)
    w = rng.normal(size=(8, 64))
    a = np.maximum(rng.normal(size=(50, 8)) @ w, 0) * 10
    b = np.maximum(rng.normal(size=(50, 8)) @ w + rng.normal(size=(1, 64)), 0) * 10
    (ma, sa), (mb, sb) = (FeatureMoments.of(x.astype(np.float32)).mean_cov() for x in (a, b))
    assert np.abs(linalg.sqrtm(sa @ sb).imag).max() > 1e-3  # the old way's failure
    with pytest.warns(UserWarning, match="50 feature vectors of 64 dimensions"):
        ours = frechet_distance(ma, sa, mb, sb, counts=(50, 50))
    values, vectors = np.linalg.eigh(sa)
    root = (vectors * np.sqrt(values.clip(0))) @ vectors.T  # S1^(1/2)
    middle = np.linalg.eigvalsh(root @ sb @ root).clip(0)
    symmetric = (ma - mb) @ (ma - mb) + np.trace(sa) + np.trace(sb) - 2 * np.sqrt(middle).sum()
    assert np.isfinite(ours) and ours == pytest.approx(symmetric, rel=1e-6)


def test_moments_merge_like_one_covariance():
    x = np.random.default_rng(1).normal(size=(50, 6))
    merged = FeatureMoments.of(x[:17]) + FeatureMoments.of(x[17:])
    mean, cov = merged.mean_cov()
    assert np.allclose(mean, x.mean(0)) and np.allclose(cov, np.cov(x, rowvar=False))


def test_worker_sums_merge_to_the_direct_metrics(ray_local, tmp_path):
    """What the evaluate actors write, unit by unit (moments in float64, the Inception Score's
    per-split sums), merged by Ray tasks FAN_IN at a time and then on the driver, gives the
    mean, covariance, FID and IS of one computation over all the features, to 1e-6."""
    from model.evaluation.metrics import InceptionScoreSums, inception_score
    from pipeline.core.storage import Storage
    from pipeline.stages.evaluate.features import UnitPlan, feature_sums, write_unit
    from pipeline.stages.evaluate.report import FAN_IN, moments, reduce_units

    rng = np.random.default_rng(3)
    total = 1000
    features = rng.normal(size=(total, 8)) @ rng.normal(size=(8, 8)) + 2.0
    logits = rng.normal(size=(total, 5)) * 2
    bounds = np.sort(rng.choice(np.arange(1, total), FAN_IN + 12, replace=False))  # > FAN_IN units
    storage, names = Storage(), []
    for i, (first, end) in enumerate(zip([0, *bounds], [*bounds, total], strict=True)):
        name = f"samples-chunk-{i:05d}"
        plan = UnitPlan(5, [1], first, total, 7)
        arrays = feature_sums(name, features[first:end], np.arange(first, end) % 3, plan)
        score = InceptionScoreSums.of(logits[first:end], first, total, 7)
        arrays.update(is_count=score.count, is_p_sum=score.p_sum, is_plogp_sum=score.plogp_sum)
        write_unit(storage, str(tmp_path), name, arrays, "fp")
        names.append(name)
    merged = reduce_units(storage, str(tmp_path), names)
    mean, cov = moments(merged).mean_cov()
    np.testing.assert_allclose(mean, features.mean(0), rtol=1e-6)
    np.testing.assert_allclose(cov, np.cov(features, rowvar=False), rtol=1e-6, atol=1e-9)
    direct = FeatureMoments.of(features[:500]).mean_cov()
    assert frechet_distance(mean, cov, *direct) == pytest.approx(
        frechet_distance(*FeatureMoments.of(features).mean_cov(), *direct), rel=1e-6)  # fmt: skip
    score = InceptionScoreSums(merged["is_count"], merged["is_p_sum"], merged["is_plogp_sum"])
    assert score.score() == pytest.approx(inception_score(logits, 7), rel=1e-6)
    sizes = np.diff([0, *bounds, total])
    assert len(merged["sample"]) == np.minimum(sizes, 5).sum()  # each unit's share, stacked
    assert set(merged["class_labels"].tolist()) == {1}
    assert len(merged["class_features"]) == (np.arange(total) % 3 == 1).sum()


def test_inception_score_and_precision_recall_on_known_sets():
    assert inception_score(np.zeros((40, 10)), splits=4)[0] == pytest.approx(1.0)
    confident = np.eye(8)[np.arange(80) % 8] * 50  # every class equally, each sure
    assert inception_score(confident, splits=2)[0] == pytest.approx(8.0, rel=1e-3)
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 4))
    assert precision_recall(real, real.copy()) == (1.0, 1.0)
    far = rng.normal(size=(200, 4)) + 100
    assert precision_recall(real, far) == (0.0, 0.0)
    # samples covering half of the real distribution: precise, but half the recall
    half = real[real[:, 0] > 0] + 1e-3
    precision, recall = precision_recall(real, half)
    assert precision == 1.0 and 0.3 < recall < 0.7


def test_ssim_of_identical_images_is_one_and_falls_with_noise():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(ssim_per_image(x, x), torch.ones(2), atol=1e-5)
    noisy = ssim_per_image((x + 0.3 * torch.randn_like(x)).clamp(-1, 1), x)
    assert (noisy < 0.9).all()


@pytest.fixture
def run_with_samples(sampled_run) -> Path:
    """The encoded run (demo shards, untrained tiny RQ-VAE) with an untrained class model
    (conftest) and 12 samples of it."""
    run_sample_stage(str(sampled_run), SampleConfig(num_samples=12, chunk_size=6, top_k=32,
                                                    cpus_per_actor=0.5))  # fmt: skip
    return sampled_run


@pytest.fixture
def classifier_folder(tmp_path) -> str:
    torch.manual_seed(0)
    folder = str(tmp_path / "classifier")
    ImageClassifier(ImageClassifierConfig(num_classes=4)).save_pretrained(folder)
    return folder


def _features(classifier: ImageClassifier, images: np.ndarray) -> np.ndarray:
    return classifier.features_and_logits(torch.from_numpy(images).permute(0, 3, 1, 2))[0].numpy()


def test_stage_metrics_match_a_direct_computation(run_with_samples, classifier_folder, tmp_path):
    from model.losses import PerceptualLoss
    from tests.test_lpips_weights import lpips_heads_state, torchvision_vgg16_state

    torch.save(torchvision_vgg16_state(), tmp_path / "vgg.pth")
    torch.save(lpips_heads_state(), tmp_path / "heads.pth")
    lpips = str(tmp_path / "lpips.safetensors")
    assert main(["convert-lpips", "--vgg16", str(tmp_path / "vgg.pth"), "--heads",
                 str(tmp_path / "heads.pth"), "--out", lpips]) == 0  # fmt: skip
    config = EvaluateConfig(lpips_weights=lpips, features="classifier", weights=classifier_folder, cpus_per_actor=0.5,
                            num_actors=2, batch_size=5)  # fmt: skip
    manifest = run_evaluate_stage(str(run_with_samples), config)
    metrics = json.loads((run_with_samples / "eval" / "metrics.json").read_text())

    # The same figures computed here without the stage: decode the val shards, reconstruct.
    shards = json.loads((run_with_samples / "shards" / "_manifest.json").read_text())
    val = [decode_shard(str(run_with_samples / "shards" / u["name"]), 32, config.storage)["images"]
           for u in shards["units"] if u["name"].startswith("val-")]  # fmt: skip
    images = np.concatenate(val)
    vae = RQVAE.from_pretrained(str(run_with_samples / "vae" / "model"))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    recon = vae.decode_codes(vae.encode(x)).clamp(-1, 1)
    mse = (recon - x).pow(2).flatten(1).mean(1)
    assert metrics["vae"]["images"] == len(images)
    assert metrics["vae"]["psnr"] == pytest.approx(float((10 * torch.log10(4 / mse)).mean()),
                                                   abs=1e-3)  # fmt: skip
    assert len(metrics["vae"]["psnr_per_depth"]) == 4
    with torch.no_grad():
        direct_lpips = PerceptualLoss(lpips).per_image(recon, x).mean().item()
    assert metrics["vae"]["lpips"] == pytest.approx(direct_lpips, rel=1e-4)
    classifier = ImageClassifier.from_pretrained(classifier_folder)
    recon_pixels = ((recon + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    real_f = _features(classifier, images)
    recon_f = _features(classifier, recon_pixels.permute(0, 2, 3, 1).numpy())
    from torchmetrics.image.fid import _compute_fid

    stats = [torch.tensor(s) for f in (real_f, recon_f) for s in FeatureMoments.of(f).mean_cov()]
    assert metrics["vae"]["demo_rfid"] == pytest.approx(float(_compute_fid(*stats)), rel=1e-4)
    assert "fid" not in metrics["samples"] and metrics["samples"]["images"] == 12
    assert metrics["samples"]["precision_recall"]["reference_images"] == 12  # equal sets
    assert set(metrics["samples"]["demo_fid_per_class"]) == {"0", "1", "2", "3"}
    report = (run_with_samples / "eval" / "report.md").read_text()
    assert "demo FID (classifier features, not Inception)" in report
    assert (run_with_samples / "eval" / "psnr-per-depth.png").stat().st_size > 1000
    with np.load(run_with_samples / "eval" / "reference.npz") as reference:
        assert int(reference["count"]) == metrics["reference"]["images"] > 0
    assert manifest.counts["samples_images"] == 12

    # A re-run is a no-op; a lost unit is redone alone and the figures do not move.
    units = run_with_samples / "eval" / "units"
    before = {p.name: p.stat().st_mtime_ns for p in units.iterdir()}
    assert run_evaluate_stage(str(run_with_samples), config).fingerprint == manifest.fingerprint
    assert {p.name: p.stat().st_mtime_ns for p in units.iterdir()} == before
    (run_with_samples / "eval" / "_manifest.json").unlink()
    lost = sorted(units.glob("train-*.json"))[0]
    lost.unlink()
    run_evaluate_stage(str(run_with_samples), config)
    after = {p.name: p.stat().st_mtime_ns for p in units.iterdir()}
    changed = {n for n in after if after[n] != before.get(n)}
    assert changed == {lost.name, lost.with_suffix(".npz").name}
    assert json.loads((run_with_samples / "eval" / "metrics.json").read_text()) == metrics


def test_inception_features_through_the_cli_and_a_reference_file(run_with_samples, inception_file,
                                                                 tmp_path, capsys):  # fmt: skip
    code = main(["evaluate", "--run-dir", str(run_with_samples), "reference=val",
                 f"weights={inception_file}", "cpus_per_actor=0.5", "batch_size=8"])  # fmt: skip
    assert code == 0
    metrics = json.loads((run_with_samples / "eval" / "metrics.json").read_text())
    assert {"fid", "inception_score", "precision_recall"} <= set(metrics["samples"])
    assert metrics["features"]["kind"] == "inception" and "rfid" in metrics["vae"]
    assert "FID" in capsys.readouterr().out
    assert "clip_score" not in metrics["samples"]  # no clip= given
    # The same statistics from a user's reference file: the same FID, no precision/recall.
    shutil.copy(run_with_samples / "eval" / "reference.npz", tmp_path / "ref.npz")
    assert main(["evaluate", "--run-dir", str(run_with_samples), "--overwrite",
                 f"reference={tmp_path / 'ref.npz'}", f"weights={inception_file}",
                 "reconstructions=false", "cpus_per_actor=0.5"]) == 0  # fmt: skip
    from_file = json.loads((run_with_samples / "eval" / "metrics.json").read_text())
    assert from_file["samples"]["fid"] == pytest.approx(metrics["samples"]["fid"], rel=1e-9)
    assert from_file["samples"]["precision_recall"].startswith("not computed")
    assert "vae" not in from_file


def test_bad_configuration_is_refused_with_what_to_do(run_with_samples, tmp_path, capsys):
    with pytest.raises(ValueError, match="needs weights=FOLDER"):
        EvaluateConfig(features="classifier")
    with pytest.raises(ValueError, match=r"must be one of .*'clip'"):
        EvaluateConfig(features="clip")
    assert EvaluateConfig(features="classifier", enabled=False).weights is None
    code = main(["evaluate", "--run-dir", str(run_with_samples), f"weights={tmp_path / 'no.pth'}"])
    assert code == 1 and "Inception weights not found" in capsys.readouterr().err
