"""Experiment (not part of the package): does a `train --chain-carry` model carry in every text order?

For fresh 1- and 2-hop problems, answers each one three ways (`init_scale=0`): clean after hops + 1 steps; with the
chain's digits hidden as in training (`chain_training.carry_inputs`: step r sees only the digit its walk reads) after
hops + 1 steps; and hidden after 8 steps. Accuracy is split by how many of the chain's links point backward in the
text (the statement defining a link's operand comes after the statement using it: `g=d-8;...;d=3` is 1 backward link
of 1). With 0 backward links every statement can be resolved from the ones before it; only the answering position
sees all of them. Run from the repository root: `python docs/experiments/carry_order.py runs/carry/checkpoint-last`
(about 15 seconds on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import random
import string
from collections import Counter

import torch

from modeling_recurrent.chain_task import Problem, generate_problem
from modeling_recurrent.chain_training import carry_inputs, read_digits
from modeling_recurrent.deep_supervision import column_states
from modeling_recurrent.demo import load

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("model", help="a model folder trained with --chain-carry")
parser.add_argument("--n", type=int, default=300, help="problems per hop count")
parser.add_argument("--seed", type=int, default=777)
args = parser.parse_args()

tokenizer, model = load(args.model)
base = model.transformer
digit_ids = [tokenizer.convert_tokens_to_ids(d) for d in string.digits]


@torch.no_grad()
def answers(columns: torch.Tensor, steps: set[int]) -> dict[int, int]:
    """The digit read out after each of `steps` for one prompt; columns (1, T, S) as `carry_inputs` lays them out."""
    mask = torch.ones(columns.shape[:2], dtype=torch.long)
    zeros = torch.zeros(*columns.shape[:2], model.config.hidden_size)
    states, ctx = column_states(base, columns, mask, zeros, (0, max(steps)))
    return {r: int(base.readout(states[r - 1], ctx, model.lm_head)[0, -1, digit_ids].argmax()) for r in steps}


def backward_links(problem: Problem) -> int:
    place = {statement[0]: i for i, statement in enumerate(problem.statements)}
    chain = problem.chain
    return sum(place[chain[i - 1]] > place[chain[i]] for i in range(1, len(chain)))


for hops in (1, 2):
    rng = random.Random(args.seed + hops)
    right, total = Counter(), Counter()
    for _ in range(args.n):
        problem = generate_problem(rng, hops)
        ids = torch.tensor([tokenizer.convert_tokens_to_ids(list(problem.prompt))])
        hidden = carry_inputs(ids, [read_digits(problem.statements, problem.target)], digit_ids, rng)
        depth = hops + 1
        results = {
            "clean": answers(ids[..., None], {depth})[depth],
            "hidden": (got := answers(hidden, {depth, 8}))[depth],
            "hidden@8": got[8],
        }
        for kind, digit in results.items():
            for key in ((kind, "all"), (kind, backward_links(problem))):
                right[key] += str(digit) == problem.answer
                total[key] += 1
    print(f"{hops} hop(s), {args.n} problems; accuracy (count) by backward links")
    for kind in ("clean", "hidden", "hidden@8"):
        cells = [f"all {right[kind, 'all'] / total[kind, 'all']:.2f}"]
        cells += [f"{b}: {right[kind, b] / total[kind, b]:.2f} ({total[kind, b]})" for b in range(hops + 1)]
        print(f"  {kind:9s}", " | ".join(cells))
