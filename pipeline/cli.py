"""The `rqpipe` command line."""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, load_config
from pipeline.manifest import StageConflict
from pipeline.storage import redact

DEFAULT_DEMO_CONFIG = "configs/demo.yaml"


def _add_config_args(parser: argparse.ArgumentParser, default_config: str | None) -> None:
    parser.add_argument("--config", default=default_config, help="YAML preset (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. steps=200 loss.gan_weight=0")  # fmt: skip


def _add_stage_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, help="run root: a local path or s3://...")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace this stage's output if it was made with another config")  # fmt: skip
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster to join (default: RAY_ADDRESS, else a local instance)")  # fmt: skip
    _add_config_args(parser, None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rqpipe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the embedded default on the bundled demo data")
    demo.add_argument("--run-dir", default="runs/demo")
    demo.add_argument("--overwrite", action="store_true", help="retrain even if up to date")
    _add_config_args(demo, DEFAULT_DEMO_CONFIG)

    shard = commands.add_parser("shard", help="image files / listing / tars -> WebDataset shards")
    shard.add_argument("--input", required=True,
                       help="folder or prefix of images (class sub-folders -> labels), a CSV or "
                            "Parquet listing (path, label, caption), or WebDataset tars")  # fmt: skip
    _add_stage_args(shard)

    train_vae = commands.add_parser(
        "train-vae", help="train the RQ-VAE on RUN/shards with Ray Train"
    )
    _add_stage_args(train_vae)

    args = parser.parse_args(argv)
    try:
        if args.command == "train-vae":
            from pipeline.ray_runtime import init_ray
            from pipeline.train_vae import run_train_vae_stage
            from pipeline.vae_training import TrainVAEConfig

            config = load_config(TrainVAEConfig, args.config, args.overrides)
            init_ray(args.ray_address)
            run_train_vae_stage(args.run_dir, config, overwrite=args.overwrite)
        elif args.command == "shard":
            from pipeline.ray_runtime import init_ray
            from pipeline.shard import ShardConfig, run_shard_stage

            config = load_config(ShardConfig, args.config, args.overrides)
            init_ray(args.ray_address)
            run_shard_stage(args.input, args.run_dir, config, overwrite=args.overwrite)
        elif args.command == "demo":
            from pipeline.demo import run_demo
            from pipeline.vae_training import TrainVAEConfig

            run_demo(args.run_dir, load_config(TrainVAEConfig, args.config, args.overrides),
                     overwrite=args.overwrite)  # fmt: skip
    except ConfigError as e:
        print(f"rqpipe: configuration error: {e}", file=sys.stderr)
        return 2
    except (StageConflict, FileNotFoundError, ValueError) as e:
        print(f"rqpipe {args.command}: {redact(str(e))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
