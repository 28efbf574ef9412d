"""Experiment (not part of the package): what the running offset of a `walk_supervision.py` run gets wrong.

For fresh in-distribution problems of 2, 3 and 4 hops, reads the answering state after each step of the walk with the
run's own training probes (OUT/state.pt) and prints, per hop count and step, how often the pointer and the running
offset are right and, of the wrong offsets, how many equal the right sum with one link's offset left out, or the
newest link's offset alone. Errors spread evenly over those (each near 1 in 10) mean nothing is being summed; one
that dominates would mean one addend is dropped. Run from the repository root: `python
docs/experiments/offset_errors.py runs/walk2` (a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import random
from collections import Counter

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import modeling_recurrent  # noqa: F401  (registers the Auto classes)
from modeling_recurrent.chain_task import MODULUS, SPLITS, chase, generate_problem
from modeling_recurrent.walk_probe import answer_states, walk_labels

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("run", help="a walk_supervision.py OUT folder (ckpt/ and state.pt)")
parser.add_argument("--tokenizer", default="modeling_recurrent/checkpoints/chain-tiny")
parser.add_argument("--n", type=int, default=300, help="problems per hop count")
parser.add_argument("--seed", type=int, default=5)
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
model = AutoModelForCausalLM.from_pretrained(f"{args.run}/ckpt").eval()
probes = torch.load(f"{args.run}/state.pt", weights_only=False)["probes"]
rng, spec = random.Random(args.seed), SPLITS["in-distribution"]
for hops in (2, 3, 4):
    problems = [
        generate_problem(rng, hops, n_distractors=spec.n_distractors, distractor_hops=spec.distractor_hops)
        for _ in range(args.n)
    ]
    states = answer_states(model, tokenizer, [p.prompt for p in problems], hops)  # (steps, N, D)
    states = F.rms_norm(states, (states.shape[-1],))
    pointers = (states @ probes["ptr.weight"].T + probes["ptr.bias"]).argmax(-1)
    offsets = (states @ probes["off.weight"].T + probes["off.bias"]).argmax(-1)
    for r in range(1, hops + 1):
        counts = Counter()
        for i, problem in enumerate(problems):
            path, labels = chase(problem.statements, problem.target), walk_labels(problem, r)
            values = [problem.values[name] for name in path[: r + 1]]
            links = [(a - b) % MODULUS for a, b in zip(values, values[1:], strict=False)]  # link k's offset
            right, got = labels.offset[-1], int(offsets[r - 1, i])
            counts["pointer"] += int(pointers[r - 1, i]) == labels.pointer[-1]
            counts["offset"] += got == right
            if got != right:
                counts.update(f"link {k + 1} left out" for k, c in enumerate(links) if got == (right - c) % MODULUS)
                counts["newest link alone"] += got == links[-1]
        print(f"{hops} hops, step {r}:", ", ".join(f"{k} {v / args.n:.2f}" for k, v in sorted(counts.items())))
