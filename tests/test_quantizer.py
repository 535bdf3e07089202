import itertools
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model.quantizer import ResidualQuantizer, kmeans, nearest_codes


def clustered(n: int, dim: int, clusters: int = 16, scale: float = 4.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=g) * scale
    picks = torch.randint(clusters, (n,), generator=g)
    return centres[picks] + torch.randn(n, dim, generator=g)


def trained_quantizer(dim=8, k=64, depth=4, steps=30, **kwargs) -> ResidualQuantizer:
    torch.manual_seed(0)
    q = ResidualQuantizer(dim, k, depth, **kwargs).train()
    for step in range(steps):
        q(clustered(512, dim, seed=step).reshape(8, 8, 8, dim))
    return q.eval()


def test_depth1_codes_are_brute_force_nearest_neighbours():
    torch.manual_seed(0)
    q = ResidualQuantizer(dim=16, codebook_size=100, depth=1).eval()
    z = torch.randn(4, 5, 5, 16)
    codes = q.encode(z)[..., 0].reshape(-1)
    brute = torch.cdist(z.reshape(-1, 16).double(), q.codebooks[0].double()).pow(2)
    chosen = brute.gather(1, codes[:, None]).squeeze(1)
    assert torch.allclose(chosen, brute.min(1).values, rtol=1e-6, atol=1e-6)
    assert (codes == brute.argmin(1)).float().mean() == 1.0


def test_chunked_distances_match_one_chunk():
    torch.manual_seed(0)
    vectors, codebook = torch.randn(3000, 32), torch.randn(500, 32)
    one_chunk = nearest_codes(vectors, codebook, chunk_mb=1024)
    tiny_chunks = nearest_codes(vectors, codebook, chunk_mb=0.01)  # 5 rows per chunk
    assert torch.equal(one_chunk, tiny_chunks)


def test_bfloat16_distances_agree_with_fp32():
    codebook = clustered(4096, 64, clusters=256, seed=1)
    vectors = clustered(20000, 64, clusters=256, seed=2)
    exact = nearest_codes(vectors, codebook)
    fast = nearest_codes(vectors, codebook, distance_dtype="bfloat16")
    assert (exact == fast).float().mean() >= 0.999
    with pytest.raises(ValueError, match="distance_dtype"):
        nearest_codes(vectors, codebook, distance_dtype="float8")


def test_bfloat16_falls_back_to_fp32_on_a_cpu_without_native_bf16(monkeypatch):
    import warnings

    import model.quantizer as quantizer

    torch.manual_seed(0)
    vectors, codebook = torch.randn(300, 16), torch.randn(64, 16)
    monkeypatch.setattr(quantizer, "cpu_has_native_bf16", lambda: False)
    quantizer._warn_emulated_bf16.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        codes = nearest_codes(vectors, codebook, distance_dtype="bfloat16")
        nearest_codes(vectors, codebook, distance_dtype="bfloat16")
    assert torch.equal(codes, nearest_codes(vectors, codebook))  # fp32's codes exactly
    messages = [str(w.message) for w in caught if "native bf16" in str(w.message)]
    assert len(messages) == 1 and "12x slower" in messages[0]  # one warning, however many calls
    quantizer._warn_emulated_bf16.cache_clear()


def test_residual_error_decreases_with_depth_and_partial_decoding():
    q = trained_quantizer()
    z = clustered(512, 8, seed=99).reshape(8, 8, 8, 8)
    codes = q.encode(z)
    errors = [(z - q.decode_codes(codes, depth=d)).pow(2).mean().item() for d in range(1, 5)]
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    residual_norms = [(z - q.decode_codes(codes, d)).norm(dim=-1).mean() for d in range(1, 5)]
    assert all(a >= b for a, b in itertools.pairwise(residual_norms))
    with pytest.raises(ValueError, match="depth"):
        q.decode_codes(codes, depth=5)


