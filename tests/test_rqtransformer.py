import dataclasses
import math

import pytest
import torch

from model.rqtransformer import RQTransformer, RQTransformerConfig
from model.sampling import sample_logits


def small(code_shape=(3, 3, 3), k=32, classes=4, books=1, **kw) -> RQTransformer:
    """books=1: one codebook shared by all depths; books=D: one codebook per depth."""
    torch.manual_seed(0)
    cfg = RQTransformerConfig(code_shape=list(code_shape), codebook_size=k, width=32, heads=2,
                              spatial_layers=2, depth_layers=2, num_classes=classes, **kw)  # fmt: skip
    return RQTransformer(cfg, torch.randn(books, k, 8)).eval()


def random_codes(model, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(model.config.codebook_size, (batch, *model.config.code_shape), generator=g)


def test_spatial_causality():
    model = small()
    codes, labels = random_codes(model), torch.tensor([0, 1])
    base = model(codes, labels).reshape(2, 9, 3, -1)  # (B, T, D, K)
    for t in range(9):
        changed = codes.reshape(2, 9, 3).clone()
        changed[:, t] = (changed[:, t] + 1) % 32  # every depth of position t
        out = model(changed.reshape(codes.shape), labels).reshape(2, 9, 3, -1)
        assert torch.allclose(out[:, :t], base[:, :t], atol=1e-6)  # earlier positions
        assert torch.allclose(out[:, t, 0], base[:, t, 0], atol=1e-6)  # depth 0 of t: h_t only
        if t + 1 < 9:
            assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])


def test_depth_causality():
    model = small()
    codes, labels = random_codes(model), torch.tensor([2, 3])
    base = model(codes, labels).reshape(2, 9, 3, -1)
    for d in range(3):
        changed = codes.reshape(2, 9, 3).clone()
        changed[:, 4, d] = (changed[:, 4, d] + 1) % 32
        out = model(changed.reshape(codes.shape), labels).reshape(2, 9, 3, -1)
        assert torch.allclose(out[:, 4, : d + 1], base[:, 4, : d + 1], atol=1e-6)
        if d + 1 < 3:
            assert not torch.allclose(out[:, 4, d + 1 :], base[:, 4, d + 1 :])


@pytest.mark.parametrize("books", [1, 3], ids=["shared-codebook", "per-depth-codebooks"])
@pytest.mark.parametrize(
    "options",
    [
        dict(labels=[0, 3, 1]),
        dict(labels=[2, 2], cfg_scale=3.0, temperature=0.8),
        dict(labels=[1, 0], top_k=[None, 5, 3], top_p=[0.9, None, 0.5]),
    ],
)
def test_cached_sampler_equals_uncached_reference(options, books):
    model = small(books=books).double()  # float64: no rounding differences between the paths
    a = model.generate(**options, generator=torch.Generator().manual_seed(7))
    b = model.generate(**options, use_cache=False, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    c = model.generate(**options, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, c), "deterministic given a generator"
    # the fixed-shape caches and steps (CUDA graphs on a GPU; here the same steps, unrecorded)
    s = model.generate(**options, static=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, s)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_sampling_equals_the_growing_caches():
    from model.sampling_steps import CapturedStep

    model = small(books=3).cuda().double()
    recorded = []
    original = CapturedStep._record
    CapturedStep._record = lambda self: (recorded.append(self), original(self))[1]
    try:
        for options in (dict(labels=[0, 3, 1]), dict(labels=[2, 2], cfg_scale=3.0, top_k=5)):
            runs = [model.generate(**options, static=static,
                                   generator=torch.Generator("cuda").manual_seed(7))
                    for static in (None, False)]  # fmt: skip
            assert torch.equal(*runs)
    finally:
        CapturedStep._record = original
    assert len(recorded) == 4 and all(step.graph is not None for step in recorded)
    with torch.autocast("cuda", torch.bfloat16):  # recorded without autocast's weight cache
        codes = small().cuda().generate(labels=[0, 1], static=True)
    assert codes.shape == (2, 3, 3, 3)


def test_static_steps_are_one_graph_for_every_position():
    """What a CUDA graph needs, checked on the CPU: the static spatial step compiles to one
    graph (no break) that serves every position without recompiling, where the growing caches'
    step recompiles as its keys lengthen."""
    from torch._dynamo.testing import CompileCounter

    from model.sampling_steps import DynamicSteps, StaticSteps

    model = small()
    x = torch.randn(2, 1, 32)  # (R, 1, E)
    counts = {}
    for name, steps in [("static", StaticSteps(model, 2, 9, x, capture=False)),
                        ("dynamic", DynamicSteps(model, 2, 9, x))]:  # fmt: skip
        torch._dynamo.reset()
        counter = CompileCounter()
        step = torch.compile(lambda x, s=steps: s.model.spatial(x, s.spatial_caches),
                             backend=counter, fullgraph=True, dynamic=False)  # fmt: skip
        outs = []
        for _ in range(5):
            with torch.no_grad():  # as generate runs
                outs.append(step(x))
            if name == "static":
                steps.spatial_caches.position += 1
        counts[name] = (counter.frame_count, torch.stack(outs))
    torch._dynamo.reset()
    assert counts["static"][0] == 1
    assert counts["dynamic"][0] > 1
    assert torch.allclose(counts["static"][1], counts["dynamic"][1], atol=1e-5)


def test_unconditional_model_and_flat_baseline():
    model = small(classes=0)
    codes = model.generate(num_samples=3, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (3, 3, 3, 3) and codes.max() < 32
    with pytest.raises(ValueError, match="unconditional"):
        model(random_codes(model), torch.tensor([0, 0]))
    flat = RQTransformer(
        RQTransformerConfig(
            code_shape=[4, 4, 1],
            codebook_size=32,
            width=32,
            heads=2,
            spatial_layers=2,
            depth_layers=0,
            num_classes=0,
        ),
        torch.randn(32, 8),
    ).eval()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(flat.generate(num_samples=2, generator=g1),
                       flat.generate(num_samples=2, generator=g2, use_cache=False))  # fmt: skip
    g3 = torch.Generator().manual_seed(3)
    assert torch.equal(flat.generate(num_samples=2, generator=g3, static=True),
                       flat.generate(num_samples=2, generator=torch.Generator().manual_seed(3)))  # fmt: skip


def test_soft_target_loss_equals_hard_for_one_hot():
    model = small()
    codes = random_codes(model)
    logits = model(codes, torch.tensor([0, 1]))
    hard, hard_depth = RQTransformer.loss(logits, codes)
    one_hot = torch.nn.functional.one_hot(codes, 32).float()
    soft, soft_depth = RQTransformer.loss(logits, codes, soft_targets=one_hot)
    assert torch.allclose(hard, soft) and torch.allclose(hard_depth, soft_depth)
    assert torch.allclose(hard_depth.mean(), hard)
    manual = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), codes.reshape(-1))
    assert torch.allclose(hard, manual)


