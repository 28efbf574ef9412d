"""`recurrent-depth eval`: lm-eval-harness across test-time compute (num_steps, optionally with adaptive exit).

Each setting is one `lm_eval.simple_evaluate` run. The model is lm-eval's `HFLM` subclassed and registered as
"recurrent-depth": `num_steps` (alias of `mean_recurrence`) and `init_scale` are ordinary model_args that HFLM
hands to `from_pretrained`, which sets them on the config, exactly as `lm_eval --model hf --model_args
pretrained=PATH,trust_remote_code=True,num_steps=N,init_scale=0` does. `exit_criterion`, `exit_threshold` and
`min_steps` are consumed by the subclass, which adds them to every forward call with a forward pre-hook; a forward
hook reads `steps_used` from every output to report the recurrence steps actually spent per token.

The chain tasks (chain_mc, chain_gen, chain_mc_harder, chain_gen_harder) ship in `tasks/chain`, their data beside
them; `recurrent-depth eval --print-task-path` prints the folder to give `lm_eval --include_path`.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lm_eval  # optional dependency (the `eval` extra): without it `recurrent-depth eval` reports itself unavailable
import torch

from .cli import parse_integers
from .convert.card import metric_items

if TYPE_CHECKING:
    from lm_eval.models.huggingface import HFLM

PACKAGE = Path(__file__).resolve().parent
TASK_PATH = PACKAGE / "tasks"
CHAIN_TASK_DIR = TASK_PATH / "chain"
DEFAULT_MODEL = PACKAGE / "checkpoints" / "chain-tiny"
# data file -> (chain_task split, problems, seed); integer seeds never used by training (which seeds with strings).
CHAIN_TASK_DATA = {"in_distribution": ("in-distribution", 300, 60_001), "harder": ("harder", 300, 60_002)}
LM_NAME = "recurrent-depth"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="model folder (default: the shipped chain model)")
    parser.add_argument("--tasks", default="chain_mc,chain_gen", help="comma-separated lm-eval task names")
    parser.add_argument("--num-steps", default="1,4,16,32", help="comma-separated num_steps (maxima with an exit)")
    parser.add_argument("--exit-criterion", default=None, help="per-token adaptive exit, e.g. kl")
    parser.add_argument(
        "--exit-threshold",
        type=_number,
        default=None,
        help="threshold (default: the published one); an integer for argmax-stability",
    )
    parser.add_argument("--min-steps", type=int, default=0, help="steps before an exit is allowed")
    parser.add_argument("--init-scale", type=float, default=None, help="initial-state scale (0: deterministic)")
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (left-padded batches)")
    parser.add_argument("--limit", type=int, default=None, help="examples per task (for quick checks)")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda when available, else cpu)",
    )
    parser.add_argument("--out", default="eval-out", help="output directory for results.json and the plot")
    parser.add_argument(
        "--print-task-path", action="store_true", help="print the folder of the shipped tasks (for --include_path)"
    )


def _number(text: str) -> int | float:
    """An int when the text is one (argmax-stability counts steps), else a float."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def write_chain_task_data(folder: str | Path = CHAIN_TASK_DIR) -> list[Path]:
    """(Re)write the chain tasks' jsonl files, deterministically from CHAIN_TASK_DATA."""
    from .chain_task import sample_problems

    paths = []
    for name, (split, n, seed) in CHAIN_TASK_DATA.items():
        rows = [
            {"prompt": p.prompt, "answer": p.answer, "label": int(p.answer), "hops": p.hops}
            for p in sample_problems(split, n, seed)
        ]
        paths.append(Path(folder) / f"{name}.jsonl")
        paths[-1].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


