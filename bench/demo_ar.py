"""The demo's class check against train-ar settings, without Ray: what makes samples right.

Takes a finished demo run (its code tables, RQ-VAE and labels), trains the `tiny`
RQ-Transformer with the stage's own step (model/training.py ar_train_step, batches drawn
uniformly from all rows) for each variant, samples 128 images (32 per class, fixed seed),
decodes them with the run's RQ-VAE and scores them with the demo's class check
(pipeline/demo/check.py). Figures only.

    .venv/bin/python bench/demo_ar.py runs/demo '{}' '{"steps": 1000}' '{"lr": 2e-3}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.rqtransformer import RQTransformer
from model.rqvae import RQVAE
from model.training import ar_train_step, build_optimizer
from pipeline.core.config import load_config
from pipeline.demo.check import train_classifier
from pipeline.demo.data import DEMO_CLASSES
from pipeline.formats.codes_table import table_to_arrays
from pipeline.stages.train_ar import TrainARConfig

REPO = Path(__file__).resolve().parents[1]
SAMPLINGS = {"top-k 16, cfg 3": dict(top_k=16, cfg_scale=3.0),
             "top-k 4, cfg 3": dict(top_k=4, cfg_scale=3.0)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a finished demo run dir (runs/demo)")
    parser.add_argument("variants", nargs="+", help="JSON train_ar overrides per variant")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    vae = RQVAE.from_pretrained(str(run / "vae" / "model")).eval()
    names = json.loads((run / "shards" / "labels.json").read_text())  # class name -> label
    name_of = {index: name for name, index in names.items()}
    rows = table_to_arrays(pq.read_table(run / "codes", columns=["codes", "label"]),
                           list(vae.config.code_shape), len(names))  # fmt: skip
    codes, labels = torch.tensor(rows["codes"]).long(), torch.tensor(rows["label"])
    classifier, _ = train_classifier(vae.config.resolution)

    def class_check(model: RQTransformer, **sampling) -> float:
        wanted = torch.arange(128) % len(names)
        sampled = model.generate(labels=wanted, generator=torch.Generator().manual_seed(0),
                                 **sampling)  # fmt: skip
        with torch.no_grad():
            predicted = classifier(vae.decode_codes(sampled).clamp(-1, 1)).argmax(1)
        target = torch.tensor([DEMO_CLASSES.index(name_of[int(x)]) for x in wanted])
        return (predicted == target).float().mean().item()

    print("| train_ar overrides | steps x batch | train loss | "
          + " | ".join(SAMPLINGS) + " | seconds |")  # fmt: skip
    print("|---|---|---|" + "---|" * len(SAMPLINGS) + "---|")
    for spec in args.variants:
        overrides = [f"{k}={json.dumps(v)}" for k, v in json.loads(spec).items()]
        config = load_config(TrainARConfig, str(REPO / "configs" / "demo.yaml"), overrides)
        torch.manual_seed(config.seed)
        model = RQTransformer(config.model_config(list(vae.config.code_shape),
                                                  vae.config.codebook_size, len(names)),
                              vae.quantizer.codebooks.clone())  # fmt: skip
        optimizer = build_optimizer(model, config)
        g, started = torch.Generator().manual_seed(0), time.time()
        for step in range(config.steps):
            pick = torch.randint(len(codes), (config.batch_size,), generator=g)
            batch = {"codes": codes[pick], "label": labels[pick]}
            terms = ar_train_step(model, optimizer, [batch], step, config, "class", None)
        seconds = time.time() - started
        model.eval()
        checks = " | ".join(f"{class_check(model, **s):.0%}" for s in SAMPLINGS.values())
        print(f"| `{spec}` | {config.steps} x {config.batch_size} | {terms['loss']:.3f} | "
              f"{checks} | {seconds:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
