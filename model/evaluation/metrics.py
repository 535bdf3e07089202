"""Generative-model metrics over feature vectors: Fréchet distance (FID), Inception Score,
precision and recall (Kynkäänniemi et al. 2019), SSIM. Pure functions over arrays; which
features (the FID Inception network, model/evaluation/inception.py, or another) is the caller's choice.

The choices are torch-fidelity 0.4's: covariance with the n - 1 denominator, the trace of the
matrix square root from the eigenvalues of S1 S2 in float64 (never fails; pytorch-fid, clean-fid
and ADM take `scipy.linalg.sqrtm` with an eps-offset retry, the same figure where that
succeeds), IS from the logits without the fc bias over 10 splits, precision/recall with k = 3
nearest neighbours.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass
class FeatureMoments:
    """Running sums of feature vectors: merged across shards, then the mean and covariance."""

    count: int
    total: np.ndarray  # (F,) float64
    outer: np.ndarray  # (F, F) float64: sum of x x^T

    @classmethod
    def empty(cls, dim: int) -> FeatureMoments:
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureMoments:
        x = np.asarray(features, np.float64)  # (N, F)
        return cls(len(x), x.sum(0), x.T @ x)

    def __add__(self, other: FeatureMoments) -> FeatureMoments:
        return FeatureMoments(self.count + other.count, self.total + other.total,
                              self.outer + other.outer)  # fmt: skip

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(F,) mean and (F, F) covariance (n - 1 denominator, as np.cov)."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mean = self.total / self.count
        cov = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
        return mean, cov


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray, counts: tuple[int | None, int | None] = (None, None)
                     ) -> float:  # fmt: skip
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)): FID when the moments are Inception
    pool features.

    Tr((S1 S2)^(1/2)) is the sum of the square roots of S1 S2's eigenvalues, as torch-fidelity
    0.4 computes it: S1 S2 is similar to the positive semi-definite S1^(1/2) S2 S1^(1/2), so
    its eigenvalues are real and >= 0, and rounding's small negative or complex ones add only
    their roots' real parts. Unlike a matrix square root (scipy's `sqrtm`, which left an
    imaginary part of 0.0014 on one 200-against-200 pair of real features) it cannot fail on
    a singular covariance. `counts`: the number of vectors behind each covariance, when known:
    fewer than the feature dimensions make it singular, and the distance is then biased high
    (a warning says so)."""
    mu1, mu2 = np.atleast_1d(np.float64(mu1)), np.atleast_1d(np.float64(mu2))
    sigma1, sigma2 = np.atleast_2d(np.float64(sigma1)), np.atleast_2d(np.float64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature statistics of different sizes: {mu1.shape} and {mu2.shape}")
    few = [n for n in counts if n is not None and n <= len(mu1)]
    if few:
        warnings.warn(f"a Fréchet distance from {min(few)} feature vectors of {len(mu1)} "
                      f"dimensions: the covariance is singular and the distance biased high; "
                      f"compare figures only at equal sample counts", stacklevel=2)  # fmt: skip
    diff = mu1 - mu2
    eigenvalues = np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)
    trace_covmean = np.sqrt(eigenvalues).real.sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over `splits` consecutive splits of exp(E_x KL(p(y|x) || p(y)))."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)  # (N, classes)
    splits = max(1, min(splits, len(logits)))
    scores = []
    for part in torch.tensor_split(logits, splits):
        log_p = part.log_softmax(1)  # (n, classes)
        log_marginal = log_p.exp().mean(0).log()
        scores.append((log_p.exp() * (log_p - log_marginal)).sum(1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def split_of(index: np.ndarray, total: int, splits: int) -> np.ndarray:
    """The Inception Score split of each sample index: `torch.tensor_split`'s consecutive,
    near-equal parts of `total` (the first total % splits parts one longer)."""
    size, extra = divmod(total, splits)
    long_end = extra * (size + 1)  # where the longer parts end
    index = np.asarray(index)
    return np.where(index < long_end, index // (size + 1),
                    extra + (index - long_end) // max(size, 1))  # fmt: skip


@dataclass
class InceptionScoreSums:
    """Per-split sums from which `inception_score` follows, so that every worker sums its own
    samples and only (splits, classes) arrays are merged: with p = p(y|x) and m the split's
    mean p, E_x KL(p || m) = E_x[sum p log p] - sum m log m."""

    count: np.ndarray  # (S,)
    p_sum: np.ndarray  # (S, L) float64: sum of p(y|x)
    plogp_sum: np.ndarray  # (S,) float64: sum of sum_y p log p

    @classmethod
    def of(cls, logits: np.ndarray, first: int, total: int, splits: int) -> InceptionScoreSums:
        """The sums of `logits`, samples first..first+N-1 of `total`, over `splits` splits."""
        log_p = torch.as_tensor(np.asarray(logits), dtype=torch.float64).log_softmax(1)
        p = log_p.exp()
        which = split_of(np.arange(first, first + len(p)), total, splits)
        count = np.bincount(which, minlength=splits).astype(np.float64)
        p_sum, plogp_sum = np.zeros((splits, p.shape[1])), np.zeros(splits)
        np.add.at(p_sum, which, p.numpy())
        np.add.at(plogp_sum, which, (p * log_p).sum(1).numpy())
        return cls(count, p_sum, plogp_sum)

    def __add__(self, other: InceptionScoreSums) -> InceptionScoreSums:
        return InceptionScoreSums(self.count + other.count, self.p_sum + other.p_sum,
                                  self.plogp_sum + other.plogp_sum)  # fmt: skip

    def score(self) -> tuple[float, float]:
        """(mean, std) over the splits, as `inception_score`."""
        m = self.p_sum / self.count[:, None]
        kl = self.plogp_sum / self.count - (m * np.log(np.clip(m, 1e-300, None))).sum(1)
        scores = np.exp(kl)
        return float(np.mean(scores)), float(np.std(scores))


def _kth_neighbour_radii(x: Tensor, k: int, block: int) -> Tensor:
    """(N,) distance from each row of x to its k-th nearest other row."""
    radii = []
    for start in range(0, len(x), block):
        d = torch.cdist(x[start : start + block], x)  # (b, N)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # + 1: the row itself is at 0
    return torch.cat(radii)


def _within(points: Tensor, centres: Tensor, radii: Tensor, block: int) -> Tensor:
    """(P,) whether each point lies in some centre's ball."""
    hits = []
    for start in range(0, len(points), block):
        d = torch.cdist(points[start : start + block], centres)  # (b, C)
        hits.append((d <= radii.unsqueeze(0)).any(1))
    return torch.cat(hits)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3,
                     block: int = 4096) -> tuple[float, float]:  # fmt: skip
    """Improved precision (fakes inside the real manifold) and recall (reals inside the fake
    manifold), each manifold the union of balls reaching every point's k-th neighbour."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} real and fake "
                         f"features, got {len(real)} and {len(fake)}")  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    r = torch.as_tensor(np.asarray(real), dtype=torch.float32, device=device)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float32, device=device)
    precision = _within(f, r, _kth_neighbour_radii(r, k, block), block).float().mean().item()
    recall = _within(r, f, _kth_neighbour_radii(f, k, block), block).float().mean().item()
    return precision, recall


def ssim_per_image(recon: Tensor, images: Tensor) -> Tensor:
    """(B,) SSIM (11x11 Gaussian window, sigma 1.5, as Wang et al.) of (B, 3, H, W) images in
    [-1, 1], computed by torchmetrics on [0, 1]."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    to_unit = lambda t: (t.float().clamp(-1, 1) + 1) / 2  # noqa: E731
    return structural_similarity_index_measure(to_unit(recon), to_unit(images),
                                               data_range=1.0, reduction="none")  # fmt: skip
