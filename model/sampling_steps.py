"""The two transformer calls of cached sampling, behind one interface for the sampling loop
(model/sampling.py `generate_cached`):

    spatial(x)   (R, 1, E) input at the next position -> (R, 1, E) its spatial output h_t
    next_position()                                     the depth caches start over
    depth(u)     (R, 1, E) input at the next depth     -> (R, K) logits of that depth's code

`DynamicSteps` grows its KV caches a position at a time (the default). `StaticSteps` keeps every
shape fixed (model/kv_cache.py StaticKVCache), so that on a GPU each call is recorded once as a
CUDA graph and then replayed as one launch: a spatial step of the 1.4B model is 42 layers of
about ten kernels each, issued from Python otherwise. Sampling itself (top-k, guidance, the
draw) stays eager between the calls: it is a few kernels a depth and reads a torch.Generator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


class DynamicSteps:
    """Caches that grow a position at a time; a new set of depth caches every position."""

    def __init__(self, model: Any, rows: int, capacity: int, like: Tensor) -> None:
        self.model, self.rows, self.like = model, rows, like
        self.spatial_caches = model.spatial.new_caches(rows, capacity, like)
        self.depth_caches: list = []

    def prefill(self, prefix: Tensor) -> None:
        """(R, L, E) caption tokens before position 0, into the spatial caches in one call."""
        self.model.spatial(prefix, self.spatial_caches)

    def spatial(self, x: Tensor) -> Tensor:
        return self.model.spatial(x, self.spatial_caches)

    def next_position(self) -> None:
        depth = self.model.config.depth
        self.depth_caches = self.model.depth_transformer.new_caches(self.rows, depth, self.like)

    def depth(self, u: Tensor) -> Tensor:
        return self.model.head(self.model.depth_transformer(u, self.depth_caches)[:, 0])


class CapturedStep:
    """`fn(x)` for an x of one fixed shape, through a static input buffer. With `capture` (a
    CUDA model), the first call records fn as a CUDA graph and every call replays it.

    fn must be a function of the buffer's contents and of state it updates idempotently (the
    static caches write the same keys at the same position): the recording is preceded by a
    warm-up call on a side stream, as torch.cuda.graph asks, which runs the step once more.
    The output returned is the graph's own buffer, overwritten by the next call: use it first.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], capture: bool) -> None:
        self.fn, self.capture = fn, capture
        self.input: Tensor | None = None
        self.output: Tensor | None = None
        self.graph: Any = None

    def __call__(self, x: Tensor) -> Tensor:
        if self.input is None:
            self.input = x.clone()
            if self.capture:
                self._record()
        else:
            self.input.copy_(x)
        if self.graph is None:
            return self.fn(self.input)
        self.graph.replay()
        return self.output

    def _record(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), _uncached_autocast():  # lazy inits (cuBLAS handles) here
            self.fn(self.input)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: another thread's CUDA calls (a process group's watchdog, in the
            # train-ar preview) do not break the recording
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"), \
                    _uncached_autocast():  # fmt: skip
                self.output = self.fn(self.input)
        except RuntimeError as error:
            raise RuntimeError(
                f"recording a sampling step as a CUDA graph failed ({error}): sample with the "
                "growing caches instead (generate(static=False); the sample stage: "
                "sample.cuda_graphs=false)"
            ) from error


def _uncached_autocast() -> contextlib.AbstractContextManager:
    """Under a caller's CUDA autocast, the same autocast without its cache of cast weights: a
    cast cached while recording would be freed when the caller's autocast exits, under a graph
    that still reads it (torch.cuda.graph's documented constraint)."""
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", torch.get_autocast_dtype("cuda"), cache_enabled=False)


class StaticSteps:
    """Fixed-shape caches and steps; on CUDA each step a CUDA graph (`capture`). The positions
    are moved between calls, outside the graphs, as device tensors."""

    def __init__(self, model: Any, rows: int, capacity: int, like: Tensor, capture: bool) -> None:
        self.model = model
        depth = model.config.depth
        self.spatial_caches = model.spatial.new_caches(rows, capacity, like, static=True)
        self.depth_caches = model.depth_transformer.new_caches(rows, depth, like, static=True)

        def spatial_step(x: Tensor) -> Tensor:  # (R, 1, E) -> (R, 1, E)
            return model.spatial(x, self.spatial_caches)

        def depth_step(u: Tensor) -> Tensor:  # (R, 1, E) -> (R, K)
            return model.head(model.depth_transformer(u, self.depth_caches)[:, 0])

        self._spatial = CapturedStep(spatial_step, capture)
        self._depth = CapturedStep(depth_step, capture)

    def prefill(self, prefix: Tensor) -> None:
        """(R, L, E) caption tokens, one position at a time through the same (recorded) step."""
        for i in range(prefix.shape[1]):
            self.spatial(prefix[:, i : i + 1])

    def spatial(self, x: Tensor) -> Tensor:
        out = self._spatial(x)
        self.spatial_caches.position += 1
        return out

    def next_position(self) -> None:
        self.depth_caches.position.zero_()

    def depth(self, u: Tensor) -> Tensor:
        out = self._depth(u)
        self.depth_caches.position += 1
        return out
