"""The encode stage: every image of RUN/shards/ to its code stack, RUN/codes/{shard}.parquet.

Per input shard: a CPU Ray task decodes the tar (centre crop to the model's resolution, and with
`views` > 1 that many augmented views of each train image: formats/views.py), and an encoder
actor, which loads the RQ-VAE once, encodes it in batches and writes the shard's Parquet file
in one atomic write. Each file records the stage fingerprint in its metadata, so
a resumed run skips exactly the shards finished under the same configuration; the manifest is
written last.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from pipeline.core.actor_pool import POOL_FIELDS, ActorPool, ActorPoolConfig
from pipeline.core.config import output_fields
from pipeline.core.devices import usable_device
from pipeline.core.lease import single_writer
from pipeline.core.manifest import Manifest, vae_fingerprint
from pipeline.core.progress import Progress
from pipeline.core.stage_folder import StageFolder
from pipeline.core.storage import Storage, StorageConfig, join, model_location, read_model_config
from pipeline.formats.codes_table import codes_table, to_parquet_bytes
from pipeline.formats.shard_tar import decode_shard
from pipeline.formats.views import VIEW_AUGMENTS

FORMAT_VERSION = 2  # 2: the tables' view column


@dataclass
class EncodeConfig(ActorPoolConfig):
    section: ClassVar[str] = "encode"
    execution_fields: ClassVar[tuple[str, ...]] = (
        *POOL_FIELDS,
        "vae",  # which model is in the upstream fingerprint; its path changes nothing
        "batch_size", "decode_cpus", "shards_in_flight", "storage",
    )  # fmt: skip

    vae: str | None = None  # an RQ-VAE model folder; default RUN/vae/model
    with_psnr: bool = False  # a psnr column: each image's reconstruction PSNR
    with_latents: bool = False  # a float16 latents column, for soft targets in train-ar
    # Code stacks per train image: view 0 its centre crop, views 1..N-1 drawn by `augment`
    # (crop_flip: ImageNet's; resized_crop_flip: FFHQ's; dalle: CC-3M's), seeded by
    # (view_seed, key, view); train-ar reads one view of each image per epoch. The val split
    # is encoded once (view 0).
    views: int = 1
    augment: str = "crop_flip"
    view_seed: int = 0
    # bfloat16: the encoder under bf16 autocast and bf16 candidate distances (exact re-rank).
    # Off by default: on the demo's trained RQ-VAE it moved codes (docs/benchmarks.md); on a
    # CPU without native bf16 the distances stay fp32 (model/quantizer.py warns).
    dtype: str = "float32"
    batch_size: int = 64
    decode_cpus: float = 0.5
    # Shards queued per encoder actor: the one it encodes and those decoding for it. 0: one
    # decode per CPU core the actors leave free (see shards_in_flight()), at most 16.
    shards_in_flight: int = 0
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"encode.dtype must be float32 or bfloat16, got {self.dtype!r}")
        if not 1 <= self.views <= 255:
            raise ValueError(f"encode.views must be in [1, 255], got {self.views}")
        if self.augment not in VIEW_AUGMENTS:
            raise ValueError(f"encode.augment={self.augment!r}: use one of {list(VIEW_AUGMENTS)}")
        if self.shards_in_flight < 0 or self.shards_in_flight == 1:
            raise ValueError(f"encode.shards_in_flight must be 0 (auto) or >= 2 (one encoding, "
                             f"one decoding), got {self.shards_in_flight}")  # fmt: skip


MAX_SHARDS_IN_FLIGHT = 16  # per actor: 16 decoded 512-image 256x256 shards are 1.6 GB


def shards_in_flight(config: EncodeConfig, actors: int, cluster_cpus: float) -> int:
    """Shards queued per encoder actor. A decode task is one core's work whatever decode_cpus
    says, and it is slow beside a GPU: a 512-image shard of 256x256 PNGs took a core 2.5 s to
    decode, where an H200 encodes it in a fraction of that. So a GPU actor needs one decode
    running for each core the actors leave free; on a CPU-only node (the demo: 2 cores, one
    actor of 1 CPU) that is one ahead, which is all the shared cores can use."""
    if config.shards_in_flight:
        return config.shards_in_flight
    free_cores = max(0, int(cluster_cpus - actors * config.cpus_per_actor))
    return max(2, min(MAX_SHARDS_IN_FLIGHT, 1 + free_cores // max(1, actors)))


class ShardEncoder:
    """Ray actor: one RQ-VAE per actor, loaded once, encoding whole shards."""

    def __init__(self, vae_uri: str, storage_config: StorageConfig, use_gpu: bool,
                 dtype: str = "float32") -> None:  # fmt: skip

        from model.rqvae import RQVAE

        self.storage = Storage(storage_config)
        self.device = str(usable_device("cuda" if use_gpu else "cpu"))
        self.model = RQVAE.from_pretrained(vae_uri, storage_options=self.storage.options(vae_uri))
        self.model.to(self.device)
        self.bf16 = dtype == "bfloat16"
        if self.bf16:
            self.model.quantizer.distance_dtype = "bfloat16"

    def encode(self, name: str, decoded: dict[str, Any], out_uri: str, config: EncodeConfig,
               vae_fingerprint: str, stage_fingerprint: str) -> dict[str, Any]:  # fmt: skip
        import torch

        from model.training import psnr_per_image

        images, with_psnr = decoded["images"], config.with_psnr
        codes, psnrs, latents = [], [], []
        for start in range(0, len(images), config.batch_size):
            x = torch.tensor(images[start : start + config.batch_size], device=self.device)
            x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, R, R) in [-1, 1]
            with torch.no_grad(), torch.autocast(x.device.type, torch.bfloat16, enabled=self.bf16):
                z = self.model.encode_latents(x).float()  # (B, h, w, C)
            batch_codes = self.model.quantizer.encode(z)  # (B, h, w, D)
            codes.append(batch_codes.cpu().numpy())
            if config.with_latents:
                latents.append(z.half().cpu().numpy())
            if with_psnr:
                recon = self.model.decode_codes(batch_codes)
                psnrs.append(psnr_per_image(recon, x).cpu().numpy())
        shape = self.model.config.code_shape
        stacked = np.concatenate(codes) if codes else np.zeros((0, *shape), np.int64)
        table = codes_table(decoded["keys"], decoded["labels"], decoded["captions"], stacked,
                            self.model.config.codebook_size, vae_fingerprint,
                            np.concatenate(psnrs) if with_psnr and psnrs else
                            (np.zeros(0, np.float32) if with_psnr else None),
                            np.concatenate(latents) if latents else None,
                            stage_fingerprint, decoded["views"])  # fmt: skip
        data = to_parquet_bytes(table)
        self.storage.write_bytes(out_uri, data)
        return {"name": name, "rows": len(table), "bytes": len(data)}


def _table_properties(shards: Manifest, config: EncodeConfig, vae_config: dict[str, Any],
                      vae_fp: str) -> dict[str, Any]:  # fmt: skip
    """What train-ar needs of the tables, known without reading them: from the RQ-VAE's config
    and the shard manifest's per-shard caption counts and largest label."""
    from model.rqvae import RQVAEConfig

    if not all("max_label" in u and "captioned" in u for u in shards.units):
        return {}  # shards of an older rqpipe: train-ar reads the tables instead
    model = RQVAEConfig.from_dict(vae_config)
    labels = [int(u.get("max_label", -1)) for u in shards.units]
    captioned = {u["name"].removesuffix(".tar"): int(u.get("captioned", 0)) for u in shards.units}
    train = [n for n in captioned if n.startswith("train-")]
    return {"code_shape": list(model.code_shape), "codebook_size": model.codebook_size,
            "vae_fingerprint": vae_fp, "num_classes": max(labels, default=-1) + 1,
            "captioned_images": sum(captioned.values()),
            "train_images": sum(int(u["rows"]) for u in shards.units
                                if u["name"].startswith("train-")),
            "train_captioned_images": sum(captioned[n] for n in train),
            "latents": config.with_latents, "views": config.views}  # fmt: skip


