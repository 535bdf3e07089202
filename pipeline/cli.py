"""The `rqpipe` command line."""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError, load_config

DEFAULT_DEMO_CONFIG = "configs/demo.yaml"


def _add_config_args(parser: argparse.ArgumentParser, default_config: str | None) -> None:
    parser.add_argument("--config", default=default_config, help="YAML preset (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. steps=200 loss.gan_weight=0")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rqpipe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the embedded default on the bundled demo data")
    demo.add_argument("--run-dir", default="runs/demo")
    demo.add_argument("--overwrite", action="store_true", help="retrain even if up to date")
    _add_config_args(demo, DEFAULT_DEMO_CONFIG)

    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from pipeline.demo import run_demo
            from pipeline.train_vae import TrainVAEConfig

            run_demo(args.run_dir, load_config(TrainVAEConfig, args.config, args.overrides),
                     overwrite=args.overwrite)  # fmt: skip
    except ConfigError as e:
        print(f"rqpipe: configuration error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
