"""The official checkpoints' layout, written down for the import tests from the published configs
and module definitions of kakaobrain/rq-vae-transformer (nothing of theirs is imported or
copied), and a functional reference forward pass over such a state dict: what the official
models compute, so that an import that puts a tensor in the wrong place fails here."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The published configs' arch sections (configs/imagenet256/stage1/in256-rqvae-8x8x4.yaml and
# configs/imagenet256/stage2/in256-rqtransformer-8x8x4-*.yaml; vocab_size sits in `dataset`).
PUBLISHED_RQVAE_IN256 = {"arch": {
    "type": "rq-vae", "code_hier": 1,
    "hparams": {"bottleneck_type": "rq", "embed_dim": 256, "n_embed": 16384,
                "latent_shape": [8, 8, 256], "code_shape": [8, 8, 4], "shared_codebook": True,
                "decay": 0.99, "restart_unused_codes": True, "loss_type": "mse",
                "latent_loss_weight": 0.25},
    "ddconfig": {"double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3,
                 "out_ch": 3, "ch": 128, "ch_mult": [1, 1, 2, 2, 4, 4], "num_res_blocks": 2,
                 "attn_resolutions": [8], "dropout": 0.0},
    "checkpointing": True,
}}  # fmt: skip


def published_rqvae(codebook_size: int, attn_resolutions: list[int]) -> dict:
    document = {"arch": {**PUBLISHED_RQVAE_IN256["arch"]}}
    document["arch"]["hparams"] = {**document["arch"]["hparams"], "n_embed": codebook_size}
    document["arch"]["ddconfig"] = {**document["arch"]["ddconfig"],
                                    "attn_resolutions": attn_resolutions}  # fmt: skip
    return document


# preset -> (dataset.vocab_size, embed_dim, n_head, body n_layer, head n_layer,
# vocab_size_cond, block_size_cond) of each published stage-2 config
PUBLISHED_RQTRANSFORMERS = {
    "imagenet256-480M": (16384, 1536, 24, 12, 4, 1000, 1),  # in256-...-480M.yaml
    "imagenet256-821M": (16384, 1536, 24, 24, 4, 1000, 1),  # in256-...-800M.yaml
    "imagenet256-1.4B": (16384, 1536, 24, 42, 6, 1000, 1),
    "imagenet256-3.8B": (16384, 2560, 40, 42, 6, 1000, 1),
    "ffhq256-350M": (2048, 1024, 16, 24, 4, 1, 1),
    "lsun-church256-350M": (16384, 1024, 16, 24, 4, 1, 1),  # ...-sqgan-8x8x4-350M-simp.yaml
    "lsun-cat256-600M": (16384, 1280, 20, 26, 4, 1, 1),
    "lsun-bedroom256-600M": (16384, 1280, 20, 26, 4, 1, 1),
    "cc3m-650M": (16384, 1280, 20, 26, 4, 16384, 32),
}
# preset -> (n_embed, attn_resolutions) of the published stage-1 configs (LSUN: ImageNet's)
PUBLISHED_RQVAES = {"imagenet256-8x8x4": (16384, [8]), "ffhq256-8x8x4": (2048, [16])}


def published_rqtransformer(vocab, embed, heads, body, head, cond_vocab, cond_length) -> dict:
    return {"dataset": {"vocab_size": vocab}, "arch": {
        "type": "rq-transformer", "block_size": [8, 8, 4], "embed_dim": embed,
        "input_embed_dim": 256, "shared_tok_emb": True, "shared_cls_emb": True,
        "input_emb_vqvae": True, "head_emb_vqvae": True, "cumsum_depth_ctx": True,
        "vocab_size_cond": cond_vocab, "block_size_cond": cond_length,
        "body": {"n_layer": body, "block": {"n_head": heads}},
        "head": {"n_layer": head, "block": {"n_head": heads}},
    }}  # fmt: skip


# Scaled-down configs of the same form, for tensors the CPU runs in milliseconds.
SMALL_RQVAE = {"arch": {
    "type": "rq-vae",
    "hparams": {"bottleneck_type": "rq", "embed_dim": 16, "n_embed": 32,
                "latent_shape": [8, 8, 16], "code_shape": [8, 8, 3], "shared_codebook": True,
                "decay": 0.99, "restart_unused_codes": True, "latent_loss_weight": 0.25},
    "ddconfig": {"double_z": False, "z_channels": 16, "resolution": 32, "in_channels": 3,
                 "out_ch": 3, "ch": 128, "ch_mult": [1, 1, 2], "num_res_blocks": 1,
                 "attn_resolutions": [8], "dropout": 0.0},
}}  # fmt: skip


def small_rqtransformer(classes: int, depth: int = 3, vocab: int = 32, text_length: int = 1):
    """classes: vocab_size_cond (the caption vocabulary when text_length > 1, as in CC-3M)."""
    return {"dataset": {"vocab_size": vocab}, "arch": {
        "type": "rq-transformer", "block_size": [4, 4, depth], "embed_dim": 32,
        "input_embed_dim": 16, "shared_tok_emb": True, "shared_cls_emb": True,
        "input_emb_vqvae": True, "head_emb_vqvae": True, "cumsum_depth_ctx": True,
        "vocab_size_cond": classes, "block_size_cond": text_length,
        "body": {"n_layer": 2, "block": {"n_head": 4}},
        "head": {"n_layer": 2, "block": {"n_head": 4}},
    }}  # fmt: skip


# -- state dicts with the official names and shapes -----------------------------------------


def _conv(sd, name, out_ch, in_ch, k, g):
    sd[f"{name}.weight"] = torch.randn(out_ch, in_ch, k, k, generator=g) / math.sqrt(in_ch * k * k)
    sd[f"{name}.bias"] = torch.randn(out_ch, generator=g) * 0.1


def _norm(sd, name, ch, g):
    sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(ch, generator=g)
    sd[f"{name}.bias"] = 0.1 * torch.randn(ch, generator=g)


def _resnet(sd, name, c_in, c_out, g):
    _norm(sd, f"{name}.norm1", c_in, g)
    _conv(sd, f"{name}.conv1", c_out, c_in, 3, g)
    _norm(sd, f"{name}.norm2", c_out, g)
    _conv(sd, f"{name}.conv2", c_out, c_out, 3, g)
    if c_in != c_out:
        _conv(sd, f"{name}.nin_shortcut", c_out, c_in, 1, g)


def _attn(sd, name, ch, g):
    _norm(sd, f"{name}.norm", ch, g)
    for part in ("q", "k", "v", "proj_out"):
        _conv(sd, f"{name}.{part}", ch, ch, 1, g)


def official_rqvae_state(document: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """rqvae.models.rqvae.RQVAE's state_dict() names and shapes for this config."""
    g = torch.Generator().manual_seed(seed)
    hp, dd = document["arch"]["hparams"], document["arch"]["ddconfig"]
    ch, mult, blocks = dd["ch"], dd["ch_mult"], dd["num_res_blocks"]
    sd: dict[str, torch.Tensor] = {}
    _conv(sd, "encoder.conv_in", ch, dd["in_channels"], 3, g)
    res, c_in = dd["resolution"], ch
    for i, m in enumerate(mult):
        for j in range(blocks):
            _resnet(sd, f"encoder.down.{i}.block.{j}", c_in, ch * m, g)
            c_in = ch * m
            if res in dd["attn_resolutions"]:
                _attn(sd, f"encoder.down.{i}.attn.{j}", c_in, g)
        if i != len(mult) - 1:
            _conv(sd, f"encoder.down.{i}.downsample.conv", c_in, c_in, 3, g)
            res //= 2
    for coder in ("encoder", "decoder"):
        _resnet(sd, f"{coder}.mid.block_1", c_in, c_in, g)
        _attn(sd, f"{coder}.mid.attn_1", c_in, g)
        _resnet(sd, f"{coder}.mid.block_2", c_in, c_in, g)
    _norm(sd, "encoder.norm_out", c_in, g)
    _conv(sd, "encoder.conv_out", dd["z_channels"], c_in, 3, g)
    _conv(sd, "decoder.conv_in", c_in, dd["z_channels"], 3, g)
    for i in reversed(range(len(mult))):
        for j in range(blocks + 1):
            _resnet(sd, f"decoder.up.{i}.block.{j}", c_in, ch * mult[i], g)
            c_in = ch * mult[i]
            if res in dd["attn_resolutions"]:
                _attn(sd, f"decoder.up.{i}.attn.{j}", c_in, g)
        if i != 0:
            _conv(sd, f"decoder.up.{i}.upsample.conv", c_in, c_in, 3, g)
            res *= 2
    _norm(sd, "decoder.norm_out", c_in, g)
    _conv(sd, "decoder.conv_out", dd["out_ch"], c_in, 3, g)
    _conv(sd, "quant_conv", hp["embed_dim"], dd["z_channels"], 1, g)
    _conv(sd, "post_quant_conv", dd["z_channels"], hp["embed_dim"], 1, g)
    k, c, depth = hp["n_embed"], hp["embed_dim"], hp["code_shape"][2]
    books = {}
    for d in range(depth):
        if d == 0 or not hp["shared_codebook"]:
            books = {"weight": torch.randn(k + 1, c, generator=g) * 0.5,  # + padding row
                     "cluster_size_ema": torch.rand(k, generator=g) * 10,
                     "embed_ema": torch.randn(k, c, generator=g)}  # fmt: skip
        for name, value in books.items():  # a shared book: the same tensors at every depth
            sd[f"quantizer.codebooks.{d}.{name}"] = value
    return sd


