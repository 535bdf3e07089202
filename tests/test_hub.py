"""Hugging Face Hub models: URI parsing, loading from the real huggingface_hub cache offline, and
the error paths of a machine without the Hub (this one). Uploading needs a token and a network:
docs/pretrained.md."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.hub import hub_repo
from model.rqvae import RQVAE, RQVAEConfig

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
