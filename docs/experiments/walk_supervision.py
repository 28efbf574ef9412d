"""Experiment (not part of the package): teach the core to iterate the chain look-up in its own state.

`recurrent-depth trace --walk-probe` shows the shipped model's state names the first link of a chain after step 1
and nothing more after later steps: the coda re-reads the statements. This script fine-tunes a chain model with
three extra signals, each read at the answering position after every recurrence step under gradient:

- walk probes: two training-only linear heads (discarded at the end) on the RMS-normalised state, one for the
  variable an iterated look-up has reached after r steps and one for the running offset
  (value(query) - value(variable) mod 10); once the walk is over, "done" and the answer (`walk_probe.walk_labels`);
- the answer through the coda and through the final norm and head (no coda) only from the step the walk ends;
- `--attn-distill W`: the core's attention at step r + 1 should look where step 1 looks when the prompt asks for the
  variable reached after r links instead (`?d=` for `?g=` with `g=d-8`): KL(teacher || student) of each core block's
  heads at the answering position, the teacher being the same model without gradient. Step 1's look-up already
  works; this makes later steps reuse it with the query taken from the state.
- `--collapse W`: the RMS-normalised state after step r (r >= 2) should equal, in mean squared error, the state after
  step 1 on the prompt with the walk's first r links folded into one statement (`g=q+5` for `g=d-8;d=q+3`), the teacher
  again the same model without gradient: one format for the running offset, whichever step wrote it.
- `--hide-visited P`: in a fraction P of the batches the answering position cannot attend, at step r, to the
  statements of the links read before step r (after the walk, to none of the chain): their offsets can come only
  from the state. Without it a walk can re-read them (the query names the first link's statement; the pointer names
  the one it defines and the one that uses it), which carries two links and never needs a running sum.

`--grow-core N` first grows the core to N blocks (the new ones' output projections zeroed, so they start as a
re-normalisation). Checkpoints (model, probes, optimizer) go to OUT/ckpt and OUT/state.pt every 100 steps; rerunning
with the same OUT resumes. Run from the repository root; 2.3-2.6 s per step on 2 CPU cores with a 2-block core.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, AutoTokenizer

import modeling_recurrent  # noqa: F401  (registers the Auto classes)
from modeling_recurrent.chain_task import (
    IGNORE_INDEX,
    MODULUS,
    SPLITS,
    ChainEncoder,
    chase,
    evaluate_first_token,
    format_prompt,
    generate_problem,
)
from modeling_recurrent.chain_training import chain_order
from modeling_recurrent.layers_recurrent_depth import eager_attention
from modeling_recurrent.walk_probe import DONE, label_tensors, walk_labels

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("out")
parser.add_argument("--model", default="modeling_recurrent/checkpoints/chain-tiny")
parser.add_argument("--steps", type=int, default=4000, help="length of the cosine schedule (to 0.3 x lr)")
parser.add_argument("--lr", type=float, default=5e-4)
parser.add_argument("--probe-lr", type=float, default=3e-3)
parser.add_argument("--batch", type=int, default=32)
parser.add_argument("--grad-steps", type=int, default=8, help="recurrence steps under gradient (the last ones)")
parser.add_argument("--probe-weight", type=float, default=1.0)
parser.add_argument("--direct-weight", type=float, default=1.0, help="answer read without the coda, once resolved")
parser.add_argument("--backward", type=float, default=0.5, help="chance of a problem in backward order")
parser.add_argument("--max-hops", type=int, default=6)
parser.add_argument("--seed", type=int, default=11)
parser.add_argument("--eval-every", type=int, default=200)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--grow-core", type=int, default=0)
parser.add_argument("--attn-distill", type=float, default=0.0)
parser.add_argument("--collapse", type=float, default=0.0, help="weight of the collapsed-prompt state match")
parser.add_argument("--hide-visited", type=float, default=0.0, help="chance a batch hides the links already read")
args = parser.parse_args()
torch.set_num_threads(args.threads)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

tokenizer = AutoTokenizer.from_pretrained(args.model)
model = AutoModelForCausalLM.from_pretrained(args.model)
if args.grow_core:
    torch.manual_seed(args.seed)
    grown = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model, n_core=args.grow_core))
    grown.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        for block in grown.transformer.core_block[model.config.n_core :]:
            block.attn.proj.weight.zero_()
            block.mlp.proj.weight.zero_()
    model = grown
width = model.config.hidden_size
probes = torch.nn.ModuleDict({"ptr": torch.nn.Linear(width, DONE + 1), "off": torch.nn.Linear(width, 10)})
start, saved = 0, None
if (out / "state.pt").exists():
    saved = torch.load(out / "state.pt", weights_only=False)
    model = AutoModelForCausalLM.from_pretrained(out / "ckpt")
    probes.load_state_dict(saved["probes"])
    start = saved["step"]
base = model.transformer

# The attention interface discards the weights; a registered copy of eager attention keeps the core blocks' ones.
CAPTURE: dict = {"on": False, "weights": [], "hide": None}


def capture_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    if CAPTURE["on"] and CAPTURE["hide"] is not None:
        attention_mask = hide_visited(attention_mask, query, key)
    output, weights = eager_attention(module, query, key, value, attention_mask, scaling, dropout)
    if CAPTURE["on"]:
        CAPTURE["weights"].append(weights)
    return output, weights


def hide_visited(mask, query, key):
    """`mask` as booleans (B, 1, T, T) with the answering position of each row blind, in the current step, to the
    statements of the links its walk has already read: what they said can only come from the state."""
    hide, positions = CAPTURE["hide"]
    step = len(CAPTURE["weights"]) // len(base.core_block)
    if mask is None:
        mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool).tril()
    elif mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    mask = mask.expand(query.shape[0], 1, query.shape[2], key.shape[2]).clone()
    rows = torch.arange(len(positions))
    mask[rows, 0, positions] &= ~hide[step, :, : key.shape[2]]
    return mask


if args.attn_distill or args.hide_visited:  # hiding counts steps by the captured weights
    AttentionInterface.register("capture", capture_attention)
    model.config._attn_implementation = "capture"
    for block in base.core_block:
        # Training steps only: evaluation would pile up every step's weights until the next batch.
        block.attn.register_forward_pre_hook(lambda module, inputs: CAPTURE.__setitem__("on", module.training))
        block.attn.register_forward_hook(lambda module, inputs, output: CAPTURE.__setitem__("on", False))
optimizer = torch.optim.AdamW(
    [{"params": model.parameters(), "lr": args.lr}, {"params": probes.parameters(), "lr": args.probe_lr}],
    betas=(0.9, 0.95),
    weight_decay=0.0,
)
if saved:
    optimizer.load_state_dict(saved["opt"])
encoder = ChainEncoder(tokenizer)
spec = SPLITS["in-distribution"]


def batch(step):
    """Batch `step`: the encoded problems, their answering positions, each problem's `walk_labels` over the most
    steps a run draws, (for --attn-distill) the prompts re-queried at a random link r, those r, (for --collapse) the
    prompts with r links folded, and (if this batch hides, --hide-visited) `visited_keys` (steps, B, T)."""
    rng = random.Random(f"{args.seed}-{step}")
    hiding = random.Random(f"hide-{step}").random() < args.hide_visited
    most_steps = 2 * args.grad_steps + 4
    texts, positions, labels, requeried, links, collapsed, visited = [], [], [], [], [], [], []
    for _ in range(args.batch):
        hops = rng.randint(0, args.max_hops)
        problem = generate_problem(rng, hops, n_distractors=spec.n_distractors, distractor_hops=spec.distractor_hops)
        problem = chain_order(problem, rng, args.backward)
        texts.append(problem.prompt + problem.answer)
        positions.append(len(problem.prompt) - 1)
        labels.append(walk_labels(problem, most_steps))
        path = chase(problem.statements, problem.target)  # path[r]: the variable step r reaches
        r = rng.randint(1, hops) if hops else 0
        requeried.append(problem.prompt[:-2] + path[r] + "=")
        links.append(r)
        if args.collapse:
            collapsed.append(collapse(problem, path, r) if r >= 2 else problem.prompt)
        if hiding:
            visited.append(visited_keys(problem, path, most_steps))
    encoded = encoder(texts, [[p + 1] for p in positions])
    teacher = encoder(requeried, [[] for _ in requeried], eos=False) if args.attn_distill else None
    collapsed = encoder(collapsed, [[] for _ in collapsed], eos=False) if args.collapse else None
    hide = None
    if hiding:  # (steps, B, T), padded to the batch's width
        length = encoded["input_ids"].shape[1]
        hide = torch.stack([F.pad(v, (0, length - v.shape[1])) for v in visited], dim=1)
    return encoded, torch.tensor(positions), label_tensors(labels), teacher, links, collapsed, hide


def visited_keys(problem, path, most_steps):
    """(most_steps, len(prompt)) booleans: at step r, the characters of the target chain's statements read before
    step r (none at step 1; from step hops + 2 the whole chain, the root too)."""
    span, at = {}, 0
    for statement in problem.statements:
        span[statement[0]] = slice(at, at + len(statement))
        at += len(statement) + 1
    keys = torch.zeros(most_steps, len(problem.prompt), dtype=torch.bool)
    for step in range(1, most_steps):
        for name in path[:step]:
            keys[step, span[name]] = True
    return keys


def collapse(problem, path, r):
    """`problem`'s prompt with the first `r` links of its walk `path` (`chase` from the target) folded into one
    statement (`g=q+5` for `g=d-8;d=q+3`, r = 2): after step 1 on it the walk is where it is after step r on the
    original."""
    offset = (problem.values[problem.target] - problem.values[path[r]]) % MODULUS
    statements = []
    for statement in problem.statements:
        if statement[0] == problem.target:
            statements.append(f"{problem.target}={path[r]}+{offset}")
        elif statement[0] not in path[1:r]:
            statements.append(statement)
    return format_prompt(statements, problem.target)


def teacher_attention(teacher_ids, positions):
    """Each core block's attention (B, H, T) at the answering position in step 1 of the re-queried prompts."""
    rows = torch.arange(len(positions))
    with torch.no_grad():
        CAPTURE["weights"] = []
        embeds, ctx = base.encode(teacher_ids["input_ids"], teacher_ids["attention_mask"])
        base.core_step(base.initial_state(embeds, None, False, None, model.config.init_scale), embeds, ctx, 0)
        return [w[rows, :, positions] for w in CAPTURE["weights"]]


