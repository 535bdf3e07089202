"""The `rqpipe` command line."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.core.config import ConfigError, load_config
from pipeline.core.lease import StageBusy
from pipeline.core.manifest import StageConflict
from pipeline.core.storage import Storage, StorageConfig, redact, unreachable_endpoint

DEFAULT_DEMO_CONFIG = "configs/demo.yaml"


STAGE_OVERRIDES_HELP = "config overrides, e.g. steps=200 loss.gan_weight=0"
RUN_OVERRIDES_HELP = ("config overrides prefixed by their stage's section, e.g. "
                      "train_vae.steps=200 sample.num_samples=16 storage.endpoint_url=URL")  # fmt: skip


def _add_config_args(parser: argparse.ArgumentParser, default_config: str | None,
                     overrides_help: str = STAGE_OVERRIDES_HELP) -> None:  # fmt: skip
    parser.add_argument("--config", default=default_config, help="YAML preset (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)


def _add_stage_args(parser: argparse.ArgumentParser,
                    overrides_help: str = STAGE_OVERRIDES_HELP) -> None:  # fmt: skip
    parser.add_argument("--run-dir", required=True, help="run root: a local path or s3://...")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace this stage's output if it was made with another config")  # fmt: skip
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster to join (default: RAY_ADDRESS, else a local instance)")  # fmt: skip
    parser.add_argument("--cluster", default=None, metavar="YAML",
                        help="a Ray cluster YAML or KubeRay manifest (cluster/aws.yaml): refuse, "
                             "before anything runs, a request none of its node types holds")  # fmt: skip
    _add_config_args(parser, None, overrides_help)


def _join_cluster(plan: list, args: argparse.Namespace) -> None:
    """Check the plan against --cluster's node types, join Ray, check it against the cluster's."""
    from pipeline.core.ray_runtime import init_ray
    from pipeline.run import check_cluster

    if args.cluster:
        check_cluster(plan, args.cluster)
    started_here = init_ray(args.ray_address)
    if not args.cluster:
        check_cluster(plan, started_here=started_here)


def _analysis(args: argparse.Namespace) -> int:
    import json

    from pipeline.core.storage import Storage, StorageConfig
    from pipeline.tools import analysis

    storage = Storage(StorageConfig(endpoint_url=args.endpoint_url))
    if args.command == "stats":
        report = analysis.code_stats(analysis.read_codes(storage, args.codes), top=args.top)
        if args.plot:
            analysis.plot_usage(report, args.plot, storage)
        for depth in report["depths"]:
            depth.pop("counts")
        print(json.dumps(report, indent=2) if args.json else analysis.format_stats(report))
    elif args.command == "query":
        if args.codes.lstrip().upper().startswith(SQL_WORDS):
            raise ValueError(f"the tables come first, then the SQL: rqpipe query RUN "
                             f"{json.dumps(args.codes)}")  # fmt: skip
        print(analysis.query(storage, args.codes, args.sql).to_pandas().to_string(index=False))
    else:
        from PIL import Image

        from pipeline.formats.images import save_png

        pixels = analysis.decode_key(storage, args.codes, args.key, args.depth, args.vae)
        save_png(Image.fromarray(pixels), args.out, storage.options(args.out))
        print(
            f"wrote {args.out} ({pixels.shape[1]}x{pixels.shape[0]}, depth {args.depth or 'all'})"
        )
    return 0


SQL_WORDS = ("SELECT", "WITH", "FROM", "DESCRIBE", "SUMMARIZE", "PIVOT")
SAMPLE_FLAGS = ("num_samples", "labels", "prompts", "prompts_file", "temperature", "top_k",
                "top_p", "cfg_scale", "seed")  # fmt: skip


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """The sample command's flags as config overrides (flags win over --config and key=value)."""
    values = {name: getattr(args, name, None) for name in SAMPLE_FLAGS}
    return [f"{name}={json.dumps(value)}" for name, value in values.items() if value is not None]


def _configured_storage(args: argparse.Namespace) -> Storage:
    """The storage settings given on the command line (for naming the endpoint in errors)."""
    for item in getattr(args, "overrides", []):
        key, _, value = item.partition("=")
        if key == "storage.endpoint_url" or key.endswith(".storage.endpoint_url"):
            return Storage(StorageConfig(endpoint_url=value))
    return Storage()