def test_decode_of_encode_equals_forward_quantized():
    q = trained_quantizer()
    z = clustered(128, 8, seed=5).reshape(2, 8, 8, 8).requires_grad_()
    out = q(z)  # eval mode: no codebook update
    assert torch.equal(out.codes, q.encode(z))
    assert torch.allclose(out.quantized, q.decode_codes(out.codes), atol=1e-5)
    # straight-through: the gradient reaches z unchanged
    out.quantized.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))


def test_commitment_loss_is_mean_over_depths_of_cumulative_error():
    q = trained_quantizer()
    z = clustered(64, 8, seed=6).reshape(1, 8, 8, 8)
    out = q(z)
    per_depth = [(z - q.decode_codes(out.codes, d)).pow(2).mean() for d in range(1, 5)]
    assert torch.allclose(out.commitment_loss, torch.stack(per_depth).mean(), rtol=1e-5)


def test_ema_update_matches_hand_computation():
    q = ResidualQuantizer(dim=2, codebook_size=3, depth=1, decay=0.5, eps=0.0,
                          restart_threshold=0.4).train()  # fmt: skip
    book = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    q.codebooks[0], q.ema_sum[0], q.ema_count[0] = book, book, torch.ones(3)
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 0.0], [11.0, 2.0]]).reshape(1, 2, 2, 2)
    out = q(z)
    assert out.codes.reshape(-1).tolist() == [0, 0, 1, 1]
    # counts [2, 2, 0] -> ema_count = 0.5 * 1 + 0.5 * counts
    assert q.ema_count[0].tolist() == [1.5, 1.5, 0.5]
    # sums [(1, 1), (20, 2), (0, 0)] -> ema_sum = 0.5 * book + 0.5 * sums
    assert q.ema_sum[0].tolist() == [[0.5, 0.5], [15.0, 1.0], [0.0, 5.0]]
    expected = torch.tensor([[1 / 3, 1 / 3], [10.0, 2 / 3], [0.0, 10.0]])
    assert torch.allclose(q.codebooks[0], expected, atol=1e-6)


def test_dead_code_is_restarted_from_current_residuals():
    torch.manual_seed(0)
    q = ResidualQuantizer(dim=4, codebook_size=8, depth=1, decay=0.5).train()
    q.codebooks[0] = torch.randn(8, 4) * 0.1
    q.codebooks[0, 7] = 1000.0  # unreachable: never assigned, its count decays below 1
    q.ema_sum[0], q.ema_count[0] = q.codebooks[0].clone(), torch.full((8,), 5.0)
    z = torch.randn(64, 4) * 0.1
    for _ in range(3):  # count 5 -> 2.5 -> 1.25 -> 0.625: restarted at the third step
        q(z.reshape(1, 8, 8, 4))
    assert q.ema_count[0, 7] == 1.0
    distance_to_batch = (z - q.codebooks[0, 7]).norm(dim=1).min()
    assert distance_to_batch < 1e-3, "the dead code should now sit on a batch vector"
    assert (q.encode(z.reshape(1, 8, 8, 4)) == 7).any(), "the restarted code is used"


def test_kmeans_init_beats_random_data_init():
    z = clustered(4096, 16, clusters=64, scale=3.0, seed=3)
    torch.manual_seed(0)
    random_rows = z[torch.randperm(len(z))[:64]]
    centres, sizes = kmeans(z, 64)
    assert sizes.sum() == len(z)

    def error(book):
        return (z - book[nearest_codes(z, book)]).pow(2).mean()

    assert error(centres) < 0.8 * error(random_rows)

    q = ResidualQuantizer(16, 64, depth=2, kmeans_init=True).train()
    assert not bool(q.initialized)
    q(z.reshape(4, 32, 32, 16))
    assert bool(q.initialized)
    plain = ResidualQuantizer(16, 64, depth=2).eval()
    assert (z - q.eval().decode_codes(q.encode(z))).pow(2).mean() < (
        z - plain.decode_codes(plain.encode(z))
    ).pow(2).mean()


