"""The `rqpipe` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

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


def _analysis(args: argparse.Namespace) -> int:
    import json

    from pipeline import analysis
    from pipeline.storage import Storage, StorageConfig

    storage = Storage(StorageConfig(endpoint_url=args.endpoint_url))
    if args.command == "stats":
        report = analysis.code_stats(analysis.read_codes(storage, args.codes), top=args.top)
        if args.plot:
            analysis.plot_usage(report, args.plot, storage)
        for depth in report["depths"]:
            depth.pop("counts")
        print(json.dumps(report, indent=2) if args.json else analysis.format_stats(report))
    elif args.command == "query":
        print(analysis.query(storage, args.sql, args.codes).to_pandas().to_string(index=False))
    else:
        from PIL import Image

        from pipeline.visualize import save_png

        pixels = analysis.decode_key(storage, args.codes, args.key, args.depth, args.vae)
        save_png(Image.fromarray(pixels), args.out, storage.options(args.out))
        print(
            f"wrote {args.out} ({pixels.shape[1]}x{pixels.shape[0]}, depth {args.depth or 'all'})"
        )
    return 0


def _stage(command: str) -> tuple[type, Callable[..., Any]]:
    """A stage command's config class and run function (imported late: torch is slow)."""
    if command == "shard":
        from pipeline.shard import ShardConfig, run_shard_stage

        return ShardConfig, run_shard_stage
    if command == "train-vae":
        from pipeline.train_vae import run_train_vae_stage
        from pipeline.vae_training import TrainVAEConfig

        return TrainVAEConfig, run_train_vae_stage
    if command == "encode":
        from pipeline.encode import EncodeConfig, run_encode_stage

        return EncodeConfig, run_encode_stage
    if command == "train-ar":
        from pipeline.train_ar import TrainARConfig, run_train_ar_stage

        return TrainARConfig, run_train_ar_stage
    from pipeline.sample import SampleConfig, run_sample_stage

    return SampleConfig, run_sample_stage


SAMPLE_FLAGS = ("num_samples", "labels", "temperature", "top_k", "top_p", "cfg_scale", "seed")


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """The sample command's flags as config overrides (flags win over --config and key=value)."""
    values = {name: getattr(args, name, None) for name in SAMPLE_FLAGS}
    return [f"{name}={json.dumps(value)}" for name, value in values.items() if value is not None]


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

    encode = commands.add_parser("encode", help="encode RUN/shards into Parquet code tables")
    _add_stage_args(encode)

    train_ar = commands.add_parser(
        "train-ar", help="train the RQ-Transformer on RUN/codes with Ray Train"
    )
    _add_stage_args(train_ar)

    sample = commands.add_parser("sample", help="generate images with RUN/ar/model + RUN/vae/model")
    sample.add_argument("--num-samples", type=int, help="images to generate")
    sample.add_argument("--labels", nargs="+", help="class indices or names (default: all)")
    sample.add_argument("--temperature", type=float)
    sample.add_argument("--top-k", type=int)
    sample.add_argument("--top-p", type=float)
    sample.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale")
    sample.add_argument("--seed", type=int, help="same seed, same images")
    _add_stage_args(sample)

    stats = commands.add_parser("stats", help="code usage, perplexity, duplicates of code tables")
    stats.add_argument("codes", help="RUN/codes (a folder or prefix of tables) or one .parquet")
    stats.add_argument("--top", type=int, default=10, help="most frequent codes to list")
    stats.add_argument("--plot", help="write per-depth usage histograms to this PNG")
    stats.add_argument("--json", action="store_true", help="print the report as JSON")

    query = commands.add_parser("query", help="DuckDB SQL over code tables (a view named codes)")
    query.add_argument("sql", help='e.g. "SELECT label, count(*) FROM codes GROUP BY label"')
    query.add_argument("codes", help="RUN/codes or one .parquet")

    decode = commands.add_parser("decode", help="an image back from a stored code stack")
    decode.add_argument("codes", help="RUN/codes or one .parquet")
    decode.add_argument("--key", required=True)
    decode.add_argument("--depth", type=int, default=None, help="first d codes only (coarse)")
    decode.add_argument("--out", required=True, help="PNG to write")
    decode.add_argument("--vae", default=None, help="RQ-VAE folder (default RUN/vae/model)")

    for sub in (stats, query, decode):
        sub.add_argument("--endpoint-url", default=None,
                         help="S3 endpoint (default: AWS_ENDPOINT_URL or AWS)")  # fmt: skip

    args = parser.parse_args(argv)
    try:
        if args.command in ("stats", "query", "decode"):
            return _analysis(args)
        if args.command == "demo":
            from pipeline.demo import run_demo
            from pipeline.vae_training import TrainVAEConfig

            run_demo(args.run_dir, load_config(TrainVAEConfig, args.config, args.overrides),
                     overwrite=args.overwrite)  # fmt: skip
            return 0
        config_class, run_stage = _stage(args.command)
        overrides = [*args.overrides, *_flag_overrides(args)]
        config = load_config(config_class, args.config, overrides)
        from pipeline.ray_runtime import init_ray

        init_ray(args.ray_address)
        if args.command == "shard":
            run_stage(args.input, args.run_dir, config, overwrite=args.overwrite)
        else:
            run_stage(args.run_dir, config, overwrite=args.overwrite)
    except ConfigError as e:
        print(f"rqpipe: configuration error: {e}", file=sys.stderr)
        return 2
    except (StageConflict, FileNotFoundError, ValueError, KeyError) as e:
        print(f"rqpipe {args.command}: {redact(str(e))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