def collapsed_states(collapsed_ids):
    """The RMS-normalised state (B, D) at the last position after step 1 of the collapsed prompts."""
    last = collapsed_ids["attention_mask"].sum(-1) - 1
    with torch.no_grad():
        embeds, ctx = base.encode(collapsed_ids["input_ids"], collapsed_ids["attention_mask"])
        state = base.core_step(base.initial_state(embeds, None, False, None, model.config.init_scale), embeds, ctx, 0)
        return F.rms_norm(state[torch.arange(len(last)), last], (width,))


def distillation(teacher, positions, links, total, hidden):
    """KL(teacher || student) of the core attention at step r + 1 (the student's weights as captured, every step
    in order) from the teacher's at step 1, averaged over heads, blocks and rows with a link to re-query. With
    `hidden` (steps, B, T), the teacher is renormalised over what the student could see."""
    n_core, first = len(base.core_block), total - args.grad_steps
    terms = []
    for i, r in enumerate(links):
        if r == 0 or not first <= r < total:  # nothing to re-query, or step r + 1 ran without gradient or not at all
            continue
        for layer in range(n_core):
            t = teacher[layer][i]
            if hidden is not None:
                t = t * ~hidden[r, i, : t.shape[-1]]
                t = t / t.sum(-1, keepdim=True).clamp_min(1e-9)
            s = CAPTURE["weights"][r * n_core + layer][i, :, positions[i], : t.shape[-1]]  # (H, T)
            terms.append((t * (torch.log(t + 1e-9) - torch.log(s + 1e-9))).sum(-1).mean())
    return torch.stack(terms).mean() if terms else torch.zeros(())


