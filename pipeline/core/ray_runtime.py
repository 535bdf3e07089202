"""Connecting to Ray: a cluster address, RAY_ADDRESS (set under `ray job submit`), or local."""

from __future__ import annotations

import os


def init_ray(address: str | None = None) -> None:
    """Join `address` (or RAY_ADDRESS); without either, start a local Ray instance."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # A fresh local instance, never someone else's cluster; no dashboard (1 GB, 10 s).
        ray.init(address="local", include_dashboard=False)