def _print_unreachable(command: str, endpoint: str, error: BaseException) -> None:
    """One clear message instead of a Ray task traceback ending in a socket error."""
    detail = redact(str(error)).strip().splitlines()
    print(f"rqpipe {command}: cannot reach the object store at {endpoint} "
          f"({type(error).__name__}; last line: {detail[-1] if detail else ''}).\n"
          f"Check that the endpoint is up and that AWS_ENDPOINT_URL / storage.endpoint_url "
          f"point at it, then run the same command again: finished work is kept and the "
          f"stage resumes.", file=sys.stderr)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rqpipe", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="the whole pipeline on the bundled demo dataset")
    demo.add_argument("--run-dir", default="runs/demo")
    demo.add_argument("--overwrite", action="store_true",
                      help="redo stages whose output was made with another config")  # fmt: skip
    demo.add_argument("--ray-address", default=None, help="Ray cluster (default: local)")
    _add_config_args(demo, DEFAULT_DEMO_CONFIG, RUN_OVERRIDES_HELP)

    run = commands.add_parser(
        "run", help="shard -> train-vae -> encode -> train-ar -> sample -> evaluate"
    )
    run.add_argument("--input", required=True, help="as for `rqpipe shard --input`")
    _add_stage_args(run, RUN_OVERRIDES_HELP)

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
    sample.add_argument("--prompt", dest="prompts", action="append",
                        help="a caption, for a text-conditioned model (repeatable; cycled)")  # fmt: skip
    sample.add_argument("--prompts-file",
                        help="prompts one a line, or a CSV/Parquet file's prompts_column")  # fmt: skip
    sample.add_argument("--temperature", type=float)
    sample.add_argument("--top-k", type=int)
    sample.add_argument("--top-p", type=float)
    sample.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale")
    sample.add_argument("--seed", type=int, help="same seed, same images")
    _add_stage_args(sample)

    evaluate = commands.add_parser(
        "evaluate", help="rFID, PSNR/SSIM/LPIPS, FID, IS, precision/recall of a run, in RUN/eval"
    )
    _add_stage_args(evaluate)

    tables_help = "a run dir, its codes/ folder, or one .parquet code table"
    stats = commands.add_parser("stats", help="code usage, perplexity, duplicates of code tables")
    stats.add_argument("codes", help=tables_help)
    stats.add_argument("--top", type=int, default=10, help="most frequent codes to list")
    stats.add_argument("--plot", help="write per-depth usage histograms to this PNG")
    stats.add_argument("--json", action="store_true", help="print the report as JSON")

    query = commands.add_parser("query", help="DuckDB SQL over code tables (a view named codes)")
    query.add_argument("codes", help=tables_help)
    query.add_argument("sql", help='e.g. "SELECT label, count(*) FROM codes GROUP BY label"')

    decode = commands.add_parser("decode", help="an image back from a stored code stack")
    decode.add_argument("codes", help=tables_help)
    decode.add_argument("--key", required=True)
    decode.add_argument("--depth", type=int, default=None, help="first d codes only (coarse)")
    decode.add_argument("--out", required=True, help="PNG to write")
    decode.add_argument(
        "--vae", default=None, help="RQ-VAE folder or hf://org/name (default RUN/vae/model)"
    )

    lpips = commands.add_parser(
        "convert-lpips", help="build the perceptual loss's weights file (LPIPS-VGG16)"
    )
    lpips.add_argument("--vgg16", required=True,
                       help="torchvision's VGG16 ImageNet weights (vgg16-397923af.pth)")  # fmt: skip
    lpips.add_argument("--heads", default=None,
                       help="the lpips package's weights/v0.1/vgg.pth (default: from the "
                            "installed lpips package)")  # fmt: skip
    lpips.add_argument("--out", required=True, help="the .safetensors file to write")

    imported = commands.add_parser(
        "import-official", help="an official RQ-VAE / RQ-Transformer checkpoint -> a model folder"
    )
    imported.add_argument("--kind", required=True, choices=["rqvae", "rqtransformer"])
    imported.add_argument("--checkpoint", required=True, help="the official .pt file")
    imported.add_argument("--config", required=True, help="its config.yaml (beside it)")
    imported.add_argument("--out", required=True, help="the model folder to write (path or URI)")
    imported.add_argument("--rqvae", default=None,
                          help="rqtransformer: the imported RQ-VAE folder it was trained with")  # fmt: skip
    imported.add_argument("--ema", action="store_true",
                          help="import state_dict_ema instead of state_dict")  # fmt: skip

    clip = commands.add_parser("clip-score", help="CLIP score of a caption model's samples")
    clip.add_argument("samples", help="a sample stage's output (RUN/samples) or its run dir")
    clip.add_argument("--clip", required=True,
                      help="a CLIP folder in the transformers layout (openai/clip-vit-base-patch32)")  # fmt: skip

    push = commands.add_parser("push", help="upload a model folder to the Hugging Face Hub")
    push.add_argument("folder", help="a model folder (config.json + model.safetensors)")
    push.add_argument("repo_id", help="org/name on the Hub (created if missing)")
    push.add_argument("--private", action="store_true")

    for sub in (stats, query, decode, imported, push, clip):
        sub.add_argument("--endpoint-url", default=None,
                         help="S3 endpoint (default: AWS_ENDPOINT_URL or AWS)")  # fmt: skip

    args = parser.parse_args(argv)
    try:
        if args.command in ("stats", "query", "decode"):
            return _analysis(args)
        if args.command == "convert-lpips":
            from pipeline.tools.lpips_weights import convert_lpips

            counts = convert_lpips(args.vgg16, args.out, args.heads)
            print(f"wrote {args.out}: {counts['tensors']} tensors (VGG16 features + 5 LPIPS "
                  f"heads; dropped {counts['dropped']} classifier tensors); use it as "
                  f"train_vae.loss.perceptual_weights_path={args.out}")  # fmt: skip
            return 0
        if args.command == "import-official":
            from pipeline.tools.official_import import import_official

            storage = Storage(StorageConfig(endpoint_url=args.endpoint_url))
            record = import_official(args.kind, args.checkpoint, args.config, args.out,
                                     args.rqvae, args.ema, storage)  # fmt: skip
            print(f"wrote {args.out}: {record['parameters']:,} parameters from "
                  f"{record['tensors_imported']} tensors ({record['weights']})")  # fmt: skip
            for name, why in {**record["left_out"], **record["dropped_tensors"]}.items():
                print(f"  dropped {name}: {why}")
            return 0
        if args.command == "clip-score":
            from pipeline.tools.clip_score import clip_score

            storage = Storage(StorageConfig(endpoint_url=args.endpoint_url))
            samples = args.samples.rstrip("/")
            if storage.exists(f"{samples}/samples/_manifest.json"):
                samples = f"{samples}/samples"
            report = clip_score(storage, samples, args.clip)
            print(f"CLIP score {report['clip_score']:.4f} (mean cosine similarity of "
                  f"{report['samples']} samples with their prompts; {samples}/clip_score.json)")  # fmt: skip
            return 0
        if args.command == "push":
            from pipeline.tools.hub import push_model

            storage = Storage(StorageConfig(endpoint_url=args.endpoint_url))
            url = push_model(storage, args.folder, args.repo_id, private=args.private)
            print(f"pushed {args.folder} to {url}")
            return 0
        if args.command == "demo":
            from pipeline.demo.run import run_demo

            run_demo(args.run_dir, args.config, args.overrides, args.overwrite, args.ray_address)
            return 0
        if args.command == "run":
            from pipeline.run import plan_pipeline, run_pipeline

            plan = plan_pipeline(args.config, args.overrides, args.input)
            _join_cluster(plan, args)
            run_pipeline(args.input, args.run_dir, plan, args.overwrite)
            return 0
        from pipeline.run import PlannedStage, stage

        config_class, run_stage = stage(args.command).load()
        overrides = [*args.overrides, *_flag_overrides(args)]
        config = load_config(config_class, args.config, overrides)
        _join_cluster([PlannedStage(stage(args.command), config, run_stage)], args)
        if args.command == "shard":
            run_stage(args.input, args.run_dir, config, overwrite=args.overwrite)
        else:
            run_stage(args.run_dir, config, overwrite=args.overwrite)
    except ConfigError as e:
        print(f"rqpipe: configuration error: {e}", file=sys.stderr)
        return 2
    except (StageConflict, StageBusy, FileNotFoundError, ImportError, ValueError, KeyError,
            PermissionError, ConnectionError) as e:  # fmt: skip
        if (endpoint := unreachable_endpoint(e, _configured_storage(args))) is None:
            print(f"rqpipe {args.command}: {redact(str(e))}", file=sys.stderr)
            return 1
        _print_unreachable(args.command, endpoint, e)
        return 3
    except Exception as e:
        if (endpoint := unreachable_endpoint(e, _configured_storage(args))) is None:
            raise
        _print_unreachable(args.command, endpoint, e)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
