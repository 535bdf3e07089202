"""The official RQ-VAE / RQ-Transformer checkpoints (kakaobrain/rq-vae-transformer) in our modules.

The official code is not imported or copied: its layout was read from the published source and
configs and is written down here as a name map. Each official tensor is mapped by name and
checked by shape; an unknown, missing or misshapen tensor is an error naming it. Only what
inference never reads is dropped, and every drop is listed.

Layout (official -> ours), the RQ-VAE:
    encoder.down.{i}.block.{j}        -> encoder.down.{2i}.{j or 2j with attention}
    encoder.down.{i}.attn.{j}.q|k|v   -> ... .{2j+1}.qkv (concatenated)   proj_out -> proj
    encoder.down.{i}.downsample       -> encoder.down.{2i+1}
    decoder.up.{i}                    -> decoder.up.{2(N-1-i)} (ours in execution order)
    {en,de}coder.mid.block_1|attn_1|block_2 -> mid.0|1|2     nin_shortcut -> skip
    quantizer.codebooks.{d}.weight    -> quantizer.codebooks[d] (its last row, the unused
                                         padding_idx row, dropped; shared books: d = 0 only)
    quantizer.codebooks.{d}.cluster_size_ema / embed_ema -> quantizer.ema_count / ema_sum
The RQ-Transformer (the published configs all set input_emb_vqvae, head_emb_vqvae,
cumsum_depth_ctx, shared_tok_emb and shared_cls_emb):
    cond_emb                          -> class_embedding (text models: text_embedding)
    pos_emb_cond[:L-1]                -> text_pos (text models, L = block_size_cond caption
                                         tokens), cond_classifier -> text_head
    pos_emb_cond[L-1], pos_emb_hw[:T-1] -> pos_embedding[0], pos_embedding[1:] (the official
                                         position embedding labels the code's own position,
                                         ours the position it predicts; pos_emb_hw[T-1] is
                                         never read and is dropped)
    input_mlp (applied per depth, then summed) -> proj_spatial (applied to the sum: bias x D)
    head_mlp                          -> proj_depth
    pos_emb_d                         -> depth_embedding
    {body,head}_transformer.blocks.{i} -> {spatial,depth_transformer}.blocks.{i}
        attn.query|key|value -> attn.qkv (concatenated), mlp.0|2 -> mlp.0|2
    classifier.layer_norm | linear    -> depth_transformer.ln_f | head
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from model.rqtransformer import RQTransformer, RQTransformerConfig
from model.rqvae import RQVAE, RQVAEConfig

# Training state in official checkpoints, never needed to run the model.
TRAINING_ONLY_KEYS = ("discriminator", "optimizer", "scheduler", "epoch", "state_dict_ema")


class OfficialFormatError(ValueError):
    """An official checkpoint or config that does not fit the documented layout."""


# -- configs ---------------------------------------------------------------------------------


def _require(section: dict[str, Any], key: str, expected: Any, where: str) -> None:
    found = section.get(key, expected)
    if found != expected:
        raise OfficialFormatError(f"{where}.{key} = {found!r}: only {expected!r} is supported "
                                  f"(every published config uses it)")  # fmt: skip


def arch_section(document: dict[str, Any]) -> dict[str, Any]:
    """The `arch:` section of an official config.yaml (or the document, if it is one)."""
    arch = document.get("arch", document)
    if not isinstance(arch, dict) or "type" not in arch:
        raise OfficialFormatError("not an official rq-vae-transformer config: no arch.type")
    return arch


def rqvae_config(document: dict[str, Any]) -> RQVAEConfig:
    """Our RQVAEConfig for an official stage-1 config (arch.type rq-vae)."""
    arch = arch_section(document)
    if arch["type"] != "rq-vae":
        raise OfficialFormatError(f"arch.type is {arch['type']!r}: this is not an RQ-VAE config "
                                  f"(use --kind rqtransformer?)")  # fmt: skip
    hp, dd = arch.get("hparams", {}), arch.get("ddconfig", {})
    _require(hp, "bottleneck_type", "rq", "arch.hparams")
    _require(dd, "double_z", False, "arch.ddconfig")
    _require(dd, "resamp_with_conv", True, "arch.ddconfig")
    _require(dd, "out_ch", dd.get("in_channels", 3), "arch.ddconfig")
    latent, code = list(hp["latent_shape"]), list(hp["code_shape"])
    if latent[:2] != code[:2]:
        raise OfficialFormatError(f"latent_shape {latent} and code_shape {code} differ in H, W: "
                                  f"spatially grouped codes are not supported")  # fmt: skip
    widths = [dd["ch"] * m for m in dd["ch_mult"]]
    if any(w % 128 for w in widths):  # GroupNorm(32) in ours too only then (model/rqvae.py)
        raise OfficialFormatError(f"channel widths {widths}: only multiples of 128 are "
                                  f"supported (32 GroupNorm groups)")  # fmt: skip
    return RQVAEConfig(
        resolution=dd["resolution"], in_channels=dd.get("in_channels", 3), ch=dd["ch"],
        ch_mult=list(dd["ch_mult"]), num_res_blocks=dd["num_res_blocks"],
        attn_resolutions=list(dd["attn_resolutions"]), dropout=float(dd.get("dropout", 0.0)),
        z_channels=dd["z_channels"], embed_dim=hp["embed_dim"], codebook_size=hp["n_embed"],
        code_depth=code[2], shared_codebook=bool(hp.get("shared_codebook", False)),
        decay=float(hp.get("decay", 0.99)),
        restart_threshold=1.0 if hp.get("restart_unused_codes", False) else 0.0,
        kmeans_init=False, commitment_weight=float(hp.get("latent_loss_weight", 0.25)),
        distance_dtype="float32", ema_update="per_depth",
    )  # fmt: skip


def rqtransformer_config(document: dict[str, Any]) -> RQTransformerConfig:
    """Our RQTransformerConfig for an official stage-2 config (arch.type rq-transformer)."""
    arch = arch_section(document)
    if arch["type"] != "rq-transformer":
        raise OfficialFormatError(f"arch.type is {arch['type']!r}: this is not an "
                                  f"RQ-Transformer config (use --kind rqvae?)")  # fmt: skip
    for flag in ("input_emb_vqvae", "head_emb_vqvae", "cumsum_depth_ctx", "shared_tok_emb",
                 "shared_cls_emb"):  # fmt: skip
        _require(arch, flag, True, "arch")
    _require(arch, "scaled_head_emb_vqvae", False, "arch")
    _require(arch, "use_padding_emb", False, "arch")
    _require(arch, "embd_pdrop", 0.0, "arch")
    text_length = int(arch.get("block_size_cond", 0))  # > 1: caption tokens (CC-3M)
    blocks = {}
    for stack in ("body", "head"):
        block = dict(arch.get(stack, {}).get("block", {}))
        _require(block, "mlp_bias", True, f"arch.{stack}.block")
        _require(block, "attn_bias", True, f"arch.{stack}.block")
        _require(block, "gelu", "v1", f"arch.{stack}.block")
        blocks[stack] = block
    if blocks["body"].get("n_head") != blocks["head"].get("n_head"):
        raise OfficialFormatError("body and head transformers with different n_head are not "
                                  "supported")  # fmt: skip
    # The published stage-2 configs give the codebook size as dataset.vocab_size
    vocab = arch.get("vocab_size", document.get("dataset", {}).get("vocab_size"))
    if vocab is None:
        raise OfficialFormatError("no vocab_size in arch or dataset: the codebook size")
    if isinstance(vocab, (list, tuple)):
        if len(set(vocab)) != 1:
            raise OfficialFormatError(f"vocab_size {vocab}: one codebook size for all depths only")
        vocab = vocab[0]
    classes = int(arch.get("vocab_size_cond", 0))
    text = text_length > 1
    return RQTransformerConfig(
        code_shape=list(arch["block_size"]), codebook_size=int(vocab),
        width=int(arch["embed_dim"]), heads=int(blocks["body"]["n_head"]),
        spatial_layers=int(arch["body"]["n_layer"]), depth_layers=int(arch["head"]["n_layer"]),
        mlp_ratio=4, dropout=float(blocks["body"].get("resid_pdrop", 0.1)),
        attn_dropout=float(blocks["body"].get("attn_pdrop", 0.0)),
        num_classes=classes if classes > 1 and not text else 0, label_dropout=0.0,
        null_label_embedding=False, spatial_final_norm=False,
        text_vocab_size=classes if text else 0, text_length=text_length if text else 0,
        caption_dropout=0.0,
    )  # fmt: skip


# -- state dicts -----------------------------------------------------------------------------

# ours <- (the official tensors it is made of, how they combine)
NameMap = dict[str, tuple[list[str], Callable[[list[Tensor]], Tensor]]]


def _same(parts: list[Tensor]) -> Tensor:
    return parts[0]


def _concat(parts: list[Tensor]) -> Tensor:
    return torch.cat(parts, dim=0)


def _copy(names: NameMap, ours: str, official: str, suffixes: tuple[str, ...]) -> None:
    for suffix in suffixes:
        names[f"{ours}.{suffix}"] = ([f"{official}.{suffix}"], _same)


def _resnet(names: NameMap, ours: str, official: str, in_ch: int, out_ch: int) -> None:
    for part in ("norm1", "conv1", "norm2", "conv2"):
        _copy(names, f"{ours}.{part}", f"{official}.{part}", ("weight", "bias"))
    if in_ch != out_ch:
        _copy(names, f"{ours}.skip", f"{official}.nin_shortcut", ("weight", "bias"))


def _attention(names: NameMap, ours: str, official: str) -> None:
    _copy(names, f"{ours}.norm", f"{official}.norm", ("weight", "bias"))
    for suffix in ("weight", "bias"):
        names[f"{ours}.qkv.{suffix}"] = ([f"{official}.{p}.{suffix}" for p in "qkv"], _concat)
    _copy(names, f"{ours}.proj", f"{official}.proj_out", ("weight", "bias"))


def _level(names: NameMap, ours: str, official: str, blocks: int, attn: bool,
           in_ch: int, out_ch: int) -> None:  # fmt: skip
    for j in range(blocks):
        index = 2 * j if attn else j
        _resnet(names, f"{ours}.{index}", f"{official}.block.{j}", in_ch if j == 0 else out_ch,
                out_ch)  # fmt: skip
        if attn:
            _attention(names, f"{ours}.{index + 1}", f"{official}.attn.{j}")


def _middle(names: NameMap, ours: str, official: str, ch: int) -> None:
    _resnet(names, f"{ours}.0", f"{official}.block_1", ch, ch)
    _attention(names, f"{ours}.1", f"{official}.attn_1")
    _resnet(names, f"{ours}.2", f"{official}.block_2", ch, ch)


def rqvae_name_map(cfg: RQVAEConfig) -> NameMap:
    names: NameMap = {}
    levels, widths = len(cfg.ch_mult), [cfg.ch * m for m in cfg.ch_mult]
    for part in ("encoder.conv_in", "encoder.norm_out", "encoder.conv_out", "quant_conv",
                 "post_quant_conv", "decoder.conv_in", "decoder.norm_out", "decoder.conv_out"):  # fmt: skip
        _copy(names, part, part, ("weight", "bias"))
    in_ch, res = cfg.ch, cfg.resolution
    for i, out_ch in enumerate(widths):
        _level(names, f"encoder.down.{2 * i}", f"encoder.down.{i}", cfg.num_res_blocks,
               res in cfg.attn_resolutions, in_ch, out_ch)  # fmt: skip
        if i < levels - 1:
            _copy(names, f"encoder.down.{2 * i + 1}.conv", f"encoder.down.{i}.downsample.conv",
                  ("weight", "bias"))  # fmt: skip
            res //= 2
        in_ch = out_ch
    _middle(names, "encoder.mid", "encoder.mid", in_ch)
    _middle(names, "decoder.mid", "decoder.mid", in_ch)
    for k, i in enumerate(reversed(range(levels))):  # ours run lowest resolution first
        _level(names, f"decoder.up.{2 * k}", f"decoder.up.{i}", cfg.num_res_blocks + 1,
               res in cfg.attn_resolutions, in_ch, widths[i])  # fmt: skip
        if i > 0:
            _copy(names, f"decoder.up.{2 * k + 1}.conv", f"decoder.up.{i}.upsample.conv",
                  ("weight", "bias"))  # fmt: skip
            res *= 2
        in_ch = widths[i]
    books = range(1) if cfg.shared_codebook else range(cfg.code_depth)
    k = cfg.codebook_size
    stack = lambda ps: torch.stack(ps)  # noqa: E731  (books, ...) from one tensor per book
    names["quantizer.codebooks"] = ([f"quantizer.codebooks.{d}.weight" for d in books],
                                    lambda ps: torch.stack([p[:k] for p in ps]))  # fmt: skip
    names["quantizer.ema_count"] = ([f"quantizer.codebooks.{d}.cluster_size_ema" for d in books],
                                    stack)  # fmt: skip
    names["quantizer.ema_sum"] = ([f"quantizer.codebooks.{d}.embed_ema" for d in books], stack)
    return names


def rqtransformer_name_map(cfg: RQTransformerConfig) -> NameMap:
    names: NameMap = {}
    depth, positions = cfg.depth, cfg.num_positions
    prefix = max(cfg.text_length, 1) - 1  # caption tokens before position 0
    if cfg.text_vocab_size:
        names["text_embedding.weight"] = (["cond_emb.weight"], _same)
        names["text_pos"] = (["pos_emb_cond"], lambda ps: ps[0][0, :prefix])
        _copy(names, "text_head.0", "cond_classifier.layer_norm", ("weight", "bias"))
        _copy(names, "text_head.1", "cond_classifier.linear", ("weight", "bias"))
    else:
        names["class_embedding.weight"] = (["cond_emb.weight"], _same)
    # position 0 holds the last condition token (the class, or the caption's last token)
    names["pos_embedding"] = (["pos_emb_cond", "pos_emb_hw"],
                              lambda ps: torch.cat([ps[0][0, prefix : prefix + 1],
                                                    ps[1][0, : positions - 1]]))  # fmt: skip
    names["depth_embedding"] = (["pos_emb_d"], lambda ps: ps[0][0])
    names["proj_spatial.weight"] = (["input_mlp.weight"], _same)
    # sum_d (W e_d + b) = W (sum_d e_d) + D b: the official applies input_mlp before the sum
    names["proj_spatial.bias"] = (["input_mlp.bias"], lambda ps: ps[0] * depth)
    _copy(names, "proj_depth", "head_mlp", ("weight", "bias"))
    for ours, official, layers in (("spatial", "body_transformer", cfg.spatial_layers),
                                   ("depth_transformer", "head_transformer", cfg.depth_layers)):  # fmt: skip
        for i in range(layers):
            o, b = f"{ours}.blocks.{i}", f"{official}.blocks.{i}"
            for part in ("ln1", "ln2", "attn.proj", "mlp.0", "mlp.2"):
                _copy(names, f"{o}.{part}", f"{b}.{part}", ("weight", "bias"))
            for suffix in ("weight", "bias"):
                names[f"{o}.attn.qkv.{suffix}"] = (
                    [f"{b}.attn.{p}.{suffix}" for p in ("query", "key", "value")],
                    _concat,
                )
    _copy(names, "depth_transformer.ln_f", "classifier.layer_norm", ("weight", "bias"))
    _copy(names, "head", "classifier.linear", ("weight", "bias"))
    return names


def _dropped_rqvae(official: dict[str, Tensor], cfg: RQVAEConfig) -> dict[str, str]:
    dropped = {}
    for d in range(1 if cfg.shared_codebook else cfg.code_depth):
        name = f"quantizer.codebooks.{d}.weight"
        if name in official:
            dropped[f"{name}[{cfg.codebook_size}]"] = "padding row, never a code"
    if cfg.shared_codebook:  # the same module at every depth: each copy must be book 0
        for d in range(1, cfg.code_depth):
            for suffix in ("weight", "cluster_size_ema", "embed_ema"):
                name, first = (f"quantizer.codebooks.{i}.{suffix}" for i in (d, 0))
                if name in official and first in official:
                    if not torch.equal(official[name], official[first]):
                        raise OfficialFormatError(f"{name} differs from {first}, but the config "
                                                  f"says shared_codebook: true")  # fmt: skip
                    dropped[name] = "the shared codebook again"
    return dropped


def convert_state_dict(
    official: dict[str, Tensor], names: NameMap, expected: dict[str, Tensor],
    dropped: dict[str, str],
) -> dict[str, Tensor]:  # fmt: skip
    """Our state dict from an official one: every tensor of `official` is used by `names` or
    listed in `dropped` (name -> why); each result must have `expected`'s shape."""
    used = {name for sources, _ in names.values() for name in sources}
    listed = {name for name in dropped if "[" not in name}  # "x[i]": a row of a used tensor
    unknown = sorted(set(official) - used - listed)
    if unknown:
        raise OfficialFormatError(f"{len(unknown)} unknown tensor(s) in the checkpoint, e.g. "
                                  f"{unknown[:5]}: not the layout of this config")  # fmt: skip
    missing = sorted(n for n in used if n not in official)
    if missing:
        raise OfficialFormatError(f"{len(missing)} tensor(s) missing from the checkpoint, e.g. "
                                  f"{missing[:5]}")  # fmt: skip
    state = {}
    for ours, (sources, combine) in names.items():
        try:
            value = combine([official[n].float() for n in sources])
        except (RuntimeError, IndexError) as error:
            shapes = {n: tuple(official[n].shape) for n in sources}
            raise OfficialFormatError(f"tensor(s) {shapes} do not combine: {error}") from None
        if ours not in expected:
            raise AssertionError(f"name map names {ours!r}, which our model does not have")
        if value.shape != expected[ours].shape:
            shapes = {n: tuple(official[n].shape) for n in sources}
            raise OfficialFormatError(f"{shapes} has the wrong shape: it gives {ours} "
                                      f"{tuple(value.shape)}, the config implies "
                                      f"{tuple(expected[ours].shape)}")  # fmt: skip
        state[ours] = value.to(expected[ours].dtype)
    return state