class StepTally:
    """Recurrence steps and attention context per processed token, read from every forward's `steps_used`.

    Tokens are the attention mask's ones when a mask is given (generate_until), else every input position
    (loglikelihood). A forward hook: `model.register_forward_hook(tally.record, with_kwargs=True)`.
    """

    def __init__(self) -> None:
        self.tokens = self.steps = self.context = 0.0

    def record(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        inputs = kwargs.get("input_ids", args[0] if args else None)
        inputs = kwargs.get("inputs_embeds") if inputs is None else inputs
        assert inputs is not None  # the forward this hook follows ran, so it had input_ids or inputs_embeds
        batch, length = inputs.shape[:2]
        mask = kwargs.get("attention_mask")
        if mask is None:
            new, past = torch.full((batch,), float(length)), torch.zeros(batch)
        else:
            mask = mask.detach().float().cpu()
            new, past = mask[:, -length:].sum(1), mask[:, :-length].sum(1)
        self.tokens += float(new.sum())
        self.steps += float((new * output.steps_used.detach().float().cpu()).sum())
        self.context += float((new * past + new * (new + 1) / 2).sum())  # token i of a row attends past + i

    def summary(self) -> dict[str, float]:
        if not self.tokens:
            raise ValueError("no forward calls were recorded")
        return {"avg_steps_per_token": self.steps / self.tokens, "avg_context": self.context / self.tokens}


@functools.cache
def lm_class() -> type[HFLM]:
    """HFLM for recurrent-depth models, registered with lm-eval as "recurrent-depth" (defined on first use)."""
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM

    @register_model(LM_NAME)
    class RecurrentDepthLM(HFLM):
        """HFLM plus the adaptive-exit forward options and a tally of the steps each token used."""

        def __init__(self, *args, exit_criterion=None, exit_threshold=None, min_steps=0, **kwargs):
            if exit_criterion is None and (exit_threshold is not None or min_steps):
                raise ValueError("exit_threshold and min_steps only apply with an exit_criterion")
            super().__init__(*args, **kwargs)
            self.forward_kwargs = {}  # the model validates them on its first forward
            if exit_criterion is not None:
                self.forward_kwargs = dict(
                    exit_criterion=exit_criterion, exit_threshold=exit_threshold, min_steps=min_steps
                )
            self.tally = StepTally()
            self.model.register_forward_pre_hook(self._add_forward_kwargs, with_kwargs=True)
            self.model.register_forward_hook(self.tally.record, with_kwargs=True)

        def _add_forward_kwargs(self, module, args, kwargs):
            return args, {**self.forward_kwargs, **kwargs}

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            if not self.forward_kwargs:
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
            # Exit decisions read each row's last position, but lm-eval right-pads these batches without a mask:
            # under adaptive exit, run one request per forward so that the last position is the row's own.
            batch_size, self.batch_size_per_gpu = self.batch_size_per_gpu, 1
            try:
                return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs=1)
            finally:
                self.batch_size_per_gpu = batch_size

    return RecurrentDepthLM


def check_args(args: argparse.Namespace) -> tuple[Path, list[str], list[int]]:
    """The model folder, task names and num_steps of the command line; ValueError / FileNotFoundError if bad."""
    from .generation_recurrent_depth import EXIT_CRITERIA, make_exit_criterion

    steps = parse_integers(args.num_steps, "--num-steps")
    if args.exit_criterion is not None and args.exit_criterion not in EXIT_CRITERIA:
        raise ValueError(f"--exit-criterion must be one of {sorted(EXIT_CRITERIA)}, got {args.exit_criterion!r}")
    if args.exit_criterion is None and (args.exit_threshold is not None or args.min_steps):
        raise ValueError("--exit-threshold and --min-steps need an --exit-criterion")
    if args.exit_criterion is not None:
        try:  # the model checks the same again on every forward: fail here, before lm-eval loads anything
            make_exit_criterion(args.exit_criterion, args.exit_threshold)
        except (TypeError, ValueError) as error:
            raise ValueError(f"--exit-threshold: {error}") from None
        if not 0 <= args.min_steps <= min(steps):
            raise ValueError(f"--min-steps must be in [0, smallest --num-steps {min(steps)}], got {args.min_steps}")
    for name, value, low in (("--batch-size", args.batch_size, 1), ("--limit", args.limit, 1)):
        if value is not None and value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if args.init_scale is not None and not args.init_scale >= 0:
        raise ValueError(f"--init-scale must be >= 0, got {args.init_scale}")
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"{model}: no config.json (not a model folder)")
    if not (model / "tokenizer.json").is_file() and not (model / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{model}: no tokenizer files (tokenizer.json)")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks must name at least one lm-eval task")
    return model, tasks, steps


