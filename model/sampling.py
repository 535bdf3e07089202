"""How a code is drawn from logits: temperature, top-k and nucleus (top-p) filtering, each
settable per depth, and classifier-free guidance; and the two sampling loops over an
RQTransformer (`model`), with KV caches and without. Used by RQTransformer.generate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from model.sampling_steps import DynamicSteps, StaticSteps


def sample_logits(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(N, K) logits -> (N,) sampled indices after temperature, top-k and nucleus filtering."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (use top_k=1 for greedy)")
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keeps at least the best
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return draw(logits.softmax(dim=-1), generator)


def draw(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """(N, K) probabilities -> (N,) one index per row drawn from them: the inverse of the
    cumulative distribution at one uniform number per row. torch.multinomial draws N x K
    exponentials for one sample, 8% of a CPU sampler's time at K = 512. With `right=True` the
    index found has cdf[i-1] <= u < cdf[i]: never one of probability 0 (filtered away)."""
    cdf = probs.cumsum(-1)  # (N, K)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype)
    index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (N, 1)
    return index.squeeze(1).clamp_max(probs.shape[-1] - 1)


def one_per_depth(value: Any, depth: int, name: str) -> list[Any]:
    if isinstance(value, list | tuple):
        if len(value) != depth:
            raise ValueError(
                f"{name} has {len(value)} entries; give one or one per depth ({depth})"
            )
        return list(value)
    return [value] * depth


@dataclass
class SamplingPlan:
    """What both samplers need per token: guidance and filtering for each depth."""

    batch: int  # samples asked for
    labels: Tensor | None  # (rows,): labels, then null labels when guided
    temperature: float
    top_ks: list[int | None]
    top_ps: list[float | None]
    cfg_scale: float
    generator: torch.Generator | None
    text: Tensor | None = None  # (batch, L) caption token ids, for a text-conditioned model

    @property
    def rows(self) -> int:
        """Rows the model runs: the batch, doubled under guidance (conditions, then none)."""
        for condition in (self.text, self.labels):
            if condition is not None:
                return condition.shape[0]
        return self.batch

    def pick(self, logits: Tensor, depth: int) -> Tensor:
        """(rows, K) logits -> (batch,) codes, guided when cfg_scale != 1."""
        if self.cfg_scale != 1.0:
            cond, uncond = logits[: self.batch], logits[self.batch :]
            logits = uncond + self.cfg_scale * (cond - uncond)
        return sample_logits(logits, self.temperature, self.top_ks[depth], self.top_ps[depth],
                             self.generator)  # fmt: skip


def generate_cached(model: Any, plan: SamplingPlan, static: bool = False) -> Tensor:
    """KV caches in both transformers: one spatial step per position, D depth steps in it.
    static: fixed-shape caches and steps (model/sampling_steps.py), recorded as CUDA graphs
    when the model is on a GPU; the same codes as the growing caches, up to rounding."""
    batch, rows = plan.batch, plan.rows
    h, w, d = model.config.code_shape
    device = model.pos_embedding.device
    codes = torch.zeros(batch, h * w, d, dtype=torch.long, device=device)

    prefix, start = model.condition(plan.labels, plan.text, rows, device)
    x = (start + model.pos_embedding[0]).unsqueeze(1)  # (R, 1, E)
    capacity = h * w + (0 if prefix is None else prefix.shape[1])
    if static:
        steps: Any = StaticSteps(model, rows, capacity, x, capture=device.type == "cuda")
    else:
        steps = DynamicSteps(model, rows, capacity, x)
    if prefix is not None:
        steps.prefill(prefix)  # the caption into the spatial caches
    per_depth_books = model.code_embeddings.shape[0] > 1  # else one book shared by all depths
    for t in range(h * w):
        h_t = steps.spatial(x)  # (R, 1, E)
        steps.next_position()
        u = h_t + model.depth_embedding[0]
        partial = None
        for depth in range(d):
            code = plan.pick(steps.depth(u), depth)  # (R, K) logits -> (B,)
            codes[:, t, depth] = code
            embedding = model.code_embeddings[depth if per_depth_books else 0][code]  # (B, C)
            if rows != batch:
                embedding = embedding.repeat(rows // batch, 1)  # same code for both halves
            partial = embedding if partial is None else partial + embedding  # (R, C)
            if depth + 1 < d:
                u = (model.proj_depth(partial) + model.depth_embedding[depth + 1]).unsqueeze(1)
        if t + 1 < h * w:
            x = (model.proj_spatial(partial) + model.pos_embedding[t + 1]).unsqueeze(1)
    return codes.reshape(batch, h, w, d)


def generate_uncached(model: Any, plan: SamplingPlan) -> Tensor:
    """Every token costs a full forward pass: the slow reference the cached sampler is tested
    against."""
    h, w, d = model.config.code_shape
    codes = torch.zeros(plan.rows, h, w, d, dtype=torch.long, device=model.pos_embedding.device)
    for t in range(h * w):
        for depth in range(d):
            logits = model(codes, plan.labels, plan.text)[:, t // w, t % w, depth]  # causal
            code = plan.pick(logits, depth)
            codes[:, t // w, t % w, depth] = code.repeat(plan.rows // plan.batch)
    return codes[: plan.batch]
