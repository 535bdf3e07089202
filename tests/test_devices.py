"""What a GPU means on a node that only declares one (pipeline/core/devices.py). The stages on
such GPUs run in the fault soak (tests/test_pipeline_e2e.py), on a cluster under Ray's own
autoscaler and on a fixed one."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.devices import CPU_FOR_DECLARED_GPUS, train_backend, usable_device


def test_a_declared_gpu_runs_on_the_cpu_only_when_the_cluster_says_so(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: every GPU is usable")
    monkeypatch.delenv(CPU_FOR_DECLARED_GPUS, raising=False)
    assert usable_device("cpu") == torch.device("cpu") and train_backend(True) is None
    with pytest.raises(RuntimeError, match=f"sees no CUDA device.*{CPU_FOR_DECLARED_GPUS}=1"):
        usable_device("cuda:0")
    monkeypatch.setenv(CPU_FOR_DECLARED_GPUS, "1")
    assert usable_device("cuda:0") == torch.device("cpu")
    assert train_backend(True) == "gloo" and train_backend(False) is None
