"""`recurrent-depth convert ...` and `recurrent-depth upload ...` subcommands.

`add_convert_parser(subparsers)` and `add_upload_parser(subparsers)` add them to the main parser's subparsers; each
sets `func(args)` to run the command.
"""

from __future__ import annotations

import argparse
from typing import cast

import torch
from huggingface_hub import CommitInfo

from .huginn import convert_huginn
from .pretrain import convert_pretrain
from .retrofit import convert_retrofit
from .shards import parse_shard_size
from .upload import upload

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

CONVERT_EXAMPLES = """\
examples:
  # published huginn-0125 (model_type huginn_raven) -> this package's format, in bfloat16
  recurrent-depth convert huginn ./huginn-0125 ./huginn-0125-rd --dtype bfloat16
  # and back to the published format
  recurrent-depth convert huginn ./huginn-0125-rd ./huginn-0125-published --to published
  # a pretraining checkpoint (.pth) with the huginn-0125 shape
  recurrent-depth convert pretrain step-00047360.pth ./huginn-step-47360 --config huginn-0125
  # retrofit TinyLlama (22 layers): prelude 0-3, core 10-17 (iterated), coda 18-21
  recurrent-depth convert llama ./TinyLlama-1.1B ./tinyllama-rd --prelude 0-3 --core 10-17 --coda 18-21
"""

UPLOAD_EXAMPLES = """\
examples:
  # write the exact folder that would be uploaded, with eval results in the card
  recurrent-depth upload ./tinyllama-rd me/tinyllama-rd --dry-run --eval-results results.json
  # upload as a private repository
  recurrent-depth upload ./tinyllama-rd me/tinyllama-rd --private --base-model TinyLlama/TinyLlama-1.1B
"""


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="source model folder or checkpoint file")
    parser.add_argument("dst", help="destination folder (must not exist unless --overwrite)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="auto", help="cast floating tensors (default: keep)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard: 5GB, 500MB, 2GiB or bytes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def _output_kwargs(args: argparse.Namespace) -> dict:
    try:  # parsed before any tensor is read
        max_shard_size = parse_shard_size(args.max_shard_size)
    except ValueError as error:
        raise ValueError(f"--max-shard-size: {error}") from None
    return dict(
        dtype=DTYPES[args.dtype],
        max_shard_size=max_shard_size,
        overwrite=args.overwrite,
        progress=args.progress,
    )


def run_huginn(args: argparse.Namespace) -> None:
    print(convert_huginn(args.src, args.dst, to=args.to, **_output_kwargs(args)))


def run_pretrain(args: argparse.Namespace) -> None:
    print(
        convert_pretrain(args.src, args.dst, config=args.config, allow_pickle=args.allow_pickle, **_output_kwargs(args))
    )


def run_llama(args: argparse.Namespace) -> None:
    dst = convert_retrofit(
        args.src,
        args.dst,
        prelude=args.prelude,
        core=args.core,
        coda=args.coda,
        adapter_init=args.adapter_init,
        mean_recurrence=args.mean_recurrence,
        mean_backprop_depth=args.mean_backprop_depth,
        seed=args.seed,
        **_output_kwargs(args),
    )
    print(dst)


def run_upload(args: argparse.Namespace) -> None:
    result = upload(
        args.folder,
        args.repo_id,
        private=args.private,
        dry_run=args.dry_run,
        output=args.output,
        overwrite=args.overwrite,
        eval_results=args.eval_results,
        base_model=args.base_model,
        license=args.license,
        tags=args.tag,
    )
    # without dry_run, upload returns the Hub's CommitInfo
    print(result if args.dry_run else cast(CommitInfo, result).commit_url)


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """`convert {huginn,pretrain,llama} SRC DST [options]`."""
    parser = subparsers.add_parser(
        "convert",
        help="convert checkpoints to and from this package's format",
        description="Convert checkpoints to and from this package's format (streamed shard by shard, atomic output).",
        epilog=CONVERT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    formats = parser.add_subparsers(dest="format", required=True, metavar="{huginn,pretrain,llama}")

    huginn = formats.add_parser(
        "huginn",
        help="published huginn-0125 format <-> ours",
        epilog=CONVERT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_output_options(huginn)
    huginn.add_argument("--to", choices=["ours", "published"], default="ours", help="direction (default: ours)")
    huginn.set_defaults(func=run_huginn)

    pretrain = formats.add_parser(
        "pretrain",
        help="pretraining-code .pth checkpoint -> ours",
        epilog=CONVERT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_output_options(pretrain)
    pretrain.add_argument("--config", default="huginn-0125", help="preset name, model folder or config.json")
    pretrain.add_argument(
        "--allow-pickle", action="store_true", help="load arbitrary pickled objects (only for trusted files)"
    )
    pretrain.set_defaults(func=run_pretrain)

    llama = formats.add_parser(
        "llama",
        help="retrofit a Llama / Qwen2 / Qwen3 model into a recurrent-depth model",
        epilog=CONVERT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_output_options(llama)
    llama.add_argument("--prelude", default="", help="source layers of the prelude, inclusive, e.g. 0-3")
    llama.add_argument("--core", required=True, help="source layers of the iterated core, inclusive, e.g. 10-17")
    llama.add_argument("--coda", default="", help="source layers of the coda, inclusive, e.g. 18-21")
    llama.add_argument(
        "--adapter-init",
        choices=["identity", "random"],
        default="identity",
        help="identity: [0 | I], passes the prelude output through (default); random: truncated normal",
    )
    llama.add_argument("--mean-recurrence", type=int, default=32, help="default num_steps / training mean (32)")
    llama.add_argument("--mean-backprop-depth", type=int, default=8, help="truncated-backprop depth (8)")
    llama.add_argument("--seed", type=int, default=0, help="seed of the random adapter init")
    llama.set_defaults(func=run_llama)
    return parser


def add_upload_parser(subparsers) -> argparse.ArgumentParser:
    """`upload FOLDER REPO_ID [--private] [--dry-run] [--eval-results JSON] [options]`."""
    parser = subparsers.add_parser(
        "upload",
        help="upload a model folder to the Hugging Face Hub with its code and model card",
        description="Render the model card, add the model code, and upload the folder in one commit.",
        epilog=UPLOAD_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("folder", help="model folder of this package's format")
    parser.add_argument("repo_id", help="Hub repository, e.g. user/name")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--dry-run", action="store_true", help="only write the folder that would be uploaded")
    parser.add_argument("--output", default=None, help="dry-run folder (default: FOLDER-upload)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dry-run folder")
    parser.add_argument(
        "--eval-results",
        default=None,
        help="lm-eval results JSON, or the results.json of `recurrent-depth eval`, for the card's model-index",
    )
    parser.add_argument("--base-model", default=None, help="Hub id of the model this one was derived from")
    parser.add_argument("--license", default="apache-2.0", help="license id for the card (default: apache-2.0)")
    parser.add_argument("--tag", action="append", default=[], help="extra card tag (repeatable)")
    parser.set_defaults(func=run_upload)
    return parser