def import_rqvae(official: dict[str, Tensor], cfg: RQVAEConfig) -> tuple[RQVAE, dict[str, str]]:
    """-> (our RQ-VAE holding the official weights, the dropped tensors with why)."""
    model = RQVAE(cfg)
    expected = model.state_dict()
    dropped = _dropped_rqvae(official, cfg)
    state = convert_state_dict(official, rqvae_name_map(cfg), expected, dropped)
    state["quantizer.initialized"] = torch.tensor(True)
    model.load_state_dict(state)  # strict: every tensor of ours is filled
    return model.eval(), dropped


def import_rqtransformer(
    official: dict[str, Tensor], cfg: RQTransformerConfig, code_embeddings: Tensor
) -> tuple[RQTransformer, dict[str, str]]:
    """-> (our RQ-Transformer holding the official weights, the dropped tensors with why).
    code_embeddings: the matching RQ-VAE's codebook (its quantizer.codebooks)."""
    model = RQTransformer(cfg, code_embeddings)
    expected = model.state_dict()
    dropped = {f"pos_emb_hw[{cfg.num_positions - 1}]": "the last position's embedding, which "
               "the official forward never reads"}  # fmt: skip
    state = convert_state_dict(official, rqtransformer_name_map(cfg), expected, dropped)
    state["code_embeddings"] = expected["code_embeddings"]
    model.load_state_dict(state)
    return model.eval(), dropped
