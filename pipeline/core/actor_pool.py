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
POOL_FIELDS = ("num_actors", "gpus_per_actor", "cpus_per_actor", "max_retries", "pending_warning_s")


@dataclass
class ActorPoolConfig:
    """The knobs of a stage's actor pool; stage configs inherit them, so the keys stay flat
    (`encode.num_actors=32`)."""

    num_actors: int = 1
    gpus_per_actor: float = 0.0  # > 0: the actors run on GPUs (CPU where CUDA is absent)
    cpus_per_actor: float = 1.0
    max_retries: int = 3  # per task, after its actor died
    # no result for this long: say why (what the actors ask, what the cluster has free); stop
    # when no node of a cluster without an autoscaler can ever hold an actor
    pending_warning_s: float = 300.0

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
        self.request = {"CPU": config.cpus_per_actor, "GPU": config.gpus_per_actor}
        self.pending_warning_s = config.pending_warning_s
        self.name = actor_class.__name__

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
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=self.pending_warning_s)
            if not ready:
                self._stalled()
                continue
            del in_flight[ready[0]]
            on_result(ray.get(ready[0]))

    def _stalled(self) -> None:
        """No result for `pending_warning_s`: an actor no node of a fixed cluster holds stops
        the stage, naming the request (the plan-time check, core/cluster_fit.py, catches it
        first from the CLI); otherwise say what the actors ask and what is free, and wait on
        (an autoscaler may be adding a node, a unit may be slow)."""
        from pipeline.core.cluster_fit import live_node_types
        from pipeline.core.progress import free_resources

        asked = ", ".join(f"{k} {v:g}" for k, v in self.request.items() if v > 0)
        node_types, source = live_node_types()
        if node_types is not None and not any(t.holds(self.request) for t in node_types):
            raise RuntimeError(f"{self.name} actors ask for {asked}, more than any node of the "
                               f"cluster has ({source}: {'; '.join(map(str, node_types))}), and "
                               f"no autoscaler can add one: lower cpus_per_actor / "
                               f"gpus_per_actor, or add a node that holds it")  # fmt: skip
        print(f"{self.name}: no result for {self.pending_warning_s:.0f} s; each actor asks for "
              f"{asked}. {free_resources()} An autoscaler may be adding a node.", flush=True)  # fmt: skip
