"""Hugging Face Hub models: URI parsing, loading from the real huggingface_hub cache offline, and
the error paths of a machine without the Hub (this one). Uploading needs a token and a network:
docs/pretrained.md."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.rqvae import RQVAE, RQVAEConfig
from model.weights.hub import hub_repo

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("uri, expected", [
    ("hf://kakaobrain/rqvae-in256", ("kakaobrain/rqvae-in256", None)),
    ("hf://org/name@v1.0", ("org/name", "v1.0")),
    ("hf://org/name/", ("org/name", None)),
    ("org/name", ("org/name", None)),  # plain, when no such local folder exists
    ("org/name@main", ("org/name", "main")),
    ("runs/demo/vae/model", None),  # a relative path of more than two parts
    ("./org/name", None),
    ("/abs/org", None),
    ("s3://bucket/model", None),
    ("file:///tmp/model", None),
])  # fmt: skip
def test_hub_uris(uri, expected):
    assert hub_repo(uri) == expected


def test_an_existing_local_folder_is_never_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub_repo("org/name") is None
    with pytest.raises(ValueError, match="hf://org/name"):
        hub_repo("hf://org/na me/x")


def run_python(code: str, hf_home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_TOKEN", None)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_from_pretrained_reads_the_hub_cache_offline(tmp_path):
    """A model in huggingface_hub's cache layout (what `hf download` leaves) loads with
    HF_HUB_OFFLINE=1, through the same from_pretrained as any folder."""
    torch.manual_seed(0)
    model = RQVAE(RQVAEConfig.preset("tiny")).eval()
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--someorg--tiny-rqvae"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    model.save_pretrained(str(repo / "snapshots" / commit))
    torch.save(model.state_dict(), tmp_path / "expected.pt")
    code = ("import torch; from model.rqvae import RQVAE\n"
            "for uri in ('hf://someorg/tiny-rqvae', 'someorg/tiny-rqvae'):\n"
            "    m = RQVAE.from_pretrained(uri)\n"
            f"    e = torch.load('{tmp_path / 'expected.pt'}', weights_only=True)\n"
            "    assert all(torch.equal(m.state_dict()[k], v) for k, v in e.items())\n"
            "print('loaded')")  # fmt: skip
    result = run_python(code, tmp_path / "hf")
    assert result.returncode == 0 and "loaded" in result.stdout, result.stderr


def test_missing_hub_models_say_what_to_do(tmp_path):
    code = ("from model.rqvae import RQVAE\n"
            "for uri in ('hf://kakaobrain/rqvae-in256@v2', 'kakaobrain/rqvae-in256'):\n"
            "    try:\n"
            "        RQVAE.from_pretrained(uri)\n"
            "    except FileNotFoundError as e:\n"
            "        print(e)\n")  # fmt: skip
    result = run_python(code, tmp_path / "hf")
    lines = result.stdout.strip().splitlines()
    assert result.returncode == 0 and len(lines) == 2, result.stderr
    assert all("not in the Hugging Face cache" in line and "HF_HUB_OFFLINE" in line
               and "hf download kakaobrain/rqvae-in256" in line for line in lines)  # fmt: skip
    assert lines[1].startswith("kakaobrain/rqvae-in256: no local folder of that name")


def test_push_refuses_clearly_without_a_hub(tmp_path):
    RQVAE(RQVAEConfig.preset("tiny")).save_pretrained(str(tmp_path / "model"))
    push = "from pipeline.cli import main; import sys; sys.exit(main(sys.argv[1:]))"
    for folder, expected in ((tmp_path, "not a model folder"),
                             (tmp_path / "model", "HF_HUB_OFFLINE is set")):  # fmt: skip
        result = subprocess.run([sys.executable, "-c", push, "push", str(folder), "org/name"],
                                cwd=REPO, capture_output=True, text=True, timeout=120,
                                env={**os.environ, "HF_HOME": str(tmp_path / "hf"),
                                     "HF_HUB_OFFLINE": "1"})  # fmt: skip
        assert result.returncode == 1 and expected in result.stderr, result.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_HUB_OFFLINE")}
    result = subprocess.run([sys.executable, "-c", push, "push", str(tmp_path / "model"),
                             "org/name"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**env, "HF_HOME": str(tmp_path / "hf")})  # fmt: skip
    assert result.returncode == 1 and "no Hugging Face token" in result.stderr, result.stderr


def hub_cache_model(hf_home: Path, repo_id: str, folder: Path) -> None:
    """`folder` (a saved model) placed in huggingface_hub's cache layout, as `hf download`
    leaves it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


