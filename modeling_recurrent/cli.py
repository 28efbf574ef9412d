"""The `recurrent-depth` command: demo, train, convert, upload, eval, trace, bench.

Each subcommand's options live beside its implementation; this module only assembles them, and imports the
heavy parts when a subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib import metadata

from packaging.requirements import Requirement

DISTRIBUTION = "modeling-recurrent"

# subcommand -> (module, one-line help, example); each module has add_arguments(parser) and run(args), or builds
# its own subparser with add_<name>_parser(subparsers).
COMMANDS: dict[str, tuple[str, str, str | None]] = {
    "demo": (
        "modeling_recurrent.demo",
        "test-time scaling on the shipped chain model: accuracy by hops x num_steps, with a plot",
        "recurrent-depth demo --steps 1,2,4,8,16,32,64 --n 300 --out demo-out",
    ),
    "train": (
        "modeling_recurrent.train",
        "variable-depth training (chain task or local text), resumable, data-parallel with torchrun",
        "recurrent-depth train --config chain-tiny --data chain --steps 4000 --out runs/chain",
    ),
    # convert and upload build their own subparsers (help, examples); the text here shows only if they fail to import
    "convert": (
        "modeling_recurrent.convert.cli",
        "convert checkpoints to and from this package's format",
        None,
    ),
    "upload": (
        "modeling_recurrent.convert.cli",
        "upload a model folder to the Hugging Face Hub with its code and model card",
        None,
    ),
    "eval": (
        "modeling_recurrent.evaluate",
        "lm-eval-harness across num_steps (and adaptive exit), with a results JSON and a plot",
        "recurrent-depth eval --model PATH --tasks chain_mc --num-steps 1,4,16,32",
    ),
    "trace": (
        "modeling_recurrent.trace",
        "record latent trajectories of a prompt and plot convergence, PCA orbits and exit steps",
        "recurrent-depth trace --model PATH --prompt 'q=4;b=7;c=b+3;?c=' --num-steps 64 --out trace-out",
    ),
    "bench": (
        "modeling_recurrent.bench",
        "speed and memory against an unrolled Llama of the same depth, as ratios",
        "recurrent-depth bench --preset tiny --out bench.json",
    ),
}


def parse_integers(text: str, option: str, positive: bool = True) -> list[int]:
    """A command line's comma-separated integers ('1,4,16' -> [1, 4, 16]); ValueError naming `option` and the text
    if one is not an integer, none is given, or (with `positive`) one is below 1."""
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as error:
        raise ValueError(f"{option} must be comma-separated integers, got {text!r}") from error
    if not values:
        raise ValueError(f"{option} names no integer: {text!r}")
    if positive and min(values) < 1:
        raise ValueError(f"{option} must be positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recurrent-depth",
        description="Recurrent-depth language models: spend more compute at test time with more recurrence steps.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text, example) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:  # a subcommand whose optional dependencies are missing
            cmd = sub.add_parser(name, help=f"{help_text} (unavailable: {error})")
            cmd.set_defaults(func=lambda args, error=error: _unavailable(error), unavailable=True)
            continue
        if not hasattr(module, "add_arguments"):  # the module builds its own subparser (convert, upload)
            getattr(module, f"add_{name}_parser")(sub)
            continue
        cmd = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(cmd)
        cmd.set_defaults(func=module.run)
    return parser


def extra_for(error: ImportError) -> str | None:
    """The extra of the installed package (setup.cfg's, read from its metadata) that installs the module an
    ImportError names (`lm_eval` -> `eval`), or None; `test` only when no other extra has it."""
    module = (error.name or "").split(".")[0]
    try:
        requirements = [Requirement(line) for line in metadata.requires(DISTRIBUTION) or []]
        extras = metadata.metadata(DISTRIBUTION).get_all("Provides-Extra") or []
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return None
    for extra in sorted(extras, key=lambda name: name == "test"):
        for requirement in requirements:
            installs = requirement.marker is not None and requirement.marker.evaluate({"extra": extra})
            if installs and requirement.name.lower().replace("-", "_") == module:
                return extra
    return None


def _missing(error: ImportError, extra: str | None) -> str:
    hint = f' (pip install "{DISTRIBUTION}[{extra}]")' if extra else ""
    return f"this command needs an optional dependency: {error}{hint}"


def _unavailable(error: ImportError) -> int:
    print(_missing(error, extra_for(error)), file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "unavailable", False):  # an unavailable command names its extra whatever it got
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return int(args.func(args) or 0)
    except ImportError as error:  # imported only when an option needs it (datasets for text data, peft for LoRA)
        extra = extra_for(error)
        if extra is None:  # not an optional dependency: a real bug, keep its traceback
            raise
        parser.exit(2, f"recurrent-depth {args.command}: error: {_missing(error, extra)}\n")
    except (ValueError, OSError) as error:  # OSError: missing, unreadable or corrupt files
        parser.exit(2, f"recurrent-depth {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
