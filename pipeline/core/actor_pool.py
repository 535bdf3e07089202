"""The actor pools of the encode, sample and evaluate stages: their config knobs and the loop that
feeds them units of work.

Each of those stages loads a model once per Ray actor (`max_restarts=-1`: a lost actor comes
back, its task is retried `max_retries` times) and hands it one unit at a time: a shard, a chunk
of samples. A unit goes to the actor with the shortest queue, and each actor has at most
`per_actor` units queued, so the driver never holds more than a bounded number in flight.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

# The pool knobs change where and how fast a stage runs, never what it writes: they are
# execution fields (not fingerprinted) of every config that inherits them.
POOL_FIELDS = ("num_actors", "gpus_per_actor", "cpus_per_actor", "max_retries")


@dataclass
class ActorPoolConfig:
    """The knobs of a stage's actor pool; stage configs inherit them, so the keys stay flat
    (`encode.num_actors=32`)."""

    num_actors: int = 1
    gpus_per_actor: float = 0.0  # > 0: the actors run on GPUs (CPU where CUDA is absent)
    cpus_per_actor: float = 1.0
    max_retries: int = 3  # per task, after its actor died

    def __post_init__(self) -> None:
        if self.num_actors < 1:
            raise ValueError(f"num_actors must be >= 1, got {self.num_actors}")
        if self.gpus_per_actor < 0 or self.cpus_per_actor < 0:
            raise ValueError(f"gpus_per_actor and cpus_per_actor must be >= 0, got "
                             f"{self.gpus_per_actor} and {self.cpus_per_actor}")  # fmt: skip

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_actor > 0


class ActorPool:
    """`actor_class(*args)` as Ray actors, as many as `config.num_actors` but no more than there
    are `units` of work (at least one). Use as a context manager: the actors are killed at the
    end, whatever happened."""

    def __init__(self, actor_class: type, config: ActorPoolConfig, units: int, *args: Any) -> None:
        import ray

        remote = ray.remote(actor_class).options(
            num_cpus=config.cpus_per_actor, num_gpus=config.gpus_per_actor,
            max_restarts=-1, max_task_retries=config.max_retries,
        )  # fmt: skip
        self.actors = [remote.remote(*args) for _ in range(min(config.num_actors, max(1, units)))]

    def __len__(self) -> int:
        return len(self.actors)

    def __enter__(self) -> ActorPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)

    def run(self, units: Iterable[Any], call: Callable[[Any, Any], Any], per_actor: int,
            on_result: Callable[[Any], None]) -> None:  # fmt: skip
        """`call(actor, unit)` -> an ObjectRef for every unit, each given to the actor with the
        shortest queue, at most `per_actor` queued on each; `on_result(result)` as they finish."""
        import ray

        queue, in_flight = list(units), {}  # ObjectRef -> the index of its actor
        while queue or in_flight:
            while queue and len(in_flight) < per_actor * len(self.actors):
                queued = Counter(in_flight.values())
                index = min(range(len(self.actors)), key=queued.__getitem__)
                in_flight[call(self.actors[index], queue.pop(0))] = index
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            del in_flight[ready[0]]
            on_result(ray.get(ready[0]))