def run(step):
    encoded, positions, walk, teacher_ids, links, collapsed_ids, hide = batch(step)
    draw = random.Random(step).random() < 0.7  # mostly exactly --grad-steps, sometimes more (the first without grad)
    total = args.grad_steps if draw else random.Random(-step).randint(args.grad_steps + 1, 2 * args.grad_steps + 4)
    rows = torch.arange(len(positions))
    teacher = teacher_attention(teacher_ids, positions) if args.attn_distill else None
    target_states = collapsed_states(collapsed_ids) if args.collapse else None
    CAPTURE["weights"] = []
    CAPTURE["hide"] = None if hide is None else (hide, positions)
    embeds, ctx = base.encode(encoded["input_ids"], encoded["attention_mask"])
    state = base.initial_state(embeds, None, False, None, model.config.init_scale)
    states = []
    base.iterate(state, embeds, ctx, (total - args.grad_steps, args.grad_steps), states.append)
    CAPTURE["hide"] = None
    distill = distillation(teacher, positions, links, total, hide) if args.attn_distill else torch.zeros(())
    losses, stats = [], {"ptr": 0.0, "off": 0.0, "distill": distill.item(), "collapse": 0.0}
    match = torch.zeros(())
    if args.collapse:
        first, matched = total - args.grad_steps, []
        for i, r in enumerate(links):
            if r >= 2 and first < r <= total:  # step r ran under gradient
                h = F.rms_norm(states[r - 1][i, positions[i]], (width,))
                matched.append((h - target_states[i]).pow(2).mean())
        if matched:
            match = torch.stack(matched).mean()
            stats["collapse"] = match.item()
    later = {"ptr": [0, 0], "off": [0, 0]}  # [hits, rows] still walking at steps 2+: beyond step 1
    for r, s in enumerate(states[total - args.grad_steps :], start=total - args.grad_steps + 1):
        pointer, offset, resolved = walk["pointer"][:, r - 1], walk["offset"][:, r - 1], ~walk["walking"][:, r - 1]
        h = F.rms_norm(s[rows, positions], (width,))
        pointer_logits, offset_logits = probes["ptr"](h), probes["off"](h)
        loss = args.probe_weight * (F.cross_entropy(pointer_logits, pointer) + F.cross_entropy(offset_logits, offset))
        stats["ptr"] += (pointer_logits.argmax(-1) == pointer).float().mean().item() / args.grad_steps
        stats["off"] += (offset_logits.argmax(-1) == offset).float().mean().item() / args.grad_steps
        if r >= 2:
            walking = walk["walking"][:, r - 1]
            for key, logits, target in (("ptr", pointer_logits, pointer), ("off", offset_logits, offset)):
                later[key][0] += (logits.argmax(-1) == target)[walking].sum().item()
                later[key][1] += walking.sum().item()
        if resolved.any():
            labels = encoded["labels"].clone()
            labels[rows[~resolved], positions[~resolved] + 1] = IGNORE_INDEX  # the answer only once resolved
            logits = base.readout(s, ctx, model.lm_head)[:, :-1]
            loss = loss + F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
            if args.direct_weight:
                direct = model.lm_head(base.ln_f(s[rows[resolved], positions[resolved]])).float()
                loss = loss + args.direct_weight * F.cross_entropy(direct, offset[resolved])  # the answer
        losses.append(loss)
    CAPTURE["weights"] = []
    stats.update({f"later_{key}": hits / max(1, rows) for key, (hits, rows) in later.items()})
    return torch.stack(losses).mean() + args.attn_distill * distill + args.collapse * match, stats


