"""`recurrent-depth demo`: the paper's central claim on a CPU-trained model.

Fresh variable-chain problems are answered with greedy `generate` at increasing recurrence depth, to show how
accuracy changes with num_steps, with no extra parameters and no chain-of-thought tokens, on the trained chain lengths
(hops 0-6) and on longer ones (7-10, the harder split). Prints a table (accuracy by hop count x num_steps, with the
compute each costs), writes a plot and a JSON, and shows a few problems answered at low and high depth.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .cli import parse_integers

DEFAULT_MODEL = Path(__file__).resolve().parent / "checkpoints" / "chain-tiny"
DEFAULT_STEPS = "1,2,4,8,16,32,64"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="model folder (default: the shipped chain model)")
    parser.add_argument("--steps", default=DEFAULT_STEPS, help="comma-separated num_steps to evaluate")
    parser.add_argument("--n", type=int, default=120, help="problems per split (in-distribution and harder)")
    parser.add_argument(
        "--seed", type=int, default=2026, help="seed of the fresh problems and of the random initial states"
    )
    parser.add_argument("--batch-size", type=int, default=128, help="problems per generate call (left-padded)")
    parser.add_argument("--out", default="demo-out", help="output directory (created if missing)")


def load(model_path: str):
    """Tokenizer and model of a folder, through the Auto classes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import modeling_recurrent  # noqa: F401  (registers the Auto classes)
    from modeling_recurrent.serialization_recurrent_depth import unreadable_files

    folder = Path(model_path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (not a model folder)")
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{folder}: no tokenizer files (tokenizer.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (ValueError, OSError) as error:  # Transformers names neither a truncated file nor a missing tokenizer.json
        bad = unreadable_files(folder)
        reason = f"truncated or corrupt file {'; '.join(bad)}" if bad else error
        if not bad and not (folder / "tokenizer.json").is_file():
            reason = f"no {folder}/tokenizer.json"
        raise ValueError(f"{folder}: cannot load the tokenizer: {reason}") from error
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return tokenizer, model


@torch.no_grad()
def answer(model, tokenizer, prompts: list[str], num_steps: int, batch_size: int) -> list[str]:
    """The first character greedy generate produces after each prompt (left-padded batches)."""
    answers = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(
            prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
        )
        out = model.generate(
            **enc, num_steps=num_steps, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        new = out[:, enc.input_ids.shape[1] :]
        answers += [text[:1] for text in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


def run(args: argparse.Namespace) -> int:
    from .chain_task import accuracy_by_hops, sample_problems
    from .flops import flops_per_token

    steps = parse_integers(args.steps, "--steps")
    for name, value in (("--n", args.n), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    tokenizer, model = load(args.model)
    torch.manual_seed(args.seed)
    splits = {name: sample_problems(name, args.n, seed=args.seed) for name in ("in-distribution", "harder")}
    results: dict[str, dict[int, dict]] = {name: {} for name in splits}
    predictions: dict[tuple[str, int], list[str]] = {}
    with tqdm(total=len(steps) * len(splits), desc="num_steps x split") as bar:
        for r in steps:
            for name, problems in splits.items():
                predictions[name, r] = answer(model, tokenizer, [p.prompt for p in problems], r, args.batch_size)
                results[name][r] = accuracy_by_hops(predictions[name, r], problems)
                bar.update(1)
    context = sum(len(p.prompt) for p in splits["in-distribution"]) // args.n
    compute = {r: flops_per_token(model.config, r, context) for r in steps}
    print_table(results, steps, compute, model.config)
    print_examples(splits["in-distribution"], predictions, steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps(
            {
                "model": str(args.model),
                "seed": args.seed,
                "n": args.n,
                "flops_per_token": compute,
                "results": {s: {str(r): v for r, v in by_r.items()} for s, by_r in results.items()},
            },
            indent=2,
        )
    )
    plot(results, steps, out / "accuracy_vs_steps.png")
    print(f"\nwrote {out / 'results.json'} and {out / 'accuracy_vs_steps.png'}")
    return 0


def print_table(results: dict, steps: list[int], compute: dict, config) -> None:
    hops = sorted({h for by_r in results.values() for v in by_r.values() for h in v["by_hops"]})
    header = f"{'num_steps':>9} {'depth':>5} {'MFLOP/tok':>9} | " + " ".join(f"h{h:<4}" for h in hops)
    header += " | in-dist  harder"
    print("\nAccuracy of the first generated character by hop count (in-distribution split h0-h6, harder h7-h10)")
    print(header)
    print("-" * len(header))
    for r in steps:
        cells = []
        for h in hops:
            value = next((v["by_hops"][h] for v in (results[s][r] for s in results) if h in v["by_hops"]), None)
            cells.append(f"{value:5.2f}" if value is not None else "    -")
        print(
            f"{r:>9} {config.effective_depth(r):>5} {compute[r] / 1e6:>9.1f} | "
            + " ".join(cells)
            + f" | {results['in-distribution'][r]['accuracy']:7.3f} {results['harder'][r]['accuracy']:7.3f}"
        )


def print_examples(problems: list, predictions: dict, steps: list[int], count: int = 4) -> None:
    """The deepest problems that the most steps answer and the fewest do not (what depth buys), among hop counts the
    most steps answer at least half the time, then the deepest others."""
    from .chain_task import accuracy_by_hops

    low, high = steps[0], steps[-1]
    print(f"\nA few problems at num_steps {low} and {high}:")
    low_answers, high_answers = predictions["in-distribution", low], predictions["in-distribution", high]
    # A lucky guess at a hop count the model does not solve (one in ten digits) is not what depth buys.
    solved = accuracy_by_hops(high_answers, problems)["by_hops"]
    gained = {
        i
        for i, p in enumerate(problems)
        if high_answers[i][:1] == p.answer != low_answers[i][:1] and solved[p.hops] >= 0.5
    }
    for i in sorted(range(len(problems)), key=lambda i: (i not in gained, -problems[i].hops))[:count]:
        problem = problems[i]
        print(
            f"  {problem.prompt:<60} answer {problem.answer} | r={low}: {low_answers[i]!r}"
            f"  r={high}: {high_answers[i]!r}  ({problem.hops} hops)"
        )


def plot(results: dict, steps: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_r in results.items():
        ax.plot(steps, [by_r[r]["accuracy"] for r in steps], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(steps, [str(r) for r in steps])
    ax.set_xlabel("num_steps (recurrence at test time)")
    ax.set_ylabel("accuracy (first generated character)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Variable-chain task: more recurrence, better reasoning")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
