"""What one training run is defined by: `TrainArgs`, validated in one place, and its command-line options.

`recurrent-depth train` parses the options with `add_arguments`, and `args_from_namespace` turns them into the
TrainArgs the Python API takes too, so both reject the same bad values with the same messages.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field

from .chain_training import ChainOptions, check_probability
from .cli import parse_integers


@dataclass
class TrainArgs:
    """Everything one training run is defined by (saved beside each checkpoint); validated on construction, so the
    Python API and the command line reject the same bad values with the same messages."""

    out: str
    data: str = "chain"  # "chain" or a local .txt / .jsonl file (or a folder of them)
    model: str | None = None  # existing checkpoint to fine-tune; else a new model from `config`
    config: str | None = None  # preset name or config folder for a new model
    config_overrides: dict = field(default_factory=dict)
    tokenizer: str | None = None
    steps: int = 1000
    batch_size: int = 32  # global batch (sequences per optimizer step, over all ranks)
    seq_len: int = 256  # text data: packed sequence length
    lr: float = 1e-3
    min_lr_ratio: float = 0.0  # the cosine decays to lr * min_lr_ratio
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 200
    eval_steps: list[int] = field(default_factory=lambda: [1, 4, 8, 16, 32])
    eval_samples: int = 200
    save_every: int = 200
    activation_checkpointing: bool = False
    deep_supervision: bool = False  # a loss after every recurrence step with gradient, not only the last
    direct_readout_weight: float = 0.0  # with deep_supervision: weight of each step's loss read without the coda
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the processes (FSDP2)
    lora_rank: int = 0
    text_field: str = "text"
    chain_queries: int = 4
    chain_repeats: int = 2
    chain_literal_operands: float = 0.0
    chain_statement_values: bool = False
    chain_backward: float = 0.0
    chain_forward: float = 0.0
    chain_paced: bool = False
    chain_paced_offsets: float = 0.0
    chain_carry: float = 0.0  # chance that a problem's steps see only the digits of its chain they read
    chain_curriculum: bool = True
    chain_start_hops: int = 1
    chain_advance_at: float = 0.8
    chain_frontier_weight: float = 1.0  # curriculum: weight of the most hops relative to each easier hop count
    mean_recurrence: int | None = None  # training depth mean (default: the config's)

    def __post_init__(self) -> None:
        counts = {
            "steps": 1,
            "batch_size": 1,
            "seq_len": 1,
            "eval_every": 1,
            "eval_samples": 1,
            "save_every": 1,
            "warmup": 0,
            "seed": 0,
            "lora_rank": 0,
            "chain_start_hops": 0,
        }
        if self.mean_recurrence is not None:
            counts["mean_recurrence"] = 1
        for name, low in counts.items():
            _require(name, getattr(self, name), int, lambda v, low=low: v >= low, f"an integer >= {low}")
        for name in ("lr", "grad_clip", "chain_frontier_weight"):
            _require(name, getattr(self, name), (int, float), lambda v: v > 0, "a number > 0")
        for name in ("weight_decay", "direct_readout_weight"):
            _require(name, getattr(self, name), (int, float), lambda v: v >= 0, "a number >= 0")
        if self.direct_readout_weight and not self.deep_supervision:
            raise ValueError("--direct-readout-weight weights a loss of --deep-supervision's steps: give both")
        for name in (
            "min_lr_ratio",
            "chain_advance_at",
        ):
            check_probability(_option(name), getattr(self, name))
        try:  # ChainOptions checks the chain_* fields; its messages name them by ChainOptions' field names
            self.chain_options()
        except ValueError as error:
            raise ValueError(_CHAIN_FIELD.sub(lambda m: _option(_CHAIN_OPTIONS[m[0]]), str(error))) from None
        if self.chain_carry and not self.deep_supervision:
            raise ValueError("--chain-carry needs --deep-supervision: each recurrence step gets its own input")
        if self.deep_supervision and self.fsdp:
            raise ValueError(
                "--deep-supervision reads the model out between its own forward's parts, which FSDP "
                "does not gather: use DDP (drop --fsdp)"
            )
        if not self.eval_steps or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in self.eval_steps):
            raise ValueError(f"--eval-steps must be positive integers, got {self.eval_steps!r}")

    def chain_options(self) -> ChainOptions:
        """How the chain data writes and labels its problems (the `chain_*` fields)."""
        return ChainOptions(**{name: getattr(self, field) for name, field in _CHAIN_OPTIONS.items()})


def _require(name: str, value: object, kinds, ok, wanted: str) -> None:
    """ValueError naming the option of field `name` unless `value` is a `kinds` (never a bool) for which `ok` holds."""
    if isinstance(value, bool) or not isinstance(value, kinds) or not ok(value):
        raise ValueError(f"{_option(name)} must be {wanted}, got {value!r}")


# ChainOptions field -> the TrainArgs field (and so the command-line option) that sets it.
_CHAIN_OPTIONS = {
    "n_queries": "chain_queries",
    "n_repeats": "chain_repeats",
    "literal_operands": "chain_literal_operands",
    "statement_values": "chain_statement_values",
    "backward": "chain_backward",
    "forward": "chain_forward",
    "paced_offsets": "chain_paced_offsets",
    "paced": "chain_paced",
    "carry": "chain_carry",
}
_CHAIN_FIELD = re.compile(r"\b(" + "|".join(_CHAIN_OPTIONS) + r")\b")


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


_HELP = {
    "steps": "optimizer steps in all; the cosine schedule spans them (changing it on resume changes the learning rate)",
    "batch_size": "global batch: sequences per optimizer step, over all processes",
    "seq_len": "text data: tokens per packed sequence",
    "warmup": "steps of linear learning-rate warmup",
    "seed": "seed of the initial weights, the data stream and the depth draws (a resumed run continues its stream)",
    "eval_every": "evaluate every N steps and at the last step",
    "eval_samples": "chain data: fresh in-distribution problems per evaluation",
    "save_every": "write OUT/checkpoint-last every N steps",
    "lora_rank": "with --model: train LoRA adapters of this rank (peft) instead of every weight; 0 trains all weights",
    "mean_recurrence": "mean of the training depth (Poisson-lognormal draws per step); default: the config's",
    "chain_queries": "answered queries per chain problem (target and other variables; more = denser multi-hop signal)",
    "chain_repeats": "statements repeated after the problem with every character after the variable supervised: dense "
    "training of the look-up (what followed `b=` before follows it again)",
    "chain_start_hops": "curriculum: most hops at the start; one more each time that depth passes --chain-advance-at",
    "lr": "peak learning rate (AdamW, betas 0.9 / 0.95)",
    "min_lr_ratio": "learning rate at the last step, as a fraction of --lr (cosine decay)",
    "weight_decay": "AdamW weight decay on matrices (not on norms, biases or the embedding)",
    "grad_clip": "clip the global gradient norm to this value",
    "chain_advance_at": "curriculum: accuracy on the current most hops (best over --eval-steps) that adds a hop",
    "chain_frontier_weight": "curriculum: the most hops so far are drawn this many times as often as each easier hop "
    "count (1: uniform)",
    "chain_literal_operands": "chance that a training statement `g=d-8` is written with the operand's value, `g=0-8` "
    "(teaches a hop's arithmetic apart from its indirection; evaluation always uses the spec's format)",
    "chain_backward": "chance that a training problem's chains are written in backward order (`g=d-8;...;d=0`), where "
    "only the answering position can resolve them, one look-up per hop (evaluation keeps the spec's shuffled order)",
    "chain_forward": "chance that a training problem's chains are written in forward order (`d=0;...;g=d-8`), where "
    "every statement can be resolved from the ones before it (with --chain-statement-values each is supervised); "
    "--chain-backward + --chain-forward <= 1",
    "chain_paced_offsets": "with --chain-paced: chance that a query's label at a step before its chain is resolved "
    "is the running offset (`2` for `g=d-8`: value(g) - value(d)) instead of the variable reached, so the readout "
    "also names the sum the look-ups so far add",
    "chain_carry": "with --chain-paced, --deep-supervision, --chain-queries 1, --chain-repeats 0 and "
    "--chain-literal-operands 0: chance that a problem is trained with recurrence step r seeing its target chain's "
    "digits only in the statement the walk reads at step r (wrong digits elsewhere), so the running offset has to be "
    "carried in the state, not re-read",
    "text_field": "text data: the .jsonl field holding the text",
    "direct_readout_weight": "with --deep-supervision: weight of a second loss per step, read from the state "
    "directly (final norm and head, without the coda); the coda can answer by re-reading the prompt, the direct "
    "readout only from what the answering position's state holds",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line options of `recurrent-depth train` (one per TrainArgs field); values are checked by TrainArgs."""
    defaults = TrainArgs(out="")
    parser.add_argument("--out", required=True, help="output folder (checkpoints, log.jsonl); resumes if present")
    parser.add_argument(
        "--data", default=defaults.data, help="'chain' (the built-in task) or a .txt/.jsonl file or folder"
    )
    parser.add_argument("--model", help="checkpoint folder to fine-tune (e.g. a retrofitted model)")
    parser.add_argument("--config", help="preset name (tiny, huginn-0125, chain-tiny) or config folder for a new model")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a config field, e.g. --set hidden_size=256 (JSON values; other text as a string; repeatable)",
    )
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the model's, or the chain tokenizer)")
    for name, help_text in _HELP.items():
        default = getattr(defaults, name)  # its type is the option's (None: an optional count)
        parser.add_argument(
            _option(name), type=int if default is None else type(default), default=default, help=help_text
        )
    parser.add_argument(
        "--eval-steps",
        default=",".join(map(str, defaults.eval_steps)),
        help="comma-separated num_steps for periodic evaluation",
    )
    parser.add_argument("--activation-checkpointing", action="store_true", help="checkpoint each recurrence step")
    parser.add_argument(
        "--deep-supervision",
        action="store_true",
        help="a loss read out after every recurrence step with gradient (averaged), not only the "
        "last; with --chain-paced step r is labelled for depth r, so every step of a chain's walk is "
        "a target in every batch (use --set mean_backprop_depth=N to put more steps under gradient)",
    )
    parser.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP",
    )
    parser.add_argument(
        "--chain-statement-values",
        action="store_true",
        help="chain data: also supervise, at each statement's ';', the value of every statement "
        "that follows from the ones before it (dense intermediate values; prompts are unchanged)",
    )
    parser.add_argument(
        "--chain-paced",
        action="store_true",
        help="chain data: a query whose chain has more links than the step's drawn depth r is "
        "labelled with the variable r look-ups reach from it (`?g=` -> `d` for `g=d-8` at r=1), "
        "its value only from r = links + 1 on: one hop per recurrence step (prompts are unchanged)",
    )
    parser.add_argument(
        "--no-curriculum",
        dest="chain_curriculum",
        action="store_false",
        help="chain data: train on hops 0-6 from the start instead of adding hops one at a time",
    )


def args_from_namespace(ns: argparse.Namespace) -> TrainArgs:
    """Validate parsed options into TrainArgs (ValueError naming the option on bad input)."""
    overrides = {}
    for item in ns.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        try:  # numbers, lists, true/false/null as JSON; anything else (e.g. dtype=float16) as the string given
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    steps = parse_integers(ns.eval_steps, "--eval-steps", positive=False)  # TrainArgs checks the values
    fields = {k: v for k, v in vars(ns).items() if k in TrainArgs.__dataclass_fields__}
    return TrainArgs(**{**fields, "config_overrides": overrides, "eval_steps": steps})
