"""What the latent state holds while a chain is resolved: linear probes on the answering position after each step.

An iterated look-up from the query `?q=` has, after r steps of an h-hop chain, reached the variable r links away
(`chase(...)[r]`) and summed the offsets on the way: value(q) - value(that variable) mod 10. From r = h + 1 on the
walk is over and the sum is the answer. `walk_probe` fits one linear probe per step and per quantity on the state
of the answering position (after the final norm's RMS scaling, no coda) and scores it on held-out problems. A probe
that reads the quantity shows the state carries it; the coda, which attends to every position, may still compute
the answer without it, which is why the probes read the state and not the logits.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .chain_task import MODULUS, VARIABLES, Problem, chase, prompt_batches, sample_problems

if TYPE_CHECKING:
    from .modeling_recurrent_depth import RecurrentDepthForCausalLM

DONE = len(VARIABLES)  # the pointer's class once the walk has read the chain's literal


def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class WalkLabels:
    """Per step r = 1..num_steps (index r - 1) of one problem: `walking` whether the chain still has links left
    after r look-ups (r <= hops), `pointer` the variable reached (its index in VARIABLES, DONE once the walk is
    over) and `offset` the running sum (the answer once the walk is over)."""

    walking: tuple[bool, ...]
    pointer: tuple[int, ...]
    offset: tuple[int, ...]


def walk_labels(problem: Problem, num_steps: int) -> WalkLabels:
    """The labels of an iterated look-up over `num_steps` steps (`?g=` for `g=d-8;d=0`: step 1 reached `d` with
    offset 2, step 2 is done with answer 2)."""
    _check_positive("num_steps", num_steps)
    path = chase(problem.statements, problem.target)
    value = problem.values[problem.target]
    walking, pointer, offset = [], [], []
    for r in range(1, num_steps + 1):
        walking.append(r < len(path))
        pointer.append(VARIABLES.index(path[r]) if r < len(path) else DONE)
        offset.append((value - problem.values[path[r]]) % MODULUS if r < len(path) else value)
    return WalkLabels(tuple(walking), tuple(pointer), tuple(offset))


def label_tensors(labels: Sequence[WalkLabels]) -> dict[str, torch.Tensor]:
    """`walking`, `pointer` and `offset` of many problems' labels as tensors (N, num_steps)."""
    return {key: torch.tensor([getattr(label, key) for label in labels]) for key in ("walking", "pointer", "offset")}


@torch.no_grad()
def answer_states(
    model: RecurrentDepthForCausalLM,
    tokenizer,
    prompts: Sequence[str],
    num_steps: int,
    *,
    init_scale: float = 0.0,
    batch_size: int = 64,
) -> torch.Tensor:
    """Core states (num_steps, N, D) at each prompt's last character after steps 1..num_steps, float32 on the CPU.

    The same pieces as the forward pass (prelude, initial state, `iterate`), without the coda; `init_scale` 0 makes
    them deterministic."""
    base, chunks = model.transformer, []
    for ids, mask, last in prompt_batches(tokenizer, prompts, batch_size, model.device):
        embeds, ctx = base.encode(ids, mask)
        states: list[torch.Tensor] = []
        state = base.initial_state(embeds, None, False, None, init_scale)
        base.iterate(state, embeds, ctx, (num_steps, 0), states.append)
        rows = torch.arange(len(ids), device=ids.device)
        chunks.append(torch.stack([s[rows, last] for s in states]).float().cpu())
    return torch.cat(chunks, dim=1)


def fit_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    classes: int,
    *,
    iterations: int = 300,
    lr: float = 0.02,
    weight_decay: float = 1e-3,
) -> float:
    """Held-out accuracy of a multinomial logistic regression (a linear probe) from features (N, D) to labels (N,),
    fitted full-batch with Adam on RMS-normalised features (the scale the final norm would see)."""
    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError("fit_probe needs at least one training and one test row")
    probe = torch.nn.Linear(train_x.shape[-1], classes)
    torch.nn.init.zeros_(probe.weight)  # the loss is convex: a fixed start gives the same probe for the same data
    torch.nn.init.zeros_(probe.bias)
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    x = F.rms_norm(train_x, train_x.shape[-1:])
    with torch.enable_grad():
        for _ in range(iterations):
            optimizer.zero_grad()
            F.cross_entropy(probe(x), train_y).backward()
            optimizer.step()
    with torch.no_grad():
        predicted = probe(F.rms_norm(test_x, test_x.shape[-1:])).argmax(-1)
    return (predicted == test_y).float().mean().item()


def majority_rate(train_y: torch.Tensor, test_y: torch.Tensor) -> float:
    """Test accuracy of always answering the most common training label: the floor a probe must beat."""
    most = Counter(train_y.tolist()).most_common(1)[0][0]
    return (test_y == most).float().mean().item()


def walk_probe(
    model: RecurrentDepthForCausalLM,
    tokenizer,
    *,
    num_steps: int = 7,
    n_fit: int = 2000,
    n_test: int = 500,
    seed: int = 0,
    init_scale: float = 0.0,
) -> list[dict]:
    """Per step r = 1..num_steps: held-out accuracy of linear probes for the pointer and the running offset on
    the problems still walking at r, and for the answer on those whose walk is over, each with its row count and
    the majority-label floor. Fitted on `n_fit` fresh in-distribution problems (seed `seed`), tested on `n_test`
    others (seed `seed + 1`)."""
    _check_positive("n_fit", n_fit)
    _check_positive("n_test", n_test)
    splits = []
    for count, split_seed in ((n_fit, seed), (n_test, seed + 1)):
        problems = sample_problems("in-distribution", count, split_seed)
        states = answer_states(model, tokenizer, [p.prompt for p in problems], num_steps, init_scale=init_scale)
        splits.append((states, label_tensors([walk_labels(p, num_steps) for p in problems])))
    (fit_states, fit), (test_states, test) = splits
    report = []
    for r in range(num_steps):
        row: dict = {"step": r + 1}
        for name, key, classes, walking in (
            ("pointer", "pointer", DONE, True),
            ("offset", "offset", MODULUS, True),
            ("answer", "offset", MODULUS, False),
        ):
            fit_rows, test_rows = fit["walking"][:, r] == walking, test["walking"][:, r] == walking
            entry: dict[str, int | float | None] = {
                "fit": int(fit_rows.sum()),
                "test": int(test_rows.sum()),
                "accuracy": None,
                "majority": None,
            }
            if entry["fit"] and entry["test"]:
                fit_y, test_y = fit[key][fit_rows, r], test[key][test_rows, r]
                entry["accuracy"] = fit_probe(
                    fit_states[r, fit_rows], fit_y, test_states[r, test_rows], test_y, classes
                )
                entry["majority"] = majority_rate(fit_y, test_y)
            row[name] = entry
        report.append(row)
    return report


def format_report(report: list[dict]) -> str:
    """The probe report as a table: accuracy (majority floor) per step for pointer, offset and answer."""

    def cell(entry: dict) -> str:
        if entry["accuracy"] is None:
            return f"{'-':>16}"
        return f"{entry['accuracy']:.2f} ({entry['majority']:.2f}) n={entry['test']:<4}".rjust(16)

    lines = [f"{'step':>4} {'pointer':>16} {'offset':>16} {'answer':>16}"]
    lines += [f"{row['step']:>4} {cell(row['pointer'])} {cell(row['offset'])} {cell(row['answer'])}" for row in report]
    return "\n".join(lines)
