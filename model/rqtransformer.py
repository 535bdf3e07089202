"""RQ-Transformer: autoregressive prior over (H, W, D) residual code stacks (Lee et al. 2022).

Notation: B batch, T = H*W spatial positions in raster order, D code depth, K codebook size,
C code-embedding width (the RQ-VAE's), E model width.

Spatial transformer (causal over T): the input at position t is
    proj_spatial( sum_d e(codes[t-1, d]) ) + pos[t],       and class (or start) embedding at t=0
and its output h_t summarises everything before position t. A text-conditioned model reads a
caption of L tokens instead of the class: tokens 0..L-2 (+ text_pos) come first, token L-1 takes
the class's place at t=0, and a text head predicts each next caption token (the text loss).
Depth transformer (causal over D, run for each position independently): the input at depth d is
    h_t + depth[0]                                          for d = 0
    proj_depth( sum_{i<d} e(codes[t, i]) ) + depth[d]       for d > 0
and one head (LayerNorm + Linear to K), shared across depths, predicts codes[t, d].

The code embeddings e(.) are the RQ-VAE's codebook, frozen. Sampling runs both transformers
with KV caches: one spatial step per position, D depth steps within it.

The paper presets reproduce the official architecture exactly (the official checkpoints import
into them, model/weights/official.py): no LayerNorm at the end of the spatial stack
(`spatial_final_norm`), dropout on the residual branches (`dropout`, the official resid_pdrop
0.1), none on attention weights (`attn_dropout`), and no learned no-label row
(`null_label_embedding`), which only classifier-free guidance needs. The `tiny` preset keeps our
earlier choices for each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.kv_cache import KVCache, StaticCaches, StaticKVCache
from model.quantizer import embed_codes
from model.sampling import SamplingPlan, generate_cached, generate_uncached, one_per_depth
from model.text import PAD_ID
from model.weights.serialization import ModelConfig, Pretrained

# The paper's ImageNet 256x256 class-conditional models (8x8x4 codes, K = 16384). Every field
# is spelled out, so that a change of a dataclass default never changes a paper preset.
# The released models' shapes (the official configs/*/stage2/*.yaml; tests check each against
# its published config): the official architecture, with residual dropout 0.1.
_PAPER: dict[str, Any] = dict(
    code_shape=[8, 8, 4], codebook_size=16384, mlp_ratio=4, dropout=0.1, attn_dropout=0.0,
    label_dropout=0.0, null_label_embedding=False, spatial_final_norm=False, text_vocab_size=0,
    text_length=0, caption_dropout=0.0,
)  # fmt: skip
_IMAGENET256 = {**_PAPER, "width": 1536, "heads": 24, "num_classes": 1000}
_UNCONDITIONAL = {**_PAPER, "num_classes": 0}
_W1024 = {**_UNCONDITIONAL, "width": 1024, "heads": 16, "spatial_layers": 24, "depth_layers": 4}
_W1280 = {**_UNCONDITIONAL, "width": 1280, "heads": 20, "spatial_layers": 26, "depth_layers": 4}
RQTRANSFORMER_PRESETS: dict[str, dict[str, Any]] = {
    "imagenet256-480M": {**_IMAGENET256, "spatial_layers": 12, "depth_layers": 4},
    "imagenet256-821M": {**_IMAGENET256, "spatial_layers": 24, "depth_layers": 4},
    "imagenet256-1.4B": {**_IMAGENET256, "spatial_layers": 42, "depth_layers": 6},
    "imagenet256-3.8B": {
        **_IMAGENET256,
        "width": 2560,
        "heads": 40,
        "spatial_layers": 42,
        "depth_layers": 6,
    },
    "ffhq256-350M": {**_W1024, "codebook_size": 2048},
    "lsun-church256-350M": _W1024,
    "lsun-cat256-600M": _W1280,
    "lsun-bedroom256-600M": _W1280,
    # Text-to-image: 32 BPE tokens of a 16,384-word vocabulary condition the model.
    "cc3m-650M": {**_W1280, "text_vocab_size": 16384, "text_length": 32},
    # CPU-sized, for the demo and the tests (codebook size and classes come from the data).
    "tiny": dict(
        width=128, heads=4, spatial_layers=3, depth_layers=2, codebook_size=256, num_classes=4
    ),
}


@dataclass
class RQTransformerConfig(ModelConfig):
    kind: ClassVar[str] = "RQ-Transformer"
    presets: ClassVar[dict[str, dict[str, Any]]] = RQTRANSFORMER_PRESETS

    code_shape: list[int] = field(default_factory=lambda: [8, 8, 4])  # H, W, D
    codebook_size: int = 16384  # K
    width: int = 1536  # E
    heads: int = 24
    spatial_layers: int = 42
    depth_layers: int = 6
    mlp_ratio: int = 4
    dropout: float = 0.0  # on the attention output and the MLP output (the paper's place)
    attn_dropout: float = 0.0  # on the attention weights
    num_classes: int = 1000  # 0: unconditional
    label_dropout: float = 0.1  # drop labels in training, for classifier-free guidance
    null_label_embedding: bool = True  # a learned "no label" row (guidance); the paper: none
    spatial_final_norm: bool = True  # LayerNorm after the spatial stack; the paper: none
    text_vocab_size: int = 0  # > 0: conditioned on captions of text_length tokens, not classes
    text_length: int = 0
    # Captions replaced by the empty one in training, which guidance contrasts with; the paper:
    # none (its CC-3M model samples unguided). 0.1, our default, is also what every caption
    # model rqpipe trained before this field was recorded used (their config.json lacks it).
    caption_dropout: float = 0.1

    def __post_init__(self) -> None:
        self.code_shape = list(self.code_shape)
        if len(self.code_shape) != 3 or min(self.code_shape) < 1:
            raise ValueError(
                f"code_shape must be [H, W, D] of positive ints, got {self.code_shape}"
            )
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.text_vocab_size and (self.num_classes or self.text_length < 1):
            raise ValueError("a text-conditioned model needs text_length >= 1 and num_classes: 0 "
                             f"(got {self.text_length}, {self.num_classes})")  # fmt: skip
        if self.num_classes and not self.null_label_embedding and self.label_dropout > 0:
            raise ValueError("label_dropout needs null_label_embedding: true (dropped labels "
                             "become the no-label row)")  # fmt: skip
        for name in ("label_dropout", "caption_dropout"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def num_label_rows(self) -> int:
        """Rows of the class embedding: the classes, plus the no-label row where there is one
        (an unconditional model has only that row: its start token)."""
        has_null = self.null_label_embedding or self.num_classes == 0
        return self.num_classes + int(has_null)

    @property
    def num_positions(self) -> int:
        return self.code_shape[0] * self.code_shape[1]

    @property
    def depth(self) -> int:
        return self.code_shape[2]


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, attn_dropout: float, dropout: float) -> None:
        super().__init__()
        self.heads, self.attn_dropout = heads, attn_dropout
        self.qkv = nn.Linear(width, 3 * width)  # rows: query, key, value
        self.proj = nn.Linear(width, width)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, cache: KVCache | StaticKVCache | None = None) -> Tensor:
        b, n, e = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        # q, k, v: (B, heads, n, head_dim)
        if cache is None:
            p = self.attn_dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:
            out = cache.attend(q, k, v)  # (B, heads, n, head_dim)
        return self.resid_dropout(self.proj(out.transpose(1, 2).reshape(b, n, e)))


class Block(nn.Module):
    """Pre-LN GPT block."""

    def __init__(self, cfg: RQTransformerConfig) -> None:
        super().__init__()
        width, mlp_ratio, dropout = cfg.width, cfg.mlp_ratio, cfg.dropout
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, cfg.heads, cfg.attn_dropout, dropout)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width),
            nn.GELU(),
            nn.Linear(mlp_ratio * width, width),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor, cache: KVCache | StaticKVCache | None = None) -> Tensor:
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


class Stack(nn.Module):
    """Blocks followed by a final LayerNorm (or none); with caches, one position at a time."""

    def __init__(self, cfg: RQTransformerConfig, layers: int, final_norm: bool = True) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(layers))
        self.ln_f = nn.LayerNorm(cfg.width) if final_norm else nn.Identity()

    def forward(self, x: Tensor, caches: list[KVCache] | StaticCaches | None = None) -> Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.ln_f(x)

    def new_caches(self, batch: int, capacity: int, like: Tensor,
                   static: bool = False) -> list[KVCache] | StaticCaches:  # fmt: skip
        """One cache per block for `capacity` positions: growing, or static (fixed shapes)."""
        heads = self.blocks[0].attn.heads if len(self.blocks) else 1
        head_dim = like.shape[-1] // heads
        if static:
            return StaticCaches(len(self.blocks), batch, heads, capacity, head_dim, like)
        return [KVCache(batch, heads, capacity, head_dim, like) for _ in self.blocks]


class RQTransformer(Pretrained, nn.Module):
    model_type = "rqtransformer"
    config_class = RQTransformerConfig

    def __init__(self, config: RQTransformerConfig, code_embeddings: Tensor) -> None:
        """code_embeddings: the RQ-VAE codebook, (K, C) shared or (D, K, C) one per depth."""
        super().__init__()
        self.config = config
        if code_embeddings.dim() == 2:
            code_embeddings = code_embeddings.unsqueeze(0)
        books, k, c = code_embeddings.shape
        if k != config.codebook_size or books not in (1, config.depth):
            raise ValueError(
                f"code embeddings of shape {tuple(code_embeddings.shape)} do not fit "
                f"codebook_size={config.codebook_size}, depth={config.depth}"
            )
        # Frozen: a buffer, saved with the model so sampling needs no VAE to build it.
        self.register_buffer("code_embeddings", code_embeddings.detach().clone().float())
        e, t, d = config.width, config.num_positions, config.depth
        self.proj_spatial = nn.Linear(c, e)
        self.proj_depth = nn.Linear(c, e)
        if config.text_vocab_size:
            self.text_embedding = nn.Embedding(config.text_vocab_size, e)
            self.text_pos = nn.Parameter(torch.zeros(config.text_length - 1, e))
            self.text_head = nn.Sequential(nn.LayerNorm(e), nn.Linear(e, config.text_vocab_size))
        else:
            self.class_embedding = nn.Embedding(config.num_label_rows, e)  # last row: no label
        self.pos_embedding = nn.Parameter(torch.zeros(t, e))
        self.depth_embedding = nn.Parameter(torch.zeros(d, e))
        self.spatial = Stack(config, config.spatial_layers, config.spatial_final_norm)
        self.depth_transformer = Stack(config, config.depth_layers)
        self.head = nn.Linear(e, config.codebook_size)
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_embedding, std=0.02)
        nn.init.normal_(self.depth_embedding, std=0.02)
        if config.text_vocab_size:
            nn.init.normal_(self.text_pos, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    @property
    def null_label(self) -> int:
        return self.config.num_classes

    # -- embeddings -----------------------------------------------------------------------------

    def _start(self, labels: Tensor | None, batch: int, device: torch.device) -> Tensor:
        if labels is None:
            if self.config.num_label_rows == self.config.num_classes:
                raise ValueError("this RQ-Transformer has no no-label embedding "
                                 "(null_label_embedding: false): give a label for every sample")  # fmt: skip
            labels = torch.full((batch,), self.null_label, device=device, dtype=torch.long)
        elif self.config.num_classes == 0:
            raise ValueError("this RQ-Transformer is unconditional: pass labels=None")
        elif labels.min() < 0 or labels.max() >= self.config.num_label_rows:
            raise ValueError(f"labels must be in [0, {self.config.num_classes}) (or the null "
                             f"label {self.null_label}), got {labels.tolist()[:8]}")  # fmt: skip
        return self.class_embedding(labels)  # (B, E)

    def condition(self, labels: Tensor | None, text: Tensor | None, batch: int,
                   device: torch.device) -> tuple[Tensor | None, Tensor]:  # fmt: skip
        """-> (the prefix before position 0: (B, L-1, E) caption tokens, or None for a class
        model; the start token at position 0: (B, E), the class or the caption's last token)."""
        cfg = self.config
        if not cfg.text_vocab_size:
            if text is not None:
                raise ValueError("this RQ-Transformer is not text-conditioned: pass labels")
            return None, self._start(labels, batch, device)
        if text is None or labels is not None:
            raise ValueError("this RQ-Transformer is text-conditioned: pass text (B, "
                             f"{cfg.text_length}) token ids, not labels")  # fmt: skip
        if (
            text.shape[1:] != (cfg.text_length,)
            or text.min() < 0
            or text.max() >= cfg.text_vocab_size
        ):
            raise ValueError(f"text must be (B, {cfg.text_length}) ids in [0, "
                             f"{cfg.text_vocab_size}), got {tuple(text.shape)}")  # fmt: skip
        tokens = self.text_embedding(text)  # (B, L, E)
        return tokens[:, :-1] + self.text_pos, tokens[:, -1]

    # -- training forward -----------------------------------------------------------------------

    def forward(self, codes: Tensor, labels: Tensor | None = None, text: Tensor | None = None,
                return_text_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:  # fmt: skip
        """codes (B, H, W, D) int64, labels (B,) or None (or text (B, L)) -> logits
        (B, H, W, D, K); with return_text_logits, also (B, L-1, V): each next caption token."""
        b, h, w, d = codes.shape
        if [h, w, d] != self.config.code_shape:
            raise ValueError(f"codes of shape {[h, w, d]} != config code_shape "
                             f"{self.config.code_shape}")  # fmt: skip
        if self.training and labels is not None and self.config.label_dropout > 0:
            dropped = torch.rand(b, device=codes.device) < self.config.label_dropout
            labels = labels.masked_fill(dropped, self.null_label)
        if self.training and text is not None and self.config.caption_dropout > 0:
            dropped = torch.rand(b, device=codes.device) < self.config.caption_dropout
            text = text.masked_fill(dropped[:, None], PAD_ID)  # the empty caption
        flat = codes.reshape(b, h * w, d)  # (B, T, D)
        # (B, T, D, C): at depth d, the sum of the first d+1 code embeddings
        partial = embed_codes(self.code_embeddings, flat).cumsum(dim=2)

        prefix, start = self.condition(labels, text, b, codes.device)
        shifted = self.proj_spatial(partial[:, :-1, -1])  # (B, T-1, E): full sums of t-1
        x = torch.cat([start.unsqueeze(1), shifted], dim=1) + self.pos_embedding  # (B, T, E)
        if prefix is not None:
            x = torch.cat([prefix, x], dim=1)  # (B, L-1+T, E)
        out = self.spatial(x)
        h_t = out[:, -h * w :]  # (B, T, E)

        depth_in = torch.cat(
            [h_t.unsqueeze(2), self.proj_depth(partial[:, :, :-1])], dim=2
        )  # (B, T, D, E)
        depth_in = (depth_in + self.depth_embedding).reshape(b * h * w, d, -1)
        logits = self.head(self.depth_transformer(depth_in)).reshape(b, h, w, d, -1)
        if return_text_logits:  # (B, H, W, D, K), (B, L-1, V)
            return logits, self.text_head(out[:, : -h * w])
        return logits  # (B, H, W, D, K)

    @staticmethod
    def loss(
        logits: Tensor, codes: Tensor, soft_targets: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Cross-entropy averaged over all T*D tokens -> (loss, per-depth loss (D,)).

        soft_targets (B, H, W, D, K), e.g. from ResidualQuantizer.soft_codes, turn it into the
        soft-target cross-entropy -sum_k q_k log p_k.
        """
        log_probs = F.log_softmax(logits.float(), dim=-1)  # (B, H, W, D, K)
        if soft_targets is None:
            nll = -log_probs.gather(-1, codes.unsqueeze(-1)).squeeze(-1)  # (B, H, W, D)
        else:
            nll = -(soft_targets * log_probs).sum(-1)
        per_depth = nll.flatten(0, 2).mean(0)  # (D,)
        return nll.mean(), per_depth

    # -- sampling -------------------------------------------------------------------------------

    def _sampling_plan(
        self,
        num_samples: int | None,
        labels: Tensor | list[int] | None,
        temperature: float,
        top_k: int | list[int | None] | None,
        top_p: float | list[float | None] | None,
        cfg_scale: float,
        generator: torch.Generator | None,
        text: Tensor | None = None,
    ) -> SamplingPlan:
        device = self.pos_embedding.device
        if text is not None:
            text = torch.as_tensor(text, dtype=torch.long, device=device)
            batch = text.shape[0]
            if cfg_scale != 1.0:  # guidance contrasts each caption with the empty one
                if not self.config.caption_dropout:
                    raise ValueError("cfg_scale != 1 needs a caption model trained with caption "
                                     "dropout (model.caption_dropout > 0): this one never saw "
                                     "the empty caption guidance contrasts with, like the "
                                     "paper's CC-3M model: sample with cfg_scale=1")  # fmt: skip
                text = torch.cat([text, torch.full_like(text, PAD_ID)])
        elif labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long, device=device)
            batch = labels.shape[0]
        elif num_samples is None:
            raise ValueError("give num_samples (unconditional) or labels (class-conditional)")
        else:
            batch = num_samples
        if cfg_scale != 1.0 and text is None:
            if labels is None:
                raise ValueError("cfg_scale needs labels: guidance contrasts them with no label")
            if not self.config.null_label_embedding:
                raise ValueError("cfg_scale != 1 needs a model trained with a no-label row "
                                 "(null_label_embedding: true, label_dropout > 0); this one has "
                                 "none, like the paper's: sample with cfg_scale=1")  # fmt: skip
            labels = torch.cat([labels, torch.full_like(labels, self.null_label)])
        depth = self.config.depth
        return SamplingPlan(batch, labels, temperature, one_per_depth(top_k, depth, "top_k"),
                            one_per_depth(top_p, depth, "top_p"), cfg_scale, generator, text)  # fmt: skip

    @torch.no_grad()
    def generate(
        self,
        num_samples: int | None = None,
        labels: Tensor | list[int] | None = None,
        temperature: float = 1.0,
        top_k: int | list[int | None] | None = None,
        top_p: float | list[float | None] | None = None,
        cfg_scale: float = 1.0,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
        text: Tensor | None = None,
        static: bool | None = None,
    ) -> Tensor:
        """Sample code stacks (B, H, W, D).

        top_k / top_p may be one value or one per depth. cfg_scale != 1 runs the conditional
        and unconditional passes in one doubled batch (classifier-free guidance). With
        use_cache=False every token costs a full forward pass: the slow reference that the
        cached sampler is tested against. static: fixed-shape KV caches, whose steps are
        recorded as CUDA graphs on a GPU (a launch per step, not one per kernel); None: on a
        CUDA model only (on a CPU the growing caches are faster: no masked positions).
        """
        plan = self._sampling_plan(num_samples, labels, temperature, top_k, top_p, cfg_scale,
                                   generator, text)  # fmt: skip
        if not use_cache:
            return generate_uncached(self, plan)
        if static is None:
            static = self.pos_embedding.device.type == "cuda"
        return generate_cached(self, plan, static)

    # -- artifacts ------------------------------------------------------------------------------

    def num_parameters(self) -> int:
        """Trainable parameters (the frozen code embeddings are a buffer, not counted)."""
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def _build(cls, config: RQTransformerConfig, state: dict[str, Tensor]) -> RQTransformer:
        return cls(config, state["code_embeddings"])