def test_unshared_codebooks_one_per_depth():
    q = trained_quantizer(shared_codebook=False, steps=5)
    assert q.codebooks.shape == (4, 64, 8)
    z = clustered(64, 8, seed=4).reshape(1, 8, 8, 8)
    codes = q.encode(z)
    manual = sum(q.codebooks[d][codes[..., d]] for d in range(4))
    assert torch.allclose(q.decode_codes(codes), manual)


def test_soft_codes():
    q = trained_quantizer()
    z = clustered(64, 8, seed=7).reshape(1, 8, 8, 8)
    codes, probs = q.soft_codes(z, temperature=0.5, stochastic=False)
    assert probs.shape == (1, 8, 8, 4, 64)
    assert torch.allclose(probs.sum(-1), torch.ones(1, 8, 8, 4), atol=1e-5)
    assert torch.equal(codes, q.encode(z))
    a, _ = q.soft_codes(z, 5.0, generator=torch.Generator().manual_seed(1))
    b, _ = q.soft_codes(z, 5.0, generator=torch.Generator().manual_seed(1))
    c, _ = q.soft_codes(z, 5.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    cold, _ = q.soft_codes(z, 1e-4, stochastic=True)
    assert torch.equal(cold, q.encode(z))
    with pytest.raises(ValueError, match="temperature"):
        q.soft_codes(z, 0.0)


def test_soft_target_sharpness_depends_on_the_latent_scale():
    """The temperature divides squared distances: the same latents and codebook scaled down
    10x give near-uniform targets at the paper's 0.5 (what the demo's small VAE showed)."""
    from model.training import soft_target_sharpness

    q = trained_quantizer()
    z = clustered(256, 8, seed=7)  # (N, C)
    wide = soft_target_sharpness(q, z, 0.5)
    assert wide["uniform_entropy"] == round(math.log(64), 2)
    small = trained_quantizer()
    small.codebooks.mul_(0.1)
    narrow = soft_target_sharpness(small, z * 0.1, 0.5)
    assert wide["entropy"][0] < 0.1 and wide["nearest_fraction"][0] > 0.9
    assert narrow["entropy"][0] > 0.8 * narrow["uniform_entropy"]
    assert narrow["nearest_fraction"][0] < 0.2
    cold = soft_target_sharpness(small, z * 0.1, 1e-5)
    assert cold["nearest_fraction"] == [1.0] * 4 and max(cold["entropy"]) < 0.01


def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)  # fmt: skip
    torch.manual_seed(0)  # same initial model on every rank, as DDP would ensure
    q = ResidualQuantizer(8, 32, depth=3, kmeans_init=True, decay=0.9).train()
    torch.manual_seed(100 + rank)  # different data and RNG state on each rank
    for step in range(6):
        scale = 1.0 + step + rank  # different data on each rank, restarts included
        q(torch.randn(4, 4, 4, 8) * scale)
    torch.save({"codebooks": q.codebooks, "count": q.ema_count}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_codebooks_identical_across_ranks(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_distributed_worker,
                         args=(r, 2, str(tmp_path / "init"), str(tmp_path)))
             for r in range(2)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(a["codebooks"], b["codebooks"])
    assert torch.equal(a["count"], b["count"])
    torch.manual_seed(0)
    initial = ResidualQuantizer(8, 32, depth=3).codebooks
    assert not torch.equal(a["codebooks"], initial)


def _official_ema_step(vectors, book, count, total, decay, eps, threshold):
    """One VQEmbedding.forward of the official RQBottleneck, written out: nearest codes; EMA of
    the counts and sums; codes whose EMA count is below `threshold` restarted from the
    vectors (drawn without replacement, as torch.randperm); the embedding looked up in the
    book as it was; then the book refreshed with Laplace smoothing."""
    k, dim = book.shape
    codes = ((vectors[:, None] - book[None]) ** 2).sum(-1).argmin(1)
    hits = torch.zeros(k).index_add_(0, codes, torch.ones(len(codes)))
    sums = torch.zeros(k, dim).index_add_(0, codes, vectors)
    count = decay * count + (1 - decay) * hits
    total = decay * total + (1 - decay) * sums
    dead = count < threshold
    if dead.any():
        total[dead] = vectors[torch.randperm(len(vectors))[: int(dead.sum())]]
        count[dead] = 1.0
    embedding = book[codes]
    n = count.sum()
    refreshed = total / ((count + eps) / (n + k * eps) * n)[:, None]
    return codes, embedding, refreshed, count, total


@pytest.mark.parametrize("threshold", [1.0, 0.0], ids=["restarts", "no-restarts"])
def test_per_depth_ema_follows_the_official_order(threshold):
    """ema_update="per_depth": each depth looks its codes up in the codebook they were found
    in, then moves the codebook (and restarts unused codes) before the next depth is searched,
    as the official RQBottleneck. With restarts on, the first step restarts most codes (their
    EMA counts start at 0): updating before the lookup would embed those codes as random
    residuals, which this reference catches."""
    torch.manual_seed(0)
    k, dim, decay, eps = 8, 4, 0.9, 1e-5
    rq = ResidualQuantizer(dim, k, depth=2, decay=decay, restart_threshold=threshold,
                           ema_update="per_depth").train()  # fmt: skip
    z = torch.randn(2, 3, 5, dim)
    flat = z.reshape(-1, dim)
    book, count, total = rq.codebooks[0].clone(), rq.ema_count[0].clone(), rq.ema_sum[0].clone()

    torch.manual_seed(1)
    codes0, emb0, book1, count, total = _official_ema_step(flat, book, count, total, decay, eps,
                                                           threshold)  # fmt: skip
    codes1, emb1, book2, count, total = _official_ema_step(flat - emb0, book1, count, total,
                                                           decay, eps, threshold)  # fmt: skip
    torch.manual_seed(1)
    out = rq(z)
    assert torch.equal(out.codes.reshape(-1, 2), torch.stack([codes0, codes1], 1))
    torch.testing.assert_close(out.quantized.reshape(-1, dim), emb0 + emb1)
    torch.testing.assert_close(rq.codebooks[0], book2)
    torch.testing.assert_close(rq.ema_count[0], count)
    if threshold:  # the first step restarted codes: the embedding is the book as it was
        assert not torch.allclose(book1[codes0], emb0)
    with pytest.raises(ValueError, match="ema_update"):
        ResidualQuantizer(dim, k, depth=2, ema_update="sometimes")


def test_joint_ema_updates_once_from_every_depth():
    """ema_update="joint" (the tiny preset's): the whole stack is quantized against the book as
    it was, then one EMA step takes every depth's assignments together."""
    torch.manual_seed(0)
    k, dim, decay, eps = 8, 4, 0.9, 1e-5
    rq = ResidualQuantizer(dim, k, depth=2, decay=decay, restart_threshold=0.0,
                           ema_update="joint").train()  # fmt: skip
    z = torch.randn(2, 3, 5, dim)
    flat = z.reshape(-1, dim)
    book, count, total = rq.codebooks[0].clone(), rq.ema_count[0].clone(), rq.ema_sum[0].clone()
    codes0 = ((flat[:, None] - book[None]) ** 2).sum(-1).argmin(1)
    residual = flat - book[codes0]
    codes1 = ((residual[:, None] - book[None]) ** 2).sum(-1).argmin(1)
    codes, vectors = torch.cat([codes0, codes1]), torch.cat([flat, residual])
    hits = torch.zeros(k).index_add_(0, codes, torch.ones(len(codes)))
    count = decay * count + (1 - decay) * hits
    total = decay * total + (1 - decay) * torch.zeros(k, dim).index_add_(0, codes, vectors)
    n = count.sum()
    out = rq(z)
    assert torch.equal(out.codes.reshape(-1, 2), torch.stack([codes0, codes1], 1))
    torch.testing.assert_close(out.quantized.reshape(-1, dim), book[codes0] + book[codes1])
    torch.testing.assert_close(
        rq.codebooks[0], total / ((count + eps) / (n + k * eps) * n)[:, None]
    )
