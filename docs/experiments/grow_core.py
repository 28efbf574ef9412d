"""Experiment (not part of the package): give a trained model's core one more layer without changing its answers much.

The new layer goes after the last core layer with its attention and MLP output projections at zero, so it reduces to its
two sandwich norms, n4(n2(x)). The input x is the previous layer's n4 output, whose root mean square is close to that of
its norm weight; setting both new norm weights to that constant makes the new layer nearly the identity (huginn's
sandwich blocks; a pre-norm block would be the identity with the projections at zero alone). The grown model is saved
for fine-tuning with `recurrent-depth train --model OUT`. Run from the repository root: `python
docs/experiments/grow_core.py modeling_recurrent/checkpoints/chain-tiny runs/grow/init`.
"""

from __future__ import annotations

import argparse
import copy

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import modeling_recurrent  # noqa: F401  (registers the model type)

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("model", help="a model folder")
parser.add_argument("out", help="folder for the grown model")
parser.add_argument("--layers", type=int, default=1, help="core layers to add")
parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts the two models are compared on")
args = parser.parse_args()

small = AutoModelForCausalLM.from_pretrained(args.model).eval()
if small.config.block_style != "sandwich":
    parser.error("the near-identity layer is built for sandwich blocks (block_style 'sandwich')")
config = copy.deepcopy(small.config)
old = config.n_core
config.n_core = old + args.layers
grown = AutoModelForCausalLM.from_config(config, dtype=small.dtype).eval()
state = small.state_dict()
last = f"transformer.core_block.{old - 1}."
scale = state[last + "norm_4.weight"].float().pow(2).mean().sqrt()
for layer in range(old, old + args.layers):
    prefix = f"transformer.core_block.{layer}."
    for key in [k for k in state if k.startswith(last)]:
        state[prefix + key[len(last) :]] = state[key].clone()
    state[prefix + "attn.proj.weight"].zero_()
    state[prefix + "mlp.proj.weight"].zero_()
    state[prefix + "norm_2.weight"].fill_(scale)
    state[prefix + "norm_4.weight"].fill_(scale)
grown.load_state_dict(state, strict=True)
grown.save_pretrained(args.out)
tokenizer = AutoTokenizer.from_pretrained(args.model)
tokenizer.save_pretrained(args.out)

torch.manual_seed(args.seed)
first_plain = max(tokenizer.all_special_ids) + 1  # the special tokens come first in the chain tokenizer
ids = torch.randint(first_plain, config.vocab_size, (4, 40))
with torch.no_grad():
    a = small(ids, num_steps=8, init_scale=0).logits
    b = grown(ids, num_steps=8, init_scale=0).logits
print(f"core layers {old} -> {config.n_core}; norm scale {float(scale):.3f}")
print(f"max |logit difference| at 8 steps: {float((a - b).abs().max()):.3f} (logit scale {float(a.abs().mean()):.2f})")
