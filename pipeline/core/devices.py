"""The torch device a Train worker or an actor computes on, and the one case where a GPU that
Ray hands out is not a CUDA device.

Ray hands out GPUs as resources; on a GPU node each comes with a CUDA device. A node can also
declare GPUs it does not have: the autoscaler's fake multi-node provider (bench/fake_cluster.py,
the fault soak's reference run), or `ray start --num-gpus=2` on a CPU host to try a GPU recipe's
requests before paying for GPUs. With RQPIPE_CPU_FOR_DECLARED_GPUS=1 in the environment of the
cluster's nodes and of the driver, a stage given such a GPU computes on the CPU, and Train
workers join through gloo instead of NCCL. Without it, a GPU given to a process whose torch sees
no CUDA device stops the stage: a CPU build of torch or a broken driver on a GPU node would
otherwise train on the CPU unnoticed, for days.
"""

from __future__ import annotations

import os
from typing import Any

CPU_FOR_DECLARED_GPUS = "RQPIPE_CPU_FOR_DECLARED_GPUS"


def cpu_for_declared_gpus() -> bool:
    """Whether GPUs that Ray hands out without a CUDA device run on the CPU (see above)."""
    return os.environ.get(CPU_FOR_DECLARED_GPUS) == "1"


def usable_device(device: Any) -> Any:
    """`device` (a torch.device or its name), or the CPU where it is a CUDA device this process
    has none of and RQPIPE_CPU_FOR_DECLARED_GPUS=1; a RuntimeError naming both ways out when
    it is a CUDA device this process has none of otherwise."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or torch.cuda.is_available():
        return device
    if cpu_for_declared_gpus():
        return torch.device("cpu")
    raise RuntimeError(f"Ray gave this process a GPU, but torch {torch.__version__} sees no CUDA "
                       f"device on this node: install a CUDA build of torch and check the "
                       f"driver (nvidia-smi), or, for a cluster whose GPUs are only declared (a "
                       f"dry run on CPUs), set {CPU_FOR_DECLARED_GPUS}=1 on its nodes and the "
                       f"driver")  # fmt: skip


def train_backend(use_gpu: bool) -> str | None:
    """Ray Train's process-group backend: its own choice (NCCL with GPUs), or gloo where the
    GPUs are declared ones that run on the CPU."""
    return "gloo" if use_gpu and cpu_for_declared_gpus() else None