@torch.no_grad()
def evaluate():
    model.eval()
    results = {
        n: evaluate_first_token(model, tokenizer, "in-distribution", 350, seed=777, num_steps=n, init_scale=0.0)
        for n in (1, 4, 8, 32)
    }
    model.train()
    return {n: (round(v["accuracy"], 3), [round(x, 2) for x in v["by_hops"].values()]) for n, v in results.items()}


def lr_factor(step):
    warmup = 50
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, args.steps - warmup))
    return 0.3 + 0.7 * 0.5 * (1 + math.cos(math.pi * progress))


def save(step):
    model.save_pretrained(out / "ckpt.tmp")
    torch.save({"probes": probes.state_dict(), "opt": optimizer.state_dict(), "step": step}, out / "state.tmp")
    shutil.rmtree(out / "ckpt", ignore_errors=True)
    (out / "ckpt.tmp").rename(out / "ckpt")
    (out / "state.tmp").rename(out / "state.pt")


model.train()
STATS = ("loss", "ptr", "off", "later_ptr", "later_off", "distill", "collapse")
started, totals = time.time(), dict.fromkeys(STATS, 0.0) | {"n": 0}
for step in range(start, args.steps):
    for group, lr in zip(optimizer.param_groups, (args.lr, args.probe_lr), strict=True):
        group["lr"] = lr * lr_factor(step)
    loss, stats = run(step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([*model.parameters(), *probes.parameters()], 1.0)
    optimizer.step()
    totals["loss"] += loss.item()
    totals["n"] += 1
    for key in STATS[1:]:
        totals[key] += stats[key]
    if (step + 1) % 25 == 0:
        n = totals.pop("n")
        record = {"step": step + 1, **{k: round(v / n, 4) for k, v in totals.items()}}
        record["s_per_step"] = round((time.time() - started) / n, 2)
        started, totals = time.time(), dict.fromkeys(STATS, 0.0) | {"n": 0}
        if (step + 1) % args.eval_every == 0:
            record["eval"] = evaluate()
        print(json.dumps(record), flush=True)
        with open(out / "log.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")
    if (step + 1) % 100 == 0:
        save(step + 1)
