"""train-vae's data: the streaming Ray Dataset of decoded, augmented training images, and the
held-out images every checkpoint reconstructs."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pipeline.core.storage import Storage
from pipeline.core.training import epoch_file_order, read_blocks

# decode_batch runs in Ray Data's workers: from a torch-free module, they start without torch
from pipeline.formats.shard_tar import (
    AUGMENT_SEED,
    decode_batch,
    image_member,
    iter_tar,
    random_square,
)

if TYPE_CHECKING:
    from pipeline.stages.train_vae import TrainVAEConfig


def _split_tars(storage: Storage, shards_dir: str, split: str) -> list[str]:
    return [uri for uri, _ in storage.list_files(shards_dir)
            if uri.rsplit("/", 1)[-1].startswith(f"{split}-") and uri.endswith(".tar")]  # fmt: skip


def train_dataset(storage: Storage, shards_dir: str, config: TrainVAEConfig, resolution: int):
    """Streaming Ray Dataset of decoded, augmented training images; decoding in CPU tasks.
    Its file order and every image's crop and flip are drawn from the seed and the epoch
    (Ray Data reseeds both per execution; a resume starts at its checkpoint's epoch:
    core/training.py); with the order kept (`ordered_data_config`) one config trains one
    model, resumed or not."""
    import ray
    from ray.data.expressions import random

    tars = _split_tars(storage, shards_dir, "train")
    if not tars:
        raise FileNotFoundError(f"no train-*.tar shards in {shards_dir}")
    filesystem, _ = storage.arrow_fs(shards_dir)
    paths = [storage.arrow_fs(uri)[1] for uri in tars]
    dataset = ray.data.read_webdataset(paths, filesystem=filesystem, decoder=None,
                                       file_extensions=["tar"],
                                       override_num_blocks=read_blocks(len(paths)),
                                       shuffle=epoch_file_order(config.seed))  # fmt: skip
    dataset = dataset.with_column(AUGMENT_SEED, random(seed=config.seed,
                                                       reseed_after_execution=True))  # fmt: skip
    return dataset.map_batches(
        decode_batch,
        fn_kwargs={"resolution": resolution, "random_flip": config.random_flip},
        batch_size=64,
        num_cpus=config.decode_cpus,
    )


def validation_images(storage: Storage, shards_dir: str, resolution: int, count: int) -> np.ndarray:
    """Up to `count` held-out images (val shards; the first train shard if there are none)."""
    tars = _split_tars(storage, shards_dir, "val") or _split_tars(storage, shards_dir, "train")[:1]
    images, rng = [], np.random.default_rng(0)
    for uri in tars:
        for _, parts in iter_tar(storage.read_bytes(uri)):
            data = image_member(parts)
            if data is not None:
                with Image.open(io.BytesIO(data)) as image:
                    images.append(random_square(image.convert("RGB"), resolution, rng))
            if len(images) >= count:
                return np.stack(images)
    return np.stack(images)