def official_rqtransformer_state(document: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """rqvae.models.rqtransformer.RQTransformer's state_dict() names and shapes."""
    g = torch.Generator().manual_seed(seed)
    arch = document["arch"]
    e, c = arch["embed_dim"], arch["input_embed_dim"]
    h, w, d = arch["block_size"]
    vocab = document["dataset"]["vocab_size"]
    rand = lambda *shape, s=0.1: torch.randn(*shape, generator=g) * s  # noqa: E731
    sd = {"cond_emb.weight": rand(max(arch["vocab_size_cond"], 1), e, s=1.0),
          "input_mlp.weight": rand(e, c), "input_mlp.bias": rand(e),
          "head_mlp.weight": rand(e, c), "head_mlp.bias": rand(e),
          "pos_emb_cond": rand(1, max(arch["block_size_cond"], 1), e, s=0.5),
          "pos_emb_hw": rand(1, h * w, e, s=0.5), "pos_emb_d": rand(1, d, e, s=0.5)}  # fmt: skip
    for stack in ("body", "head"):
        for i in range(arch[stack]["n_layer"]):
            p = f"{stack}_transformer.blocks.{i}"
            for ln in ("ln1", "ln2"):
                sd[f"{p}.{ln}.weight"], sd[f"{p}.{ln}.bias"] = 1 + rand(e), rand(e)
            for part in ("key", "query", "value", "proj"):
                sd[f"{p}.attn.{part}.weight"], sd[f"{p}.attn.{part}.bias"] = rand(e, e), rand(e)
            sd[f"{p}.mlp.0.weight"], sd[f"{p}.mlp.0.bias"] = rand(4 * e, e), rand(4 * e)
            sd[f"{p}.mlp.2.weight"], sd[f"{p}.mlp.2.bias"] = rand(e, 4 * e), rand(e)
    sd["classifier.layer_norm.weight"], sd["classifier.layer_norm.bias"] = 1 + rand(e), rand(e)
    sd["classifier.linear.weight"], sd["classifier.linear.bias"] = rand(vocab, e), rand(vocab)
    if arch["block_size_cond"] > 1:  # predicts the next caption token
        cond_vocab = arch["vocab_size_cond"]
        sd["cond_classifier.layer_norm.weight"] = 1 + rand(e)
        sd["cond_classifier.layer_norm.bias"] = rand(e)
        sd["cond_classifier.linear.weight"] = rand(cond_vocab, e)
        sd["cond_classifier.linear.bias"] = rand(cond_vocab)
    return sd


# -- what the official models compute ---------------------------------------------------------


def _ref_conv(sd, name, x, stride=1, padding=None):
    weight = sd[f"{name}.weight"]
    pad = weight.shape[-1] // 2 if padding is None else padding
    return F.conv2d(x, weight, sd[f"{name}.bias"], stride=stride, padding=pad)


def _ref_norm(sd, name, x):
    return F.group_norm(x, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)


def _ref_resnet(sd, name, x):
    h = _ref_conv(sd, f"{name}.conv1", F.silu(_ref_norm(sd, f"{name}.norm1", x)))
    h = _ref_conv(sd, f"{name}.conv2", F.silu(_ref_norm(sd, f"{name}.norm2", h)))
    if f"{name}.nin_shortcut.weight" in sd:
        x = _ref_conv(sd, f"{name}.nin_shortcut", x)
    return x + h


def _ref_attn(sd, name, x):
    b, c, hh, ww = x.shape
    h = _ref_norm(sd, f"{name}.norm", x)
    q, k, v = (_ref_conv(sd, f"{name}.{p}", h).reshape(b, c, hh * ww) for p in "qkv")
    weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) / math.sqrt(c), dim=2)  # (b, i, j)
    out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, hh, ww)
    return x + _ref_conv(sd, f"{name}.proj_out", out)


