"""Residual quantization (RQ) of latent vectors, as in Lee et al., CVPR 2022.

A vector z is approximated by D codes from one codebook (shared across depths by default):

    r_0 = z,   k_d = argmin_k ||r_{d-1} - e_k||^2,   r_d = r_{d-1} - e_{k_d},   z_hat = sum_d e_{k_d}

Tensors are channels-last: z is (B, H, W, C) and codes are (B, H, W, D). `RQVAE` permutes its
conv feature maps before calling in.

The codebook is not learned by gradient descent: it follows the exponential moving average
(EMA) of the vectors assigned to each code, with Laplace smoothing of the counts, and codes whose
EMA count falls below `restart_threshold` are restarted from residuals of the current batch.
`ema_update` says when: "per_depth" (the paper's, the official RQBottleneck) updates the
codebook after each depth's lookup, so depth d's embedding is the one its code was found with
and depth d+1 already sees the moved codebook;
"joint" (our earlier choice) feeds all depths' assignments of a forward pass to one update,
after the whole stack is quantized. Under torch.distributed,
counts and sums are all-reduced and restart vectors broadcast from rank 0, so every rank keeps a
bit-identical codebook.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

DISTANCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
EMA_UPDATES = ("per_depth", "joint")


class QuantizerOutput(NamedTuple):
    quantized: Tensor  # (B, H, W, C) full-depth sum, straight-through gradient to z
    codes: Tensor  # (B, H, W, D) int64
    commitment_loss: Tensor  # scalar, unweighted: mean_d ||z - sg(sum_{i<=d} e_i)||^2
    perplexity: Tensor  # (D,) exp(entropy) of the batch's code histogram at each depth
    usage: Tensor  # (D,) fraction of the K codes used in the batch at each depth


def code_distances(vectors: Tensor, codebook: Tensor, codebook_sq_norm: Tensor) -> Tensor:
    """(N, C) vectors, (K, C) codebook, (K,) its squared norms -> (N, K) ||e||^2 - 2 v.e: the
    squared distances less ||v||^2, a per-row constant that changes neither an argmin nor a
    softmax over codes."""
    return torch.addmm(codebook_sq_norm, vectors, codebook.t(), alpha=-2.0)


def embed_codes(codebooks: Tensor, codes: Tensor) -> Tensor:
    """(books, K, C) codebooks (one shared, or one per depth), (..., D') codes -> (..., D', C)
    the embedding of each depth's code, not summed."""
    if codebooks.shape[0] == 1:
        return codebooks[0][codes]
    return torch.stack([codebooks[d][codes[..., d]] for d in range(codes.shape[-1])], dim=-2)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX). Without it torch emulates
    bf16, and the bf16 distance mode measured 12x *slower* than fp32 on an AVX2-only machine
    (112 against 1,401 vectors/s)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:  # no /proc (not Linux): fp32, the safe choice
        return False


@functools.cache
def _warn_emulated_bf16() -> None:
    warnings.warn(
        "distance_dtype='bfloat16' on a CPU without native bf16 (no avx512_bf16 / amx_bf16 in "
        "/proc/cpuinfo): torch would emulate it, about 12x slower than fp32, so the quantizer "
        "uses fp32 distances instead (the same codes). Set distance_dtype: float32 to silence "
        "this.",
        stacklevel=3,
    )


def nearest_codes(
    vectors: Tensor,
    codebook: Tensor,
    codebook_sq_norm: Tensor | None = None,
    chunk_mb: float = 128.0,
    distance_dtype: str = "float32",
    rerank_candidates: int = 8,
) -> Tensor:
    """Index of the nearest codebook row (squared L2) for each vector.

    vectors (N, C), codebook (K, C) -> (N,) int64. Distances are ||e||^2 - 2 v.e (||v||^2 is
    constant per row and cannot change the argmin), computed `chunk_mb` megabytes of the N x K
    matrix at a time, so memory stays bounded for any N. With distance_dtype="bfloat16" the
    matrix product runs in bf16 and the best `rerank_candidates` codes of each row are
    re-ranked with exact fp32 distances.
    """
    if distance_dtype not in DISTANCE_DTYPES:
        raise ValueError(
            f"distance_dtype={distance_dtype!r} is not supported; use one of {list(DISTANCE_DTYPES)}"
        )
    if distance_dtype == "bfloat16" and vectors.device.type == "cpu" and not cpu_has_native_bf16():
        _warn_emulated_bf16()
        distance_dtype = "float32"
    with torch.autocast(vectors.device.type, enabled=False):
        return _nearest_chunked(
            vectors, codebook, codebook_sq_norm, chunk_mb, distance_dtype, rerank_candidates
        )


