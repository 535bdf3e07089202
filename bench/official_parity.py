"""Exactness of `rqpipe import-official` against the official code itself.

Needs a checkout of kakaobrain/rq-vae-transformer (not part of rqpipe: its code is imported
from the path you give, never copied) and `omegaconf`. For each published config named below it
builds the official model with random weights, saves an official-format checkpoint
({'state_dict', 'optimizer', ...}), imports it through the real `import_official`, and compares:
the RQ-VAE's latents, codes and reconstructions; the RQ-Transformer's logits for the same codes
and classes (or captions).

    git clone https://github.com/kakaobrain/rq-vae-transformer /tmp/official
    pip install --target /tmp/scratch-pkgs --no-deps omegaconf antlr4-python3-runtime==4.9.3
    PYTHONPATH=/tmp/scratch-pkgs .venv/bin/python bench/official_parity.py \
        --official-repo /tmp/official [--layers 2]

--layers N shortens every transformer stack to N layers (a quick check); without it the
published sizes are built (480M, 350M and 650M parameters: about 12 GB of memory, minutes).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.rqtransformer import RQTransformer  # noqa: E402
from model.rqvae import RQVAE  # noqa: E402
from pipeline.tools.official_import import import_official  # noqa: E402

PAIRS = (  # (RQ-VAE config, RQ-Transformer config) as published together
    ("configs/imagenet256/stage1/in256-rqvae-8x8x4.yaml",  # class-conditional, K 16384
     "configs/imagenet256/stage2/in256-rqtransformer-8x8x4-480M.yaml"),
    ("configs/ffhq/stage1/ffhq256-rqvae-8x8x4.yaml",  # unconditional, K 2048
     "configs/ffhq/stage2/ffhq256-rqtransformer-8x8x4-350M.yaml"),
    # CC-3M's RQ-VAE config ships only with its checkpoint; it has the ImageNet shapes
    ("configs/imagenet256/stage1/in256-rqvae-8x8x4.yaml",  # 32 caption tokens condition it
     "configs/cc3m/cc3m-rqtransformer-8x8x4-650M.yaml"),
)  # fmt: skip
BLOCK_DEFAULTS = dict(mlp_bias=True, attn_bias=True, attn_pdrop=0.0, resid_pdrop=0.1, gelu="v1")
ARCH_DEFAULTS = dict(vocab_size_cond=0, block_size_cond=0, input_embed_dim=None,
                     use_padding_emb=False, input_emb_vqvae=False, head_emb_vqvae=False,
                     scaled_head_emb_vqvae=False, cumsum_depth_ctx=False, shared_tok_emb=False,
                     embd_pdrop=0.0, shared_cls_emb=False)  # fmt: skip


def official_modules(repo: Path):
    """The official RQVAE and RQTransformer classes. Their configs module declares dataclass
    defaults that Python >= 3.11 rejects, and is only used for annotations on this path: a
    stand-in takes its place."""
    sys.path.insert(0, str(repo))
    stub = types.ModuleType("rqvae.models.rqtransformer.configs")
    stub.AttentionBlockConfig = stub.AttentionStackConfig = stub.RQTransformerConfig = object
    sys.modules[stub.__name__] = stub
    from rqvae.models.rqtransformer.transformers import RQTransformer as OfficialAR
    from rqvae.models.rqvae.rqvae import RQVAE as OfficialVAE

    return OfficialVAE, OfficialAR


def official_arch(path: Path, layers: int | None):
    """The config's arch with the official defaults filled in (RQTransformerConfig.create)."""
    from omegaconf import OmegaConf

    document = yaml.safe_load(path.read_text())
    arch = {**ARCH_DEFAULTS, "vocab_size": document["dataset"]["vocab_size"], **document["arch"]}
    for stack in ("body", "head"):
        arch[stack] = dict(arch[stack])
        arch[stack]["block"] = {**BLOCK_DEFAULTS, "embed_dim": arch["embed_dim"],
                                **arch[stack]["block"]}  # fmt: skip
        if layers:
            arch[stack]["n_layer"] = layers
    return OmegaConf.create(arch), {**document, "arch": arch}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official-repo", required=True, type=Path)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    OfficialVAE, OfficialAR = official_modules(args.official_repo)
    work = Path(tempfile.mkdtemp(prefix="official-parity-"))

    for vae_config, ar_config in PAIRS:
        theirs = check_rqvae(OfficialVAE, args.official_repo / vae_config, work, args.images)
        check_rqtransformer(OfficialAR, args.official_repo / ar_config, work, theirs, args.layers)