def _ref_level(sd, name, x, blocks):
    for j in range(blocks):
        x = _ref_resnet(sd, f"{name}.block.{j}", x)
        if f"{name}.attn.{j}.q.weight" in sd:
            x = _ref_attn(sd, f"{name}.attn.{j}", x)
    return x


def _ref_mid(sd, name, x):
    x = _ref_resnet(sd, f"{name}.block_1", x)
    return _ref_resnet(sd, f"{name}.block_2", _ref_attn(sd, f"{name}.attn_1", x))


def reference_rqvae(sd: dict, document: dict, images: torch.Tensor):
    """-> latents (B, h, w, C), codes (B, h, w, D), reconstruction (B, 3, R, R)."""
    hp, dd = document["arch"]["hparams"], document["arch"]["ddconfig"]
    levels, blocks = len(dd["ch_mult"]), dd["num_res_blocks"]
    x = _ref_conv(sd, "encoder.conv_in", images)
    for i in range(levels):
        x = _ref_level(sd, f"encoder.down.{i}", x, blocks)
        if i != levels - 1:
            x = _ref_conv(sd, f"encoder.down.{i}.downsample.conv", F.pad(x, (0, 1, 0, 1)), 2, 0)
    x = _ref_mid(sd, "encoder.mid", x)
    x = _ref_conv(sd, "encoder.conv_out", F.silu(_ref_norm(sd, "encoder.norm_out", x)))
    latents = _ref_conv(sd, "quant_conv", x).permute(0, 2, 3, 1)  # (B, h, w, C)
    residual, codes, total = latents.clone(), [], torch.zeros_like(latents)
    for d in range(hp["code_shape"][2]):
        book = sd[f"quantizer.codebooks.{d}.weight"][:-1]  # the padding row is never chosen
        distances = (residual.unsqueeze(-2) - book).pow(2).sum(-1)  # (B, h, w, K)
        code = distances.argmin(-1)
        residual, total = residual - book[code], total + book[code]
        codes.append(code)
    x = _ref_conv(sd, "post_quant_conv", total.permute(0, 3, 1, 2))
    x = _ref_mid(sd, "decoder.mid", _ref_conv(sd, "decoder.conv_in", x))
    for i in reversed(range(levels)):
        x = _ref_level(sd, f"decoder.up.{i}", x, blocks + 1)
        if i != 0:
            x = _ref_conv(sd, f"decoder.up.{i}.upsample.conv",
                          F.interpolate(x, scale_factor=2.0, mode="nearest"))  # fmt: skip
    recon = _ref_conv(sd, "decoder.conv_out", F.silu(_ref_norm(sd, "decoder.norm_out", x)))
    return latents, torch.stack(codes, -1), recon


