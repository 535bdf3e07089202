"""Connecting to Ray: a cluster address, RAY_ADDRESS (set under `ray job submit`), or local.

The console shows rqpipe's lines and real errors; Ray's own chatter goes to its log files
(`/tmp/ray/session_latest/logs/` on the node that runs the driver, or the job's logs in the
dashboard):
- Ray's Python loggers, in the driver and every worker, at WARNING; Ray Train's own logger too
  (`train_driver.train_run_config`), so "Requesting resources", "Checkpoint successfully created" and the
  like stay in the files; on a local instance Ray Data's as well (`RAY_DATA_LOG_LEVEL`);
- Ray Data's errors off the console (`_ray_data_console_without_errors`): a failed dataset's
  exception reaches the stage, which reports it once;
- Ray Data's progress bars off: the training datasets stream endlessly, so their per-epoch
  bars are noise (the stages print their own progress);
- a local instance runs a dashboard on 127.0.0.1: Ray Train's placement-group cleaner asks the
  state API (served by the dashboard) whether the controller lives, and without one it warns
  every few seconds ("Failed to query Ray Train Controller actor state"). It also turns off
  Ray Train's preemption watcher, which nothing preempts on one machine and whose actor makes
  the core worker log an error-looking line, and DeprecationWarnings raised inside Ray.
"""

from __future__ import annotations

import logging
import os


def init_ray(address: str | None = None) -> bool:
    """Join `address` (or RAY_ADDRESS); without either, start a local Ray instance (-> True:
    the cluster is this machine, fixed, and its one node is what the stages may use)."""
    import ray
    from ray.data import DataContext

    _ray_data_console_without_errors()
    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.WARNING,
             "logging_config": ray.LoggingConfig(log_level="WARNING")}  # fmt: skip
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, **quiet)
    else:
        # A fresh local instance, never someone else's cluster.
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")  # also "Progress bars disabled"
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
                 runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                                           "RAY_DATA_LOG_LEVEL": "ERROR",
                                           "PYTHONWARNINGS": "ignore::DeprecationWarning"}},
                 **quiet)  # fmt: skip
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    return not address


def _ray_data_console_without_errors() -> None:
    """Ray Data logs a failed dataset's exception to the driver's console (ERROR, with its
    stack traces), then raises it to the stage, which reports it: an unreachable endpoint as
    the CLI's one line, anything else as a traceback. So its console handler drops ERROR
    records here; its log file (`logs/ray-data/` of the session) keeps them, and its warnings
    still show. The fault soak found a store outage during shard printing 200 lines."""
    import ray.data  # noqa: F401  (configures Ray Data's loggers)
    from ray.data._internal.logging import SessionFileHandler

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, SessionFileHandler) and not hasattr(handler, "rqpipe"):
            handler.addFilter(lambda record: record.levelno < logging.ERROR)
            handler.rqpipe = True  # once a process