STAGES_ON_HUB_MODELS = """
import hashlib, json, shutil, sys
from pathlib import Path
import ray, torch
sys.path.insert(0, "tests")
from test_hub import hub_cache_model
from model.rqtransformer import RQTransformer
from model.rqvae import RQVAE
from pipeline.core.storage import Storage
from pipeline.core.tracking import TrackingConfig
from pipeline.stages.encode import EncodeConfig, run_encode_stage
from pipeline.stages.train_ar import TrainARConfig, run_train_ar_stage
from pipeline.tools.analysis import decode_key, read_codes

run, hf_home = Path(sys.argv[1]), Path(sys.argv[2])
ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
vae = "hf://someorg/tiny-rqvae"
run_encode_stage(str(run), EncodeConfig(vae=vae, cpus_per_actor=0.5), overwrite=True)
ar = dict(steps=2, batch_size=8, num_workers=1, cpus_per_worker=0.5, log_every=1,
          checkpoint_every=2, preview_per_class=1, vae=vae, tracking=TrackingConfig("none"))
# The model to fine-tune: the stage's architecture on the Hub VAE's codebooks, untrained.
torch.manual_seed(0)
codebooks = RQVAE.from_pretrained(vae).quantizer.codebooks
first = RQTransformer(TrainARConfig(**ar).model_config([8, 8, 4], 256, 4), codebooks)
first.save_pretrained(str(run / "start"))
hub_cache_model(hf_home, "someorg/tiny-ar", run / "start")
weights = (run / "start" / "model.safetensors").read_bytes()
manifest = run_train_ar_stage(str(run), TrainARConfig(**{**ar, "init_from": "someorg/tiny-ar"}))
assert manifest.upstream["init_from"] == hashlib.sha256(weights).hexdigest()[:32]
assert "init_from: someorg/tiny-ar" in (run / "ar" / "config.yaml").read_text()  # as given
tuned = RQTransformer.from_pretrained(str(run / "ar" / "model"))
moved = [(tuned.state_dict()[k] - v).abs().max().item() for k, v in first.state_dict().items()]
assert 0 < max(moved) < 0.1, max(moved)  # two steps on from the Hub model, not from scratch
key = read_codes(Storage(), str(run)).column("key")[0].as_py()
assert decode_key(Storage(), str(run), key, 2, vae).shape == (32, 32, 3)
ray.shutdown()
print("hub models ok")
"""


@pytest.mark.slow
def test_stages_take_hub_models(encoded_run, tmp_path):
    """encode.vae, train_ar.vae, train_ar.init_from and `rqpipe decode --vae` take a Hub
    model: the Ray workers fetch it into their own cache (here: the one HF_HOME, offline), the
    driver checks and fingerprints its copy."""
    run = tmp_path / "run"
    shutil.copytree(encoded_run, run)
    hub_cache_model(tmp_path / "hf", "someorg/tiny-rqvae", encoded_run / "vae" / "model")
    shutil.rmtree(run / "vae")  # nothing local to fall back on
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "HF_TOKEN")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", STAGES_ON_HUB_MODELS, str(run),
                             str(tmp_path / "hf")], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0 and "hub models ok" in result.stdout, result.stderr[-3000:]
    codes = json.loads((run / "codes" / "_manifest.json").read_text())
    weights = (encoded_run / "vae" / "model" / "model.safetensors").read_bytes()
    assert codes["upstream"]["vae"] == hashlib.sha256(weights).hexdigest()[:32]
