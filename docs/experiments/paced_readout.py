"""Experiment (not part of the package): what a `--chain-paced` model's readout says after each recurrence step.

For fresh in-distribution problems of each hop count, reads the answering position's logits after r = 1, 2, ...
steps (`init_scale=0`) and prints how often the two likeliest tokens include the variable r links down the chase and
the running offset, value(query) - value(that variable) mod 10 (the two paced targets, each trained half the time with
`--chain-paced-offsets 0.5`), and how often the likeliest token is the answer. A link whose offset is in the top two
is one the model has summed. Run from the repository root: `python docs/experiments/paced_readout.py
runs/grow/checkpoint-last` (about 30 seconds on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import modeling_recurrent  # noqa: F401  (registers the Auto classes)
from modeling_recurrent.chain_task import MODULUS, chase, generate_problem

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("model", help="a model folder trained with --chain-paced")
parser.add_argument("--n", type=int, default=100, help="problems per hop count")
parser.add_argument("--hops", default="2,3,4", help="comma-separated hop counts")
parser.add_argument("--seed", type=int, default=4242, help="hop count h draws its problems from seed + h")
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(args.model)
model = AutoModelForCausalLM.from_pretrained(args.model).eval()
for hops in map(int, args.hops.split(",")):
    rng = random.Random(args.seed + hops)
    problems = [generate_problem(rng, hops) for _ in range(args.n)]
    tokenizer.padding_side = "left"
    batch = tokenizer([p.prompt for p in problems], return_tensors="pt", padding=True)
    cells = []
    for steps in range(1, hops + 3):
        with torch.no_grad():
            logits = model(**batch, num_steps=steps, init_scale=0.0).logits[:, -1]
        top_two = logits.topk(2, dim=-1).indices.tolist()
        variable = offset = answer = 0
        for problem, top in zip(problems, top_two, strict=True):
            path = chase(problem.statements, problem.target)
            reached = path[min(steps, len(path) - 1)]
            running = (problem.values[problem.target] - problem.values[reached]) % MODULUS
            variable += tokenizer.convert_tokens_to_ids(reached) in top
            offset += tokenizer.convert_tokens_to_ids(str(running)) in top
            answer += tokenizer.convert_tokens_to_ids(problem.answer) == top[0]
        n = len(problems)
        cells.append(f"r{steps}: var {variable / n:.2f} off {offset / n:.2f} ans {answer / n:.2f}")
    print(f"{hops} hops | " + " | ".join(cells), flush=True)