def check_rqvae(OfficialVAE, path: Path, work: Path, count: int):
    document = yaml.safe_load(path.read_text())
    arch = document["arch"]
    theirs = OfficialVAE(**arch["hparams"], ddconfig=arch["ddconfig"], checkpointing=False).eval()
    images = torch.rand(count, 3, 256, 256) * 2 - 1
    latents = theirs.encode(images)  # (B, 8, 8, 256)
    # A codebook at the latents' scale, so that the codes vary (a random init's do not).
    for book in theirs.quantizer.codebooks:
        book.weight.normal_().mul_(latents.std())
    torch.save({"state_dict": theirs.state_dict(), "optimizer": {"state": {}, "param_groups": []},
                "epoch": 1}, work / "stage1.pt")  # fmt: skip
    (work / "stage1.yaml").write_text(yaml.safe_dump(document))
    started = time.time()
    record = import_official("rqvae", str(work / "stage1.pt"), str(work / "stage1.yaml"),
                             str(work / "rqvae"))  # fmt: skip
    ours = RQVAE.from_pretrained(str(work / "rqvae"))
    their_codes = theirs.get_codes(images)
    our_codes = ours.encode(images)
    their_recon, our_recon = theirs.decode_code(their_codes), ours.decode_codes(their_codes)
    print(f"{path.stem}: imported in {time.time() - started:.1f} s, "
          f"{record['tensors_imported']} tensors, dropped {len(record['dropped_tensors'])}, "
          f"left out {list(record['left_out'])}\n"
          f"  latents max rel diff {rel(ours.encode_latents(images), latents):.2e}; codes equal "
          f"{float((their_codes == our_codes).float().mean()):.4%} of {their_codes.numel()} "
          f"({len(their_codes.unique())} distinct); reconstruction max abs diff "
          f"{float((their_recon - our_recon).abs().max()):.2e} "
          f"(rel {rel(our_recon, their_recon):.2e})", flush=True)  # fmt: skip
    return theirs


def check_rqtransformer(OfficialAR, path: Path, work: Path, vae, layers: int | None) -> None:
    config, document = official_arch(path, layers)
    theirs = OfficialAR(config).eval()
    torch.save({"state_dict": theirs.state_dict(), "epoch": 1}, work / "stage2.pt")
    (work / "stage2.yaml").write_text(yaml.safe_dump(document))
    started = time.time()
    record = import_official("rqtransformer", str(work / "stage2.pt"), str(work / "stage2.yaml"),
                             str(work / "ar"), rqvae_uri=str(work / "rqvae"))  # fmt: skip
    ours = RQTransformer.from_pretrained(str(work / "ar"))
    codes = torch.randint(0, config.vocab_size, (2, 8, 8, 4))
    classes, length = config.vocab_size_cond, config.block_size_cond
    cond = torch.randint(0, classes, (2, length)) if classes > 1 else None
    if length > 1:  # a caption: both models also predict its next tokens
        their_logits, their_text = theirs(codes, model_aux=vae, cond=cond)
        our_logits, our_text = ours(codes, text=cond, return_text_logits=True)
        print(f"  caption logits max abs diff {float((their_text - our_text).abs().max()):.2e} "
              f"(rel {rel(our_text, their_text):.2e})")  # fmt: skip
    else:
        labels = None if cond is None else cond[:, 0]
        their_logits, our_logits = theirs(codes, model_aux=vae, cond=labels), ours(codes, labels)
    same_argmax = float((their_logits.argmax(-1) == our_logits.argmax(-1)).float().mean())
    print(f"{path.stem}: {record['parameters'] / 1e6:.0f}M parameters, imported in "
          f"{time.time() - started:.1f} s, dropped {list(record['dropped_tensors'])}\n"
          f"  logits max abs diff {float((their_logits - our_logits).abs().max()):.2e} "
          f"(rel {rel(our_logits, their_logits):.2e}), argmax equal {same_argmax:.4%}",
          flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
