"""The sample stage's Ray actor: an RQ-Transformer and its RQ-VAE loaded once, turning chunks of
the request into PNGs and a code table; and the keys and seeds that make a chunk's output the
same whichever actor draws it."""

from __future__ import annotations

import hashlib
import io
import time
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from pipeline.core.devices import usable_device
from pipeline.core.storage import Storage, StorageConfig, join
from pipeline.formats.codes_table import codes_table, to_parquet_bytes

if TYPE_CHECKING:
    from pipeline.stages.sample import SampleConfig


def sample_key(index: int) -> str:
    return f"sample-{index:06d}"


def chunk_seed(seed: int, chunk: int) -> int:
    """Independent, reproducible seeds per chunk (not seed + chunk: runs with neighbouring
    seeds would share chunks)."""
    digest = hashlib.sha256(f"{seed}/{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class ChunkSampler:
    """Ray actor: an RQ-Transformer and its RQ-VAE, loaded once, turning chunks into images."""

    def __init__(self, ar_uri: str, vae_uri: str, storage_config: StorageConfig,
                 use_gpu: bool, rejection: tuple[str, str] | None = None) -> None:  # fmt: skip
        import torch

        from model.rqtransformer import RQTransformer
        from model.rqvae import RQVAE

        self.storage = Storage(storage_config)
        self.device = str(usable_device("cuda" if use_gpu else "cpu"))
        self.ar = RQTransformer.from_pretrained(ar_uri, self.device,
                                                storage_options=self.storage.options(ar_uri))  # fmt: skip
        self.vae = RQVAE.from_pretrained(vae_uri, self.device,
                                         storage_options=self.storage.options(vae_uri))  # fmt: skip
        books = self.vae.quantizer.codebooks
        embeddings = self.ar.code_embeddings
        if embeddings.shape != books.shape or not torch.equal(embeddings, books.float()):
            raise ValueError(f"the RQ-Transformer at {ar_uri} was trained on another codebook "
                             f"than the RQ-VAE at {vae_uri} has: pass the VAE it was trained "
                             f"with (vae=URI)")  # fmt: skip
        self.ar.eval()
        self.vae.eval()
        self.classifier = None
        if rejection is not None:  # (checkpoint path, architecture)
            from model.evaluation.resnet import load_resnet

            self.classifier = load_resnet(*rejection).to(self.device)

    def sample(self, chunk: int, first: int, labels: list[int] | None, count: int,
               config: SampleConfig, out_dir: str, vae_fp: str, stage_fp: str,
               prompts: list[tuple[str, list[int]]] | None = None) -> dict[str, Any]:  # fmt: skip
        """prompts: (caption, token ids) per sample, for a caption model (labels None)."""
        import torch

        from pipeline.formats.images import to_uint8

        started = time.time()
        generator = torch.Generator(self.device).manual_seed(chunk_seed(config.seed, chunk))
        text = torch.tensor([ids for _, ids in prompts], device=self.device) if prompts else None
        rounds = round(1 / config.acceptance_rate) if self.classifier is not None else 1
        best = None
        for _ in range(rounds):  # rejection sampling: the best of `rounds` candidates a slot
            with torch.no_grad():
                codes = self.ar.generate(
                    num_samples=None if labels or prompts else count, labels=labels,
                    temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                    cfg_scale=config.cfg_scale, generator=generator, text=text,
                    static=None if config.cuda_graphs else False,  # None: graphs on CUDA only
                )  # (B, H, W, D)  # fmt: skip
                images = to_uint8(self.vae.decode_codes(codes))  # (B, R, R, 3)
                if rounds == 1:
                    break
                pixels = torch.from_numpy(images).permute(0, 3, 1, 2).to(self.device)
                target = torch.tensor(labels, device=self.device)
                score = self.classifier(pixels).log_softmax(1).gather(1, target[:, None])[:, 0]
            if best is None:
                best = (codes, images, score)
            else:
                better = score > best[2]  # (B,)
                best = (torch.where(better[:, None, None, None], codes, best[0]),
                        np.where(better.cpu().numpy()[:, None, None, None], images, best[1]),
                        torch.maximum(score, best[2]))  # fmt: skip
        if best is not None:
            codes, images = best[0], best[1]
        seconds = time.time() - started
        keys = [sample_key(first + i) for i in range(count)]
        for key, pixels in zip(keys, images, strict=True):
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            self.storage.write_bytes(join(out_dir, "images", f"{key}.png"), buffer.getvalue())
        captions = [caption for caption, _ in prompts] if prompts else [None] * count
        table = codes_table(keys, labels or [None] * count, captions, codes.cpu().numpy(),
                            self.ar.config.codebook_size, vae_fp, stage_fingerprint=stage_fp)  # fmt: skip
        data = to_parquet_bytes(table)  # last: a finished chunk is one whose table exists
        name = f"chunk-{chunk:05d}.parquet"
        self.storage.write_bytes(join(out_dir, "codes", name), data)
        return {"chunk": chunk, "name": name, "rows": count, "bytes": len(data),
                "seconds": seconds, "device": self.device, "candidates": count * rounds}  # fmt: skip