def _ref_linear(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def _ref_stack(sd, name, layers, heads, x):
    b, t, e = x.shape
    mask = torch.tril(torch.ones(t, t, dtype=torch.bool))
    for i in range(layers):
        p = f"{name}.blocks.{i}"
        h = F.layer_norm(x, (e,), sd[f"{p}.ln1.weight"], sd[f"{p}.ln1.bias"])
        q, k, v = (_ref_linear(sd, f"{p}.attn.{part}", h).view(b, t, heads, e // heads)
                   .transpose(1, 2) for part in ("query", "key", "value"))  # fmt: skip
        att = (q @ k.transpose(-1, -2)) / math.sqrt(e // heads)
        att = torch.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
        x = x + _ref_linear(sd, f"{p}.attn.proj", (att @ v).transpose(1, 2).reshape(b, t, e))
        h = F.layer_norm(x, (e,), sd[f"{p}.ln2.weight"], sd[f"{p}.ln2.bias"])
        x = x + _ref_linear(sd, f"{p}.mlp.2", F.gelu(_ref_linear(sd, f"{p}.mlp.0", h)))
    return x


def reference_rqtransformer(sd: dict, document: dict, codes: torch.Tensor,
                            cond: torch.Tensor | None, codebook: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Logits (B, H, W, D, K) of the official forward for codes (B, H, W, D), cond (B,) or
    None (a caption: (B, L)), with the RQ-VAE's (K, C) codebook as code embeddings; a caption
    model also returns the caption logits (B, L-1, V)."""
    arch = document["arch"]
    b, h, w, d = codes.shape
    e, heads = arch["embed_dim"], arch["body"]["block"]["n_head"]
    length = max(arch["block_size_cond"], 1)
    xs = codes.reshape(b, h * w, d)
    per_depth = codebook[xs]  # (B, T, D, C)
    cond = torch.zeros(b, 1, dtype=torch.long) if cond is None else cond.reshape(b, length)
    start = sd["cond_emb.weight"][cond] + sd["pos_emb_cond"][:, :length]  # (B, L, E)
    xs_emb = _ref_linear(sd, "input_mlp", per_depth).sum(-2) + sd["pos_emb_hw"]  # (B, T, E)
    latents = torch.cat([start, xs_emb[:, :-1]], dim=1)
    latents = _ref_stack(sd, "body_transformer", arch["body"]["n_layer"], heads, latents)
    spatial = latents[:, length - 1 :]
    depth_ctx = _ref_linear(sd, "head_mlp", per_depth.cumsum(-2))  # (B, T, D, E)
    full = torch.cat([spatial.unsqueeze(2), depth_ctx[:, :, :-1]], dim=2).reshape(b * h * w, d, e)
    out = _ref_stack(sd, "head_transformer", arch["head"]["n_layer"], heads, full + sd["pos_emb_d"])
    out = F.layer_norm(out, (e,), sd["classifier.layer_norm.weight"],
                       sd["classifier.layer_norm.bias"])  # fmt: skip
    logits = _ref_linear(sd, "classifier.linear", out).reshape(b, h, w, d, -1)
    if length == 1:
        return logits
    text = F.layer_norm(latents[:, : length - 1], (e,), sd["cond_classifier.layer_norm.weight"],
                        sd["cond_classifier.layer_norm.bias"])  # fmt: skip
    return logits, _ref_linear(sd, "cond_classifier.linear", text)