@functools.cache
def task_manager():
    """lm-eval's task index with the shipped tasks added (built once per process: indexing takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_PATH))


def evaluate_setting(args: argparse.Namespace, model: Path, tasks: list[str], num_steps: int) -> dict:
    """One lm-eval run at `num_steps` (the maximum, with an exit criterion): metrics, steps per token, FLOPs."""
    from .flops import flops_per_token

    model_args: dict[str, Any] = {"pretrained": str(model), "trust_remote_code": True, "num_steps": num_steps}
    if args.init_scale is not None:
        model_args["init_scale"] = args.init_scale
    if args.exit_criterion is not None:
        model_args.update(exit_criterion=args.exit_criterion, min_steps=args.min_steps)
        if args.exit_threshold is not None:
            model_args["exit_threshold"] = args.exit_threshold
    lm = lm_class().create_from_arg_obj(model_args, {"batch_size": args.batch_size, "device": args.device})
    out = lm_eval.simple_evaluate(
        model=lm, model_args=model_args, tasks=tasks, limit=args.limit, task_manager=task_manager(), log_samples=False
    )
    usage = lm.tally.summary()
    keep = ("task", "dataset_path", "dataset_name", "test_split", "output_type", "num_fewshot")
    return {
        "label": setting_label(num_steps, args.exit_criterion, args.exit_threshold),
        "num_steps": num_steps,
        "exit_criterion": args.exit_criterion,
        "exit_threshold": args.exit_threshold,
        "model_args": model_args,
        **usage,
        "flops_per_token": flops_per_token(lm.model.config, usage["avg_steps_per_token"], round(usage["avg_context"])),
        "results": out["results"],
        "configs": {t: {k: v for k, v in out["configs"][t].items() if k in keep} for t in out["results"]},
        "n-shot": out.get("n-shot", {}),
    }


def setting_label(num_steps: int, criterion: str | None, threshold: float | None) -> str:
    if criterion is None:
        return f"num_steps={num_steps}"
    return f"num_steps<={num_steps}, exit={criterion}" + (f"@{threshold:g}" if threshold is not None else "")


def headline(metrics: dict[str, Any]) -> tuple[str, float]:
    """The first metric of an lm-eval task result (e.g. 'acc,none')."""
    for key, value in metric_items(metrics):
        return key, value
    raise ValueError(f"no metric in {sorted(metrics)}")


def run(args: argparse.Namespace) -> int:
    if args.print_task_path:
        print(TASK_PATH)
        return 0
    model, tasks, steps = check_args(args)
    from lm_eval.utils import handle_non_serializable

    unknown = [t for t in tasks if t not in task_manager().all_tasks]
    if unknown:
        shipped = sorted(p.stem for p in CHAIN_TASK_DIR.glob("*.yaml"))
        raise ValueError(f"unknown lm-eval tasks {unknown} (the shipped ones: {shipped})")
    settings = [evaluate_setting(args, model, tasks, r) for r in steps]
    report = {
        "model": str(model),
        "tasks": tasks,
        "batch_size": args.batch_size,
        "limit": args.limit,
        "init_scale": args.init_scale,
        "settings": settings,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2, default=handle_non_serializable))
    print_table(settings, tasks)
    plot(settings, tasks, out / "metric_vs_compute.png")
    print(f"\nwrote {out / 'results.json'} and {out / 'metric_vs_compute.png'}")
    return 0


def print_table(settings: list[dict], tasks: list[str]) -> None:
    names = [f"{t} {headline(settings[0]['results'][t])[0]}" for t in tasks]
    header = f"{'setting':<32} {'steps/tok':>9} {'MFLOP/tok':>10} | " + " | ".join(names)
    print("\n" + header + "\n" + "-" * len(header))
    for s in settings:
        cells = [f"{headline(s['results'][t])[1]:>{len(n)}.4f}" for t, n in zip(tasks, names, strict=True)]
        print(
            f"{s['label']:<32} {s['avg_steps_per_token']:>9.2f} {s['flops_per_token'] / 1e6:>10.2f} | "
            + " | ".join(cells)
        )


def plot(settings: list[dict], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    mflops = [s["flops_per_token"] / 1e6 for s in settings]
    for i, task in enumerate(tasks):
        metric = headline(settings[0]["results"][task])[0]
        values = [headline(s["results"][task])[1] for s in settings]
        ax.plot(mflops, values, marker="o", label=f"{task} ({metric})")
        if i == 0:  # label the first curve's points with the steps per token
            for s, x, y in zip(settings, mflops, values, strict=True):
                ax.annotate(f"{s['avg_steps_per_token']:.3g}", (x, y), xytext=(0, 5), textcoords="offset points")
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(sorted(set(mflops)), [f"{x:.3g}" for x in sorted(set(mflops))])
    ax.set_xlabel("forward MFLOPs per token (point labels: recurrence steps per token)")
    ax.set_ylabel("metric")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("lm-eval metrics vs test-time compute")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