def _nearest_chunked(
    vectors: Tensor,
    codebook: Tensor,
    codebook_sq_norm: Tensor | None,
    chunk_mb: float,
    distance_dtype: str,
    rerank_candidates: int,
) -> Tensor:
    num_vectors, num_codes = vectors.shape[0], codebook.shape[0]
    vectors = vectors.float()
    codebook = codebook.float()
    if codebook_sq_norm is None:
        codebook_sq_norm = codebook.pow(2).sum(1)  # (K,)
    rows_per_chunk = max(1, int(chunk_mb * 2**20 // (4 * num_codes)))
    fast = distance_dtype == "bfloat16"
    if fast:
        low_codebook = codebook.to(torch.bfloat16)
        low_sq_norm = codebook_sq_norm.to(torch.bfloat16)
        num_candidates = min(rerank_candidates, num_codes)

    out = torch.empty(num_vectors, dtype=torch.long, device=vectors.device)
    for start in range(0, num_vectors, rows_per_chunk):
        chunk = vectors[start : start + rows_per_chunk]  # (n, C)
        if not fast:
            scores = code_distances(chunk, codebook, codebook_sq_norm)  # (n, K)
            out[start : start + chunk.shape[0]] = scores.argmin(dim=1)
            continue
        scores = code_distances(chunk.to(torch.bfloat16), low_codebook, low_sq_norm)
        candidates = scores.topk(num_candidates, dim=1, largest=False).indices  # (n, c)
        exact = (chunk.unsqueeze(1) - codebook[candidates]).pow(2).sum(-1)  # (n, c) fp32
        best = exact.argmin(dim=1, keepdim=True)
        out[start : start + chunk.shape[0]] = candidates.gather(1, best).squeeze(1)
    return out


def kmeans(vectors: Tensor, num_clusters: int, iterations: int = 10) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on (N, C) vectors -> centres (num_clusters, C) and cluster sizes.

    Empty clusters keep their previous centre."""
    centres = _sample_rows(vectors, num_clusters)
    for _ in range(iterations):
        assign = nearest_codes(vectors, centres)
        counts = torch.bincount(assign, minlength=num_clusters).to(vectors.dtype)
        sums = torch.zeros_like(centres).index_add_(0, assign, vectors)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    counts = torch.bincount(nearest_codes(vectors, centres), minlength=num_clusters)
    return centres, counts.to(vectors.dtype)


def _sample_rows(vectors: Tensor, num_rows: int) -> Tensor:
    """num_rows rows drawn from vectors; when there are too few, tiled with small noise."""
    num_vectors, dim = vectors.shape
    if num_vectors >= num_rows:
        return vectors[torch.randperm(num_vectors, device=vectors.device)[:num_rows]].clone()
    picks = vectors[torch.randint(num_vectors, (num_rows,), device=vectors.device)]
    return picks + torch.randn_like(picks) * (0.01 / math.sqrt(dim))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class ResidualQuantizer(nn.Module):
    def __init__(
        self,
        dim: int,
        codebook_size: int,
        depth: int,
        shared_codebook: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        restart_threshold: float = 1.0,
        kmeans_init: bool = False,
        distance_dtype: str = "float32",
        distance_chunk_mb: float = 128.0,
        ema_update: str = "joint",
    ) -> None:
        super().__init__()
        if distance_dtype not in DISTANCE_DTYPES:
            raise ValueError(
                f"distance_dtype={distance_dtype!r}: use one of {list(DISTANCE_DTYPES)}"
            )
        if ema_update not in EMA_UPDATES:
            raise ValueError(f"ema_update={ema_update!r}: use one of {list(EMA_UPDATES)}")
        self.ema_update = ema_update
        self.dim, self.codebook_size, self.depth = dim, codebook_size, depth
        self.shared_codebook = shared_codebook
        self.decay, self.eps, self.restart_threshold = decay, eps, restart_threshold
        self.kmeans_init = kmeans_init
        self.distance_dtype, self.distance_chunk_mb = distance_dtype, distance_chunk_mb

        num_books = 1 if shared_codebook else depth
        # Codebooks are buffers: EMA, not the optimizer, moves them.
        self.register_buffer("codebooks", torch.randn(num_books, codebook_size, dim))
        self.register_buffer("ema_count", torch.zeros(num_books, codebook_size))
        self.register_buffer("ema_sum", self.codebooks.clone())
        self.register_buffer("initialized", torch.tensor(not kmeans_init))

    # -- lookups ------------------------------------------------------------------------------

    def book_of_depth(self, d: int) -> int:
        return 0 if self.shared_codebook else d

    def _nearest(self, residual: Tensor, book: int, sq_norm: Tensor) -> Tensor:
        return nearest_codes(
            residual,
            self.codebooks[book],
            sq_norm,
            chunk_mb=self.distance_chunk_mb,
            distance_dtype=self.distance_dtype,
        )

    def _quantize_flat(
        self, z_flat: Tensor, update: bool = False
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Greedy residual quantization of (N, C) -> codes (N, D), the code embeddings that
        were subtracted (N, D, C) and the D residuals that were quantized. With update=True and
        ema_update="per_depth" the codebook is EMA-updated after each depth's lookup, as the
        official RQBottleneck does (VQEmbedding.forward: find the nearest codes, update the
        EMA buffers and restart unused codes, embed with the weights as they were, then
        refresh the weights): depth d's embedding comes from the codebook its codes were found
        in, and depth d+1 is searched in the codebook depth d moved."""
        per_depth = update and self.ema_update == "per_depth"
        sq_norms = self.codebooks.pow(2).sum(-1)  # (books, K)
        residual = z_flat.detach().float().clone()
        codes, embedded, residual_inputs = [], [], []
        for d in range(self.depth):
            book = self.book_of_depth(d)
            code = self._nearest(residual, book, sq_norms[book])  # (N,)
            embedding = self.codebooks[book][code]  # (N, C): looked up before the update
            residual_inputs.append(residual)  # never modified in place below
            if per_depth:
                self._ema_update_book(book, code, residual_inputs[-1])
                sq_norms = self.codebooks.pow(2).sum(-1)
            residual = residual - embedding
            codes.append(code)
            embedded.append(embedding)
        return torch.stack(codes, dim=1), torch.stack(embedded, dim=1), residual_inputs

    def decode_codes(self, codes: Tensor, depth: int | None = None) -> Tensor:
        """(B, H, W, D) codes -> (B, H, W, C): the sum of the first `depth` code embeddings."""
        depth = self.depth if depth is None else depth
        if not 1 <= depth <= codes.shape[-1]:
            raise ValueError(f"depth={depth} must be between 1 and {codes.shape[-1]}")
        return embed_codes(self.codebooks, codes[..., :depth]).sum(dim=-2)

    @torch.no_grad()
    def encode(self, z: Tensor) -> Tensor:
        """(B, H, W, C) -> codes (B, H, W, D) int64; deterministic, never updates the codebook."""
        codes, _, _ = self._quantize_flat(z.reshape(-1, self.dim))
        return codes.reshape(*z.shape[:-1], self.depth)

    @torch.no_grad()
    def soft_codes(
        self,
        z: Tensor,
        temperature: float = 0.5,
        stochastic: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Codes and per-depth distributions q_d = softmax(-||r_{d-1} - e_k||^2 / temperature).

        (B, H, W, C) -> codes (B, H, W, D), probabilities (B, H, W, D, K). With stochastic=True
        each code is sampled from q_d (the paper's stochastic codes), otherwise it is the argmin.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        residual = z.reshape(-1, self.dim).float().clone()  # (N, C)
        codes, probs = [], []
        for d in range(self.depth):
            book = self.codebooks[self.book_of_depth(d)]
            with torch.autocast(z.device.type, enabled=False):  # exact fp32 maths
                distances = code_distances(residual, book, book.pow(2).sum(1))  # (N, K)
            q = torch.softmax(-distances / temperature, dim=-1)
            if stochastic:
                code = torch.multinomial(q, 1, generator=generator).squeeze(1)
            else:
                code = q.argmax(dim=-1)
            residual -= book[code]
            codes.append(code)
            probs.append(q)
        shape = z.shape[:-1]
        return (
            torch.stack(codes, dim=1).reshape(*shape, self.depth),
            torch.stack(probs, dim=1).reshape(*shape, self.depth, self.codebook_size),
        )

    # -- training -----------------------------------------------------------------------------

    def forward(self, z: Tensor) -> QuantizerOutput:
        """z (B, H, W, C) -> QuantizerOutput. In training mode the codebook is EMA-updated."""
        if z.shape[-1] != self.dim:
            raise ValueError(
                f"expected channels-last input with C={self.dim}, got {tuple(z.shape)}"
            )
        z_flat = z.reshape(-1, self.dim).float()  # (N, C)
        if self.training and not bool(self.initialized):
            self._kmeans_initialize(z_flat.detach())

        codes, embedded, residual_inputs = self._quantize_flat(z_flat, update=self.training)
        partial = embedded.cumsum(dim=1)  # (N, D, C): the sum of the first d+1 embeddings
        commitment = (z_flat.unsqueeze(1) - partial.detach()).pow(2).mean()
        quantized = partial[:, -1]
        # Straight-through: forward value is the quantized sum, gradient flows to z.
        quantized = z_flat + (quantized - z_flat).detach()

        perplexity, usage = self._usage_stats(codes)
        if self.training and self.ema_update == "joint":
            self._ema_update(codes, residual_inputs)
        shape = z.shape[:-1]
        return QuantizerOutput(
            quantized.reshape(*shape, self.dim).to(z.dtype),
            codes.reshape(*shape, self.depth),
            commitment,
            perplexity,
            usage,
        )

    def _usage_stats(self, codes: Tensor) -> tuple[Tensor, Tensor]:
        perplexity, usage = [], []
        for d in range(self.depth):
            counts = torch.bincount(codes[:, d], minlength=self.codebook_size).float()
            p = counts / counts.sum()
            entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
            perplexity.append(entropy.exp())
            usage.append((counts > 0).float().mean())
        return torch.stack(perplexity), torch.stack(usage)

    @torch.no_grad()
    def _ema_update(self, codes: Tensor, residual_inputs: list[Tensor]) -> None:
        """The joint update: every depth's assignments of the pass, one update per book."""
        for book in range(self.codebooks.shape[0]):
            depths = range(self.depth) if self.shared_codebook else [book]
            assigned = torch.cat([codes[:, d] for d in depths])  # (M,)
            vectors = torch.cat([residual_inputs[d] for d in depths])  # (M, C)
            self._ema_update_book(book, assigned, vectors)

    @torch.no_grad()
    def _ema_update_book(self, book: int, assigned: Tensor, vectors: Tensor) -> None:
        """One EMA step of one codebook from (M,) codes assigned to (M, C) vectors."""
        counts = torch.bincount(assigned, minlength=self.codebook_size).float()
        sums = torch.zeros_like(self.ema_sum[book]).index_add_(0, assigned, vectors)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.ema_count[book].mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum[book].mul_(self.decay).add_(sums, alpha=1 - self.decay)
        self._restart_dead_codes(book, vectors)
        self._refresh_codebook(book)

    def _restart_dead_codes(self, book: int, vectors: Tensor) -> None:
        dead = self.ema_count[book] < self.restart_threshold  # identical on every rank
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        fresh = _sample_rows(vectors, num_dead)  # (num_dead, C)
        if _distributed():
            dist.broadcast(fresh, src=0)
        self.ema_sum[book][dead] = fresh
        self.ema_count[book][dead] = 1.0

    def _refresh_codebook(self, book: int) -> None:
        count = self.ema_count[book]
        total = count.sum()
        smoothed = (count + self.eps) / (total + self.codebook_size * self.eps) * total  # Laplace
        self.codebooks[book] = self.ema_sum[book] / smoothed.unsqueeze(1)

    @torch.no_grad()
    def _kmeans_initialize(self, z_flat: Tensor) -> None:
        residual = z_flat.clone()
        for book in range(self.codebooks.shape[0]):
            centres, sizes = kmeans(residual, self.codebook_size)
            if _distributed():
                dist.broadcast(centres, src=0)
                dist.broadcast(sizes, src=0)
            # EMA state as if the batch had been seen: empty clusters restart on the next step.
            self.codebooks[book] = centres
            self.ema_sum[book] = centres * sizes.unsqueeze(1)
            self.ema_count[book] = sizes
            # Per-depth books: the next book is fitted to what this one leaves over.
            residual = residual - centres[nearest_codes(residual, centres)]
        self.initialized.fill_(True)