@single_writer("encode")
def run_encode_stage(run_dir: str, config: EncodeConfig, overwrite: bool = False) -> Manifest:
    import ray

    started = time.time()
    codes = StageFolder(run_dir, "encode", config.storage)
    storage, shards_dir = codes.storage, codes.of("shard").uri
    shards = codes.upstream("shard")
    # vae_uri for the actors, vae_files read here (a Hub model's copy in the HF cache)
    vae_uri, vae_files = model_location(config.vae or codes.run_path("vae", "model"))
    vae_config = read_model_config(storage, vae_files, "RQ-VAE",
                                   "run train-vae first or pass vae=URI")  # fmt: skip
    vae_fp = vae_fingerprint(storage, vae_files)
    planned = Manifest("encode", FORMAT_VERSION, output_fields(config),
                       {"shard": shards.fingerprint, "vae": vae_fp})  # fmt: skip
    if (finished := codes.begin(planned, overwrite)) is not None:
        return finished

    fp = planned.fingerprint
    resolution = vae_config["resolution"]
    names = [unit["name"].removesuffix(".tar") for unit in shards.units]
    rows_of = {unit["name"].removesuffix(".tar"): int(unit["rows"]) for unit in shards.units}

    def views_of(name: str) -> int:  # augmented views are for training: the val split gets one
        return config.views if name.startswith("train-") else 1

    listed = codes.finished_files()  # one listing: the tables a killed run finished
    results = {n: {"name": f"{n}.parquet", "rows": rows_of[n] * views_of(n),
                   "bytes": listed[f"{n}.parquet"]} for n in names if f"{n}.parquet" in listed}  # fmt: skip
    pending = [n for n in names if n not in results]
    progress = Progress("encode", len(pending), sum(rows_of[n] for n in pending))
    decode = ray.remote(decode_shard).options(num_cpus=config.decode_cpus,
                                              max_retries=config.max_retries)  # fmt: skip

    def encode(actor: Any, name: str) -> Any:
        decoded = decode.remote(join(shards_dir, f"{name}.tar"), resolution, config.storage,
                                views_of(name), config.augment, config.view_seed)  # fmt: skip
        return actor.encode.remote(name, decoded, codes.path(f"{name}.parquet"), config, vae_fp,
                                   fp)  # fmt: skip

    def done(result: dict[str, Any]) -> None:
        results[result["name"]] = {**result, "name": f"{result['name']}.parquet"}
        progress.update(result["rows"] // views_of(result["name"]))

    with ActorPool(ShardEncoder, config, len(pending), vae_uri, config.storage, config.use_gpu,
                   config.dtype) as pool:  # fmt: skip
        per_actor = shards_in_flight(config, len(pool), ray.cluster_resources().get("CPU", 1))
        print(f"encode: {len(names)} shards ({len(results)} already done, {len(pending)} to "
              f"encode) with {len(pool)} encoder actor(s), {per_actor} shards in flight each -> "
              f"{codes.uri}")  # fmt: skip
        pool.run(pending, encode, per_actor, done)

    planned.units = [results[n] for n in names]
    rows = sum(u["rows"] for u in planned.units)
    images = sum(u["rows"] // views_of(n) for n, u in zip(names, planned.units, strict=True))
    if images != shards.counts.get("ok", images) or rows != sum(
            rows_of[n] * views_of(n) for n in names):  # fmt: skip
        raise RuntimeError(f"encode: {rows} rows ({images} images) for {shards.counts['ok']} "
                           f"sharded images")  # fmt: skip
    planned.counts = {"rows": rows, "images": images, "views": config.views, "files": len(names)}
    planned.properties = _table_properties(shards, config, vae_config, vae_fp)
    codes.finish(planned)
    print(f"encode: {images:,} images ({rows:,} code stacks) in {len(names)} tables, "
          f"{time.time() - started:.1f} s")  # fmt: skip
    return planned
