"""Experiment (not part of the package): does a chain model's reach depend on the order the statements are written in?

Answers fresh problems of each hop count written three ways (`init_scale=0`): as generated (shuffled); in forward
order, every statement of a chain after the one defining its operand (`d=0;...;g=d-8`), so each statement could be
resolved as it is read; and in backward order (`g=d-8;...;d=0`), where only the answering position can. Accuracy of
the first answer character after hops + 1 steps and after each of `--steps`. With `--statements` it also scores the
prediction at each statement's `;` against that statement's value (what `train --chain-statement-values` teaches),
by the statement's depth in its chain, on forward-ordered problems. Run from the repository root:
`python docs/experiments/text_order.py modeling_recurrent/checkpoints/chain-tiny` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import random

import torch

from modeling_recurrent.chain_task import (
    Problem,
    accuracy_by_hops,
    chase,
    prompt_batches,
    sample_problems,
)
from modeling_recurrent.chain_training import chain_order
from modeling_recurrent.demo import load


@torch.no_grad()
def answers(model, tokenizer, problems: list[Problem], steps: int) -> float:
    predictions: list[str] = []
    for ids, mask, last in prompt_batches(tokenizer, [p.prompt for p in problems], 100, torch.device("cpu")):
        logits = model(input_ids=ids, attention_mask=mask, num_steps=steps, init_scale=0.0).logits
        best = logits[torch.arange(len(ids)), last].argmax(-1)
        predictions.extend(tokenizer.convert_ids_to_tokens(best.tolist()))
    return accuracy_by_hops(predictions, problems)["accuracy"]


@torch.no_grad()
def statement_values(model, tokenizer, problems: list[Problem], steps: int) -> dict[int, float]:
    """Accuracy of the prediction at each statement's `;` against its value, by the statement's depth."""
    tally: dict[int, list[bool]] = {}
    for problem in problems:
        ids = tokenizer(problem.prompt, return_tensors="pt").input_ids
        best = model(input_ids=ids, num_steps=steps, init_scale=0.0).logits[0].argmax(-1)
        ends = [i for i, char in enumerate(problem.prompt) if char == ";"]
        for statement, end in zip(problem.statements, ends, strict=True):
            depth = len(chase(problem.statements, statement[0])) - 1
            predicted = tokenizer.convert_ids_to_tokens([int(best[end])])[0]
            tally.setdefault(depth, []).append(predicted == str(problem.values[statement[0]]))
    return {depth: sum(hits) / len(hits) for depth, hits in sorted(tally.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a chain model folder")
    parser.add_argument("--n", type=int, default=100, help="problems per hop count")
    parser.add_argument("--hops", default="1,2,3,4,6")
    parser.add_argument("--steps", default="8,32", help="num_steps to answer at besides hops + 1")
    parser.add_argument("--seed", type=int, default=900)
    parser.add_argument("--statements", action="store_true", help="also score statement values by depth")
    args = parser.parse_args()
    tokenizer, model = load(args.model)
    model.eval()
    steps = [int(s) for s in args.steps.split(",")]
    orders = {
        "shuffled": lambda p: p,
        "forward": lambda p: chain_order(p, random.Random(0), forward=1.0),
        "backward": lambda p: chain_order(p, random.Random(0), backward=1.0),
    }
    print("order     hops  " + "  ".join(f"{s:>5}" for s in ["h+1", *steps]))
    for hops in (int(h) for h in args.hops.split(",")):
        base = sample_problems("in-distribution", args.n, args.seed + hops, hops=hops)
        for name, order in orders.items():
            problems = [order(p) for p in base]
            row = [answers(model, tokenizer, problems, s) for s in [hops + 1, *steps]]
            print(f"{name:9} {hops:4}  " + "  ".join(f"{a:5.2f}" for a in row), flush=True)
    if args.statements:
        problems = [
            chain_order(p, random.Random(0), forward=1.0)
            for p in sample_problems("in-distribution", args.n, args.seed, hops=6)
        ]
        for s in [2, 4, *steps]:
            by_depth = statement_values(model, tokenizer, problems, s)
            print(f"statement values after {s} steps, by depth:", {d: round(a, 2) for d, a in by_depth.items()})


if __name__ == "__main__":
    main()
