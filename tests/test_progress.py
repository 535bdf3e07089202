"""Progress people can read: a tqdm bar with rate and ETA on a terminal, plain lines with the
percentage and ETA in a log."""

import io
import re

from pipeline.core.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_plain_lines_with_percentage_and_eta():
    log = io.StringIO()
    progress = Progress("encode", total_units=4, total_items=400, every_s=0.0, stream=log)
    for _ in range(4):
        progress.update(100)
    lines = log.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in log.getvalue()
    assert re.fullmatch(r"encode: 1/4 units, 100/400 images \(25%\), [\d,.]+ images/s, "
                        r"elapsed 0:\d\d, ETA 0:\d\d", lines[0]), lines[0]  # fmt: skip
    assert lines[-1].startswith("encode: 4/4 units, 400/400 images (100%)")


def test_a_terminal_gets_a_bar_with_rate_and_eta():
    terminal = Terminal()
    progress = Progress("sample", total_units=2, total_items=64, unit="samples", stream=terminal)
    progress.update(32)
    progress.update(32, ", 0 rejected")
    screen = terminal.getvalue()
    assert "sample: 100%" in screen and "64/64" in screen and "samples/s" in screen
    assert "2/2 units, 0 rejected" in screen and "<00:00" in screen  # the remaining time


def test_a_training_worker_waiting_for_data_says_so_once_a_wait_with_what_is_free(ray_local,
                                                                                   capfd):  # fmt: skip
    """No batch for `after` seconds: one line, with the cluster's free CPUs (the tests' 4-CPU
    instance); none while a step trains (between `got` and `fetching`), none after a batch."""
    import time

    from pipeline.core.progress import BatchWait

    watch = BatchWait(rank=1, after=0.3)
    try:
        watch.got()
        time.sleep(0.8)  # training, not waiting
        assert capfd.readouterr().out == ""
        watch.fetching()
        time.sleep(1.0)
        lines = capfd.readouterr().out.splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("worker 1: no training batch for ")
        assert " of 4 free." in lines[0] and "lower cpus_per_worker or num_workers" in lines[0]
        watch.got()
        time.sleep(0.6)
        assert capfd.readouterr().out == ""
    finally:
        watch.stop()


class _Echo:
    def work(self, unit: float) -> float:
        import time

        time.sleep(unit)
        return unit


def test_an_actor_pool_that_gets_no_result_says_why_and_stops_when_it_never_can(ray_local,
                                                                                  capsys):  # fmt: skip
    """A slow unit: one line naming the request and what is free, then the result. An actor no
    node of this fixed cluster holds (a GPU on the CPU-only instance): an error, not a hang."""
    import pytest

    from pipeline.core.actor_pool import ActorPool, ActorPoolConfig

    config = ActorPoolConfig(num_actors=1, cpus_per_actor=0.5, pending_warning_s=1.0)
    results = []
    with ActorPool(_Echo, config, 1) as pool:
        pool.run([1.6], lambda actor, unit: actor.work.remote(unit), 1, results.append)
    assert results == [1.6]
    out = capsys.readouterr().out
    assert "_Echo: no result for 1 s; each actor asks for CPU 0.5. The cluster has CPU " in out

    config = ActorPoolConfig(num_actors=1, gpus_per_actor=1, pending_warning_s=1.0)
    with ActorPool(_Echo, config, 1) as pool, pytest.raises(RuntimeError, match=(
            r"_Echo actors ask for CPU 1, GPU 1, more than any node of the cluster has \(its "
            r"live nodes: node \w+ \(CPU 4\)\)")):  # fmt: skip
        pool.run([0.1], lambda actor, unit: actor.work.remote(unit), 1, results.append)
