"""Text-to-image: the caption tokenizer, the caption-conditioned RQ-Transformer (causal text
prefix, caption dropout, guidance, cached sampling), the released presets' sizes, prompts for
the sample stage and the CLIP score on a small randomly initialised CLIP."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from model.rqtransformer import RQTransformer, RQTransformerConfig
from model.text import (
    PAD_ID,
    TextConfig,
    check_tokenizer,
    decode_tokens,
    encode_captions,
    train_tokenizer,
)
from pipeline.core.storage import Storage
from pipeline.stages.sample import SampleConfig, resolve_prompts

CAPTIONS = [f"a {size} {colour} {shape}{where}" for size in ("small", "large")
            for colour in ("red", "green", "blue") for shape in ("circle", "square", "cross")
            for where in ("", " on the left", " at the top")]  # fmt: skip


def test_tokenizer_is_deterministic_and_round_trips():
    first, second = train_tokenizer(CAPTIONS, 96), train_tokenizer(list(CAPTIONS), 96)
    assert first == second  # the same captions give the same file, ids included
    vocab = check_tokenizer(first)
    assert 8 < vocab <= 96
    ids = encode_captions(first, ["A Large Blue Cross on the left", None, "a red circle"], 16)
    assert ids.shape == (3, 16) and ids.dtype == np.int64
    assert decode_tokens(first, ids[0]) == "a large blue cross on the left"  # normalised
    assert (ids[1] == PAD_ID).all()  # the empty caption: all [PAD]
    assert decode_tokens(first, ids[2]) == "a red circle" and (ids[2, 3:] == PAD_ID).all()
    cut = encode_captions(first, ["a red circle on the left"], 3)[0]
    assert decode_tokens(first, cut) == "a red circle"  # truncated to the context length


def test_bpe_dropout_only_in_training():
    tokenizer = train_tokenizer(CAPTIONS, 96)
    caption = ["a large green square at the top"] * 64
    plain = encode_captions(tokenizer, caption, 40)
    assert (plain == plain[0]).all()  # no dropout: always the same ids
    dropped = encode_captions(tokenizer, caption, 40, bpe_dropout=0.5)
    assert len({tuple(row) for row in dropped}) > 1  # merges dropped at random
    assert {decode_tokens(tokenizer, row) for row in dropped} == {caption[0]}  # same text


def test_tokenizer_without_pad_is_refused():
    from tokenizers import Tokenizer, models, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.train_from_iterator(CAPTIONS, trainers.BpeTrainer(special_tokens=["[UNK]"]))
    with pytest.raises(ValueError, match=r"\[PAD\]"):
        check_tokenizer(tokenizer.to_str())


def text_model(**overrides) -> RQTransformer:
    torch.manual_seed(0)
    config = RQTransformerConfig.preset("tiny", code_shape=[3, 3, 2], codebook_size=16,
                                        num_classes=0, text_vocab_size=20, text_length=5,
                                        width=32, heads=2, **overrides)  # fmt: skip
    return RQTransformer(config, torch.randn(16, 8)).eval()


def test_text_prefix_is_causal_and_conditions_the_image():
    model = text_model()
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (2, 3, 3, 2), generator=g)
    text = torch.randint(1, 20, (2, 5), generator=g)
    logits, text_logits = model(codes, text=text, return_text_logits=True)
    assert logits.shape == (2, 3, 3, 2, 16) and text_logits.shape == (2, 4, 20)
    later = text.clone()
    later[:, 3] = (later[:, 3] % 19) + 1  # change caption token 3
    logits2, text_logits2 = model(codes, text=later, return_text_logits=True)
    torch.testing.assert_close(text_logits2[:, :3], text_logits[:, :3])  # tokens 0..2 see none
    assert not torch.allclose(text_logits2[:, 3], text_logits[:, 3])
    assert not torch.allclose(logits2, logits)  # the image reads the whole caption
    other_codes = (codes + 1) % 16
    torch.testing.assert_close(model(other_codes, text=text, return_text_logits=True)[1],
                               text_logits)  # the caption never reads the image  # fmt: skip
    with pytest.raises(ValueError, match="text-conditioned"):
        model(codes)
    with pytest.raises(ValueError, match=r"\(B, 5\)"):
        model(codes, text=text[:, :4])


def test_caption_dropout_empties_whole_captions_in_training_only():
    """model.caption_dropout: in training each row's caption is replaced, whole, by the empty
    one at that rate (every row's logits are those of its caption or of the empty caption);
    in eval mode never."""
    model = text_model(caption_dropout=0.25, dropout=0.0)
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (400, 3, 3, 2), generator=g)
    text = torch.randint(1, 20, (400, 5), generator=g)
    with torch.no_grad():
        given = model(codes, text=text)
        empty = model(codes, text=torch.full_like(text, PAD_ID))
        assert torch.equal(model(codes, text=text), given)  # eval: never dropped
        torch.manual_seed(0)
        trained = model.train()(codes, text=text)
    as_given = (trained - given).flatten(1).abs().amax(1) < 1e-5
    as_empty = (trained - empty).flatten(1).abs().amax(1) < 1e-5
    assert torch.all(as_given ^ as_empty)
    assert 0.18 < as_empty.float().mean() < 0.32


def test_guidance_needs_a_model_trained_with_caption_dropout():
    """The paper's CC-3M model has no caption dropout: the empty caption guidance contrasts
    with was never trained, so guided sampling is refused (unguided sampling works)."""
    model = text_model(caption_dropout=0.0)
    text = torch.tensor([[3, 4, 5, 0, 0]])
    with pytest.raises(ValueError, match="caption dropout"):
        model.generate(text=text, cfg_scale=3.0)
    assert model.generate(text=text).shape == (1, 3, 3, 2)
    assert RQTransformerConfig.preset("cc3m-650M").caption_dropout == 0.0
    # a caption model saved before the field was recorded trained with 0.1: guidance stays open
    saved = {k: v for k, v in text_model().config.__dict__.items() if k != "caption_dropout"}
    assert RQTransformerConfig.from_dict(saved).caption_dropout == 0.1


def test_cached_sampling_with_captions_and_guidance_equals_uncached():
    model = text_model()
    text = torch.tensor([[3, 4, 5, 0, 0], [7, 1, 0, 0, 0]])
    for cfg_scale in (1.0, 3.0):
        runs = [model.generate(text=text, cfg_scale=cfg_scale, top_k=5, use_cache=cached,
                               static=static, generator=torch.Generator().manual_seed(4))
                for cached, static in [(True, False), (False, None), (True, True)]]  # fmt: skip
        assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2]), cfg_scale
    a = model.generate(text=text, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, model.generate(text=text, generator=torch.Generator().manual_seed(9)))


def analytic_parameters(c: RQTransformerConfig, code_dim: int = 256) -> int:
    """Parameters of an RQ-Transformer from its config alone (code embeddings excluded)."""
    e, (h, w, d) = c.width, c.code_shape
    block = 12 * e * e + 13 * e  # qkv, proj, two MLP layers (with biases), two LayerNorms
    layers = (c.spatial_layers + c.depth_layers) * block
    if c.text_vocab_size:
        condition = c.text_vocab_size * e + (c.text_length - 1) * e + 2 * e + e * c.text_vocab_size + c.text_vocab_size  # fmt: skip
    else:
        condition = c.num_label_rows * e
    norms = 2 * e * (1 + int(c.spatial_final_norm))  # depth stack's (the head's), spatial's
    return (condition + h * w * e + d * e + 2 * (code_dim * e + e) + layers + norms
            + e * c.codebook_size + c.codebook_size)  # fmt: skip


@pytest.mark.parametrize("preset, official", [
    ("imagenet256-480M", 480e6), ("imagenet256-821M", 821e6), ("imagenet256-1.4B", 1.4e9),
    ("imagenet256-3.8B", 3.8e9), ("ffhq256-350M", 355e6), ("lsun-church256-350M", 370e6),
    ("lsun-cat256-600M", 612e6), ("lsun-bedroom256-600M", 612e6), ("cc3m-650M", 654e6),
])  # fmt: skip
def test_released_presets_have_their_sizes(preset, official):
    """Built on the meta device (no memory): the count equals the one computed from the config,
    and the official README's figure to 2%."""
    config = RQTransformerConfig.preset(preset)
    with torch.device("meta"):
        model = RQTransformer(config, torch.zeros(config.codebook_size, 256))
    assert model.num_parameters() == analytic_parameters(config)
    assert abs(model.num_parameters() / official - 1) < 0.02, model.num_parameters()


def test_prompts_from_flags_text_csv_and_parquet(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\n  a blue cross  \n")
    pq.write_table(pa.table({"prompt": ["a green square", None]}), tmp_path / "p.parquet")
    (tmp_path / "p.csv").write_text("caption,other\na cyan triangle,1\n")
    storage = Storage()
    assert resolve_prompts(SampleConfig(prompts=["x"], prompts_file=str(tmp_path / "p.txt")),
                           storage) == ["x", "a red circle", "a blue cross"]  # fmt: skip
    assert resolve_prompts(SampleConfig(prompts_file=str(tmp_path / "p.parquet"),
                                        prompts_column="prompt"), storage) == ["a green square"]  # fmt: skip
    assert resolve_prompts(SampleConfig(prompts_file=str(tmp_path / "p.csv")),
                           storage) == ["a cyan triangle"]  # fmt: skip
    with pytest.raises(ValueError, match="no column 'caption'"):
        resolve_prompts(SampleConfig(prompts_file=str(tmp_path / "p.parquet")), storage)
    with pytest.raises(ValueError, match="not both"):
        SampleConfig(labels=[0], prompts=["a red circle"])


def tiny_clip(folder):
    """A randomly initialised CLIP of the real architecture, saved as a CLIP download is."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", *letters,
                                          *(c + "</w>" for c in letters)])}  # fmt: skip
    (folder / "vocab.json").parent.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizerFast(vocab_file=str(folder / "vocab.json"),
                                  merges_file=str(folder / "merges.txt"))  # fmt: skip
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32,
                         eos_token_id=1, bos_token_id=0, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_clip_score_on_a_small_random_clip(tmp_path):
    from model.evaluation.clip import CLIP_MEAN, CLIP_STD, preprocess
    from pipeline.cli import main
    from pipeline.formats.codes_table import codes_table, to_parquet_bytes

    tiny_clip(tmp_path / "clip")
    samples = tmp_path / "samples"
    (samples / "images").mkdir(parents=True)
    prompts = ["a red circle", "a blue cross", "a red circle", "a green square"]
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(
            samples / "images" / f"sample-{i:06d}.png")  # fmt: skip
    table = codes_table([f"sample-{i:06d}" for i in range(4)], [None] * 4, prompts,
                        np.zeros((4, 2, 2, 1), np.int64), 4, "vae")  # fmt: skip
    (samples / "codes").mkdir()
    (samples / "codes" / "chunk-00000.parquet").write_bytes(to_parquet_bytes(table))
    assert main(["clip-score", str(samples), "--clip", str(tmp_path / "clip")]) == 0
    report = json.loads((samples / "clip_score.json").read_text())
    assert report["samples"] == 4 and -1 <= report["clip_score"] <= 1
    assert set(report["per_prompt"]) == set(prompts)
    # CLIP's preprocessing: a grey image becomes (0.5 - mean) / std everywhere
    grey = preprocess([Image.new("RGB", (50, 30), (128, 128, 128))], 32)
    assert grey.shape == (1, 3, 32, 32)
    expected = (128 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(grey[0, :, 5, 5], expected.float(), rtol=1e-5, atol=1e-5)
    assert main(["clip-score", str(samples), "--clip", str(tmp_path / "nothing")]) == 1


def test_a_training_step_with_captions_and_soft_targets():
    """train-ar's step on a caption model: the caption loss is trained beside the image codes
    (soft targets from latents work as for labels), and validation reports both."""
    from types import SimpleNamespace

    from model.training import ar_train_step, build_optimizer, soft_quantizer, validation_loss

    model = text_model().train()
    config = SimpleNamespace(steps=10, warmup_steps=1, lr=1e-3, betas=[0.9, 0.95],
                             lr_decay="cosine", final_lr_ratio=0.1,
                             weight_decay=0.0, grad_clip=1.0, bf16=False, soft_temperature=0.5,
                             text=TextConfig(loss_weight=0.1))  # fmt: skip
    optimizer = build_optimizer(model, config)
    quantizer = soft_quantizer(model.code_embeddings, depth=2)
    g = torch.Generator().manual_seed(0)
    batch = {"codes": torch.randint(0, 16, (4, 3, 3, 2), generator=g),
             "latents": torch.randn(4, 3, 3, 8, generator=g),
             "text": torch.randint(1, 20, (4, 5), generator=g)}  # fmt: skip
    before = model.text_head[1].weight.clone()
    terms = ar_train_step(model, optimizer, [batch], 1, config, "text", quantizer, g)
    assert {"loss", "loss_image", "loss_text", "loss_d1", "loss_d2"} <= set(terms)
    expected = 0.9 * terms["loss_image"] + 0.1 * terms["loss_text"]
    assert abs(terms["loss"] - expected) < 1e-5
    assert not torch.equal(model.text_head[1].weight, before)  # the caption head learns
    val = validation_loss(model, batch, "text", quantizer, config)
    assert {"val_loss", "val_loss_hard", "val_loss_text"} <= set(val)
