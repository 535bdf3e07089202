"""Captions as token ids for a text-conditioned RQ-Transformer: a BPE tokenizer (Hugging Face
`tokenizers`) trained on the run's captions or given by the user, and its config.

The paper's CC-3M model reads 32 tokens of a 16,384-word BPE with BPE dropout 0.1 in training.
Captions are lower-cased (NFKC), split on whitespace and punctuation, cut to `context_length`
tokens and padded with [PAD] (id 0). The empty caption is all [PAD]: what caption dropout
trains and classifier-free guidance contrasts with. BPE dropout draws from the `tokenizers`
library's own random state, which cannot be seeded: only its training-time tokenization is
not reproducible, never the tokenizer itself (training it is deterministic).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

PAD, UNK = "[PAD]", "[UNK]"
PAD_ID = 0


@dataclass
class TextConfig:
    """How captions condition train-ar (`conditioning: text`)."""

    vocab_size: int = 16384  # the BPE's size (at most; a small corpus gives fewer merges)
    context_length: int = 32  # tokens per caption, after truncation and padding
    bpe_dropout: float = 0.1  # in training only
    loss_weight: float = 0.1  # the caption loss's share; the image codes get 1 - loss_weight
    tokenizer: str | None = None  # a tokenizer.json to use instead of training one
    # The BPE is trained on a seeded sample of at most this many train captions (each image
    # once), read table by table: a bounded cost at any size, the same tokenizer for the same
    # tables and config.
    tokenizer_sample: int = 1_000_000

    def __post_init__(self) -> None:
        if self.context_length < 2:
            raise ValueError(f"text.context_length must be >= 2, got {self.context_length}")
        if self.vocab_size < 8:
            raise ValueError(f"text.vocab_size must be >= 8, got {self.vocab_size}")
        if self.tokenizer_sample < 1:
            raise ValueError(f"text.tokenizer_sample must be >= 1, got {self.tokenizer_sample}")
        for name in ("bpe_dropout", "loss_weight"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"text.{name} must be in [0, 1), got {getattr(self, name)}")


def train_tokenizer(captions: Iterable[str], vocab_size: int) -> str:
    """A BPE tokenizer trained on `captions` -> its tokenizer.json text. The same captions in
    the same order give the same file."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    # Word starts are marked with "▁" (Metaspace), so that ids decode back to the words.
    # (An end-of-word suffix, as the official CharBPETokenizer has, makes the trainer number
    # its alphabet in hash order: two trainings on the same captions gave different files.)
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Punctuation(), pre_tokenizers.Metaspace()]
    )
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, UNK],
                                  show_progress=False)  # fmt: skip
    tokenizer.train_from_iterator((c or "" for c in captions), trainer)
    return tokenizer.to_str()


def check_tokenizer(tokenizer_json: str) -> int:
    """The vocabulary size of a tokenizer.json, after checking it has [PAD] at id 0."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    if tokenizer.token_to_id(PAD) != PAD_ID:
        raise ValueError(f"the tokenizer has no {PAD} token at id {PAD_ID} (found "
                         f"{tokenizer.token_to_id(PAD)}): add it as the first special token")  # fmt: skip
    return tokenizer.get_vocab_size()


@functools.lru_cache(maxsize=4)
def _tokenizer(tokenizer_json: str, context_length: int, bpe_dropout: float):
    from tokenizers import Tokenizer

    document = json.loads(tokenizer_json)
    document["model"]["dropout"] = bpe_dropout or None
    tokenizer = Tokenizer.from_str(json.dumps(document))
    tokenizer.enable_truncation(max_length=context_length)
    tokenizer.enable_padding(length=context_length, pad_id=PAD_ID, pad_token=PAD)
    return tokenizer


def encode_captions(tokenizer_json: str, captions: Sequence[str | None], context_length: int,
                    bpe_dropout: float = 0.0) -> np.ndarray:  # fmt: skip
    """Captions (None: empty) -> (N, context_length) int64 token ids, [PAD]-padded."""
    tokenizer = _tokenizer(tokenizer_json, context_length, bpe_dropout)
    encoded = tokenizer.encode_batch([c or "" for c in captions])
    return np.array([e.ids for e in encoded], dtype=np.int64).reshape(-1, context_length)


def decode_tokens(tokenizer_json: str, ids: Sequence[int]) -> str:
    """Token ids back to text ([PAD] dropped): what the model was conditioned on."""
    tokenizer = _tokenizer(tokenizer_json, max(len(ids), 1), 0.0)
    return tokenizer.decode([i for i in ids if i != PAD_ID])