def test_top_k_1_and_tiny_top_p_are_greedy():
    torch.manual_seed(0)
    logits = torch.randn(50, 100)
    assert torch.equal(sample_logits(logits, top_k=1), logits.argmax(1))
    assert torch.equal(sample_logits(logits, top_p=1e-6), logits.argmax(1))
    kept = sample_logits(logits.repeat(20, 1), top_k=3)
    top3 = logits.topk(3, dim=1).indices.repeat(20, 1)
    assert (kept[:, None] == top3).any(1).all()
    with pytest.raises(ValueError, match="temperature"):
        sample_logits(logits, temperature=0.0)


def test_draw_follows_the_probabilities_and_never_a_filtered_code():
    from model.sampling import draw

    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0]])
    drawn = draw(probs.repeat(20000, 1), torch.Generator().manual_seed(0)).view(20000, 2)
    first = torch.bincount(drawn[:, 0], minlength=5) / 20000
    assert torch.allclose(first, probs[0], atol=0.015), first  # 4.5 sigma at p = 0.5
    assert first[1] == 0 and first[4] == 0
    assert (drawn[:, 1] == 3).all()
    again = draw(probs.repeat(20000, 1), torch.Generator().manual_seed(0)).view(20000, 2)
    assert torch.equal(drawn, again)  # seeded


def test_overfits_and_regenerates_code_stacks():
    torch.manual_seed(0)
    cfg = RQTransformerConfig(code_shape=[4, 4, 4], codebook_size=64, width=64, heads=4,
                              spatial_layers=2, depth_layers=2, num_classes=4,
                              label_dropout=0.0)  # fmt: skip
    model = RQTransformer(cfg, torch.randn(64, 16))
    stacks = torch.randint(64, (4, 4, 4, 4))
    labels = torch.arange(4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss, _ = RQTransformer.loss(model(stacks, labels), stacks)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * math.log(64), loss.item()
    model.eval()
    regenerated = model.generate(labels=labels, top_k=1)
    assert torch.equal(regenerated, stacks)
    # label conditioning reaches the model: same generator, different labels, different codes
    swapped = model.generate(labels=labels.flip(0), top_k=1)
    assert torch.equal(swapped, stacks.flip(0))


def test_label_dropout_only_in_training():
    model = small(label_dropout=1.0)
    codes, labels = random_codes(model), torch.tensor([0, 1])
    uncond = model(codes, torch.tensor([4, 4]))  # the null label
    assert torch.allclose(model.train()(codes, labels), uncond, atol=1e-6)
    assert not torch.allclose(model.eval()(codes, labels), uncond)


def test_save_load_round_trip(tmp_path):
    model = small()
    model.save_pretrained(str(tmp_path / "ar"))
    loaded = RQTransformer.from_pretrained(str(tmp_path / "ar"))
    codes, labels = random_codes(model), torch.tensor([1, 2])
    assert torch.equal(loaded(codes, labels), model(codes, labels))
    assert torch.equal(loaded.code_embeddings, model.code_embeddings)


def test_paper_presets_name_every_field():
    fields = {f.name for f in dataclasses.fields(RQTransformerConfig)}
    for name, values in RQTransformerConfig.presets.items():
        if name != "tiny":
            assert set(values) == fields, name


def test_configuration_errors():
    with pytest.raises(KeyError, match="unknown RQ-Transformer preset"):
        RQTransformerConfig.preset("imagenet256-10B")
    assert RQTransformerConfig.preset("imagenet256-1.4B").spatial_layers == 42
    with pytest.raises(ValueError, match="do not fit"):
        RQTransformer(RQTransformerConfig.preset("tiny"), torch.randn(100, 8))
    model = small()
    with pytest.raises(ValueError, match="code_shape"):
        model(torch.zeros(1, 2, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="one per depth"):
        model.generate(labels=[0], top_k=[1, 2])
    with pytest.raises(ValueError, match="cfg_scale needs labels"):
        model.generate(num_samples=1, cfg_scale=2.0)
    with pytest.raises(ValueError, match="labels must be in"):
        model.generate(labels=[9])
