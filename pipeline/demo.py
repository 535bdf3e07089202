"""The README's first command: the embedded default on the bundled demo dataset.

Until the distributed stages land (shard -> train-vae -> encode -> train-ar -> sample), the
demo trains the RQ-VAE in this process on the generated images and writes its artifacts in
the layout the stages use: RUN/vae/model/ (safetensors + config.json), RUN/vae/config.yaml
(the resolved config), RUN/vae/metrics.jsonl and RUN/vae/reconstructions.png.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import yaml

from model.rqvae import RQVAE
from pipeline.config import to_dict
from pipeline.demo_data import write_demo_dataset
from pipeline.images import load_rgb, to_model_tensor
from pipeline.vae_training import TrainVAEConfig, psnr, reconstruction_grid, train_vae_in_memory


def run_demo(run_dir: str, config: TrainVAEConfig, overwrite: bool = False) -> dict[str, str]:
    run = Path(run_dir)
    started = time.time()
    paths = write_demo_dataset(run / "demo-data")
    print(f"demo data: {len(paths)} images in {len(set(p.parent for p in paths))} classes "
          f"under {run / 'demo-data'}")  # fmt: skip

    resolution = config.model_config().resolution
    images = to_model_tensor(np.stack([load_rgb(p, resolution) for p in paths]))
    val_mask = np.arange(len(paths)) % 16 == 0  # every 16th image held out, all classes
    train, val = images[~val_mask], images[val_mask]

    vae_dir = run / "vae"
    model_dir, config_path = vae_dir / "model", vae_dir / "config.yaml"
    resolved = yaml.safe_dump({TrainVAEConfig.section: to_dict(config)}, sort_keys=True)
    up_to_date = (
        (model_dir / "config.json").exists()
        and config_path.exists()
        and (config_path.read_text() == resolved)
    )
    if up_to_date and not overwrite:
        model = RQVAE.from_pretrained(str(model_dir))
        print(f"train-vae: up to date ({model_dir})")
    else:
        if (model_dir / "config.json").exists() and not overwrite:
            raise SystemExit(
                f"{model_dir} was trained with another config; pass --overwrite to retrain "
                f"(the old model is replaced) or use another --run-dir"
            )
        print(f"train-vae: {config.steps} steps, batch {config.batch_size}, "
              f"{len(train)} train / {len(val)} val images at {resolution}px")  # fmt: skip
        (vae_dir / "metrics.jsonl").unlink(missing_ok=True)
        model = train_vae_in_memory(config, train, val, vae_dir)
        model.save_pretrained(str(model_dir))
        config_path.write_text(resolved)  # last: marks the model as complete for this config

    grid = vae_dir / "reconstructions.png"
    reconstruction_grid(model, val[:: max(1, len(val) // 16)][:16], str(grid))
    print(f"validation PSNR {psnr(model, val):.2f} dB; demo finished in "
          f"{time.time() - started:.0f} s")  # fmt: skip
    print(f"  model:           {model_dir}")
    print(f"  metrics:         {vae_dir / 'metrics.jsonl'}")
    print(f"  reconstructions: {grid}  (top: originals; rows below: depth 1..D)")
    return {"model": str(model_dir), "reconstructions": str(grid)}
