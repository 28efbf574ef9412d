"""Looking inside the recurrence: latent trajectories, convergence, orbits; the `recurrent-depth trace` command.

`record_trajectory` runs one forward pass through the model's own pieces (embed, prelude, initial state, `iterate`
with a `record` callback, `readout`; no cache) and keeps the latent state after every k-th step, plus per-token
per-step measures at every step. `classify` labels one token's trajectory as converging, orbiting or sliding (the
three behaviours of Geiping et al. 2025, section 7). The figures are drawn by `trace_plots`.

Exit steps here are judged per token; `generate` decides per sequence. See `exit_steps` for what that changes.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .cli import parse_integers
from .generation_recurrent_depth import EXIT_CRITERIA, KL, Cosine, LatentDiff, MinPKL

# Classifier defaults (see `classify`).
RESTING_CHANGE = 1e-3  # late relative change per recorded step below which a token is at rest
CONTRACTION = 0.5  # late step sizes shrinking below this factor across the late window: still converging
RETURN_DISTANCE = 1.0  # coming back within this many median step sizes of an earlier point: orbiting
STRAIGHTNESS = 0.5  # net displacement / path length of the late window at or above which a drift is a slide


@dataclass
class Trajectory:
    """The recorded recurrence of one sequence of T tokens run for N = num_steps steps.

    steps: (S,) the recorded step indices: 0 (the initial state), every k-th step, and always N.
    positions: (P,) the sequence positions whose states were kept.
    states: (S, P, D) float32 raw core states s_i (before `ln_f`), on the CPU.
    distance_to_final: (S, P) ||s_i - s_N||.
    Per step i = 1..N (row i - 1) and token, (N, T): relative_change ||s_i - s_{i-1}|| / ||s_i||,
    cosine_distance 1 - cos(s_i, s_{i-1}), and the logit lens of step i (the coda and head applied to s_i):
    top_token, top_prob, entropy, kl = KL(p_{i-1} || p_i) (p_0 uniform, as the kl exit criterion starts) and
    minp_kl (the same after the min-p filter of the minp-kl criterion).
    logits: (T, V) the logit lens of step N, which equals the forward pass's logits.
    exit_steps / exited: criterion -> (T,) steps each token would run under that criterion at its default threshold
    (N when it never fires, like `steps_used`) and whether it fired.
    """

    input_ids: torch.Tensor
    num_steps: int
    steps: torch.Tensor
    positions: torch.Tensor
    states: torch.Tensor
    distance_to_final: torch.Tensor
    relative_change: torch.Tensor
    cosine_distance: torch.Tensor
    top_token: torch.Tensor
    top_prob: torch.Tensor
    entropy: torch.Tensor
    kl: torch.Tensor
    minp_kl: torch.Tensor
    logits: torch.Tensor
    exit_steps: dict[str, torch.Tensor] = field(default_factory=dict)
    exited: dict[str, torch.Tensor] = field(default_factory=dict)

    def token_states(self, position: int) -> torch.Tensor:
        """(S, D) recorded states of the token at sequence `position` (it must be among `positions`)."""
        hits = (self.positions == position).nonzero()
        if len(hits) == 0:
            raise ValueError(f"position {position} was not recorded (recorded: {self.positions.tolist()})")
        return self.states[:, int(hits[0])]


class _Recorder:
    """The `record` callback of `iterate`: per-step measures for all tokens, states for the kept positions."""

    def __init__(self, base, head, ctx, state: torch.Tensor, positions: torch.Tensor, every: int, num_steps: int):
        self.base, self.head, self.ctx = base, head, ctx
        self.positions, self.every, self.num_steps = positions, every, num_steps
        self.step = 0
        self.previous = state[0]  # (T, D)
        self.previous_log_probs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.steps, self.states = [0], [state[0, positions].float().cpu()]
        self.measures: dict[str, list[torch.Tensor]] = {}
        self.logits = torch.empty(0)

    def __call__(self, state: torch.Tensor) -> None:
        self.step += 1
        current = state[0]  # (T, D)
        # The criteria's own definitions, with each token as its own row: (T, 1, D) -> (T,).
        pair = (current.float()[:, None], self.previous.float()[:, None])
        self._add("relative_change", LatentDiff().distance(*pair))
        self._add("cosine_distance", Cosine().distance(*pair))
        self.previous = current
        logits = self.base.readout(state, self.ctx, self.head)[0]  # (T, V) float32
        log_probs, minp_log_probs = KL().log_probs(logits), MinPKL().log_probs(logits)
        if self.previous_log_probs is None:
            uniform = torch.full_like(log_probs, -math.log(logits.shape[-1]))
            self.previous_log_probs = (uniform, uniform)
        for name, new, old in zip(("kl", "minp_kl"), (log_probs, minp_log_probs), self.previous_log_probs, strict=True):
            self._add(name, F.kl_div(new, old, reduction="none", log_target=True).sum(dim=-1))
        self.previous_log_probs = (log_probs, minp_log_probs)
        self._add("entropy", -(log_probs.exp() * log_probs).sum(dim=-1))
        top = logits.argmax(dim=-1)
        self._add("top_token", top)
        self._add("top_prob", log_probs.gather(-1, top[:, None])[:, 0].exp())
        if self.step % self.every == 0 or self.step == self.num_steps:
            self.steps.append(self.step)
            self.states.append(state[0, self.positions].float().cpu())
        if self.step == self.num_steps:
            self.logits = logits.cpu()

    def _add(self, name: str, value: torch.Tensor) -> None:
        self.measures.setdefault(name, []).append(value.detach().cpu())

    def trajectory(self, input_ids: torch.Tensor) -> Trajectory:
        states = torch.stack(self.states)  # (S, P, D)
        measures = {name: torch.stack(values) for name, values in self.measures.items()}  # (N, T)
        traj = Trajectory(
            input_ids=input_ids.cpu(),
            num_steps=self.num_steps,
            steps=torch.tensor(self.steps),
            positions=self.positions.cpu(),
            states=states,
            distance_to_final=(states - states[-1:]).norm(dim=-1),
            logits=self.logits,
            relative_change=measures["relative_change"],
            cosine_distance=measures["cosine_distance"],
            top_token=measures["top_token"],
            top_prob=measures["top_prob"],
            entropy=measures["entropy"],
            kl=measures["kl"],
            minp_kl=measures["minp_kl"],
        )
        traj.exit_steps, traj.exited = exit_steps(traj)
        return traj


@torch.no_grad()
def record_trajectory(
    model,
    input_ids: torch.Tensor,
    num_steps: int,
    *,
    every: int = 1,
    positions: Sequence[int] | None = None,
    init_scale: float | None = None,
    attention_mask: torch.Tensor | None = None,
) -> Trajectory:
    """Run `model` (a RecurrentDepthForCausalLM) on one sequence, input_ids (T,) or (1, T), for `num_steps` steps.

    States are kept at step 0, every `every`-th step and the last step, for `positions` only (None: all; negative
    indices count from the end), so memory is S x P x D. The per-token measures (relative change, logit lens, KL)
    are computed at every step for all tokens, because the exit criteria need them: this costs one coda and head
    pass per step. init_scale: scale of the random initial state (None: config.init_scale; 0: zeros, deterministic).
    """
    base, head = model.base_model, model.get_output_embeddings()
    if head is None or not hasattr(base, "iterate"):
        raise TypeError("record_trajectory needs a recurrent-depth causal LM (RecurrentDepthForCausalLM)")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be an int >= 1, got {every!r}")
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be one non-empty sequence, (T,) or (1, T); got {tuple(input_ids.shape)}")
    length = input_ids.shape[1]
    kept = torch.tensor(resolve_positions(positions, length) if positions is not None else range(length))
    init_scale = model.config.init_scale if init_scale is None else init_scale
    if isinstance(init_scale, bool) or not isinstance(init_scale, (int, float)) or not init_scale >= 0:
        raise ValueError(f"init_scale must be a number >= 0, got {init_scale!r}")

    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    x, ctx = base.encode(input_ids, attention_mask)  # no cache
    state = base.initial_state(x, None, False, None, init_scale)
    recorder = _Recorder(base, head, ctx, state, kept.to(device), every, num_steps)
    base.iterate(state, x, ctx, (num_steps, 0), record=recorder)
    return recorder.trajectory(input_ids[0])


def resolve_positions(positions: Sequence[int], length: int) -> list[int]:
    """Sequence indices (negative ones count from the end) as sorted unique indices in [0, length)."""
    resolved = set()
    for p in positions:
        if isinstance(p, bool) or not isinstance(p, int) or not -length <= p < length:
            raise ValueError(
                f"token index {p!r} is out of range for a sequence of {length} tokens "
                f"(use 0..{length - 1}, or -{length}..-1 from the end)"
            )
        resolved.add(p % length)
    return sorted(resolved)


def _stable_counts(top_token: torch.Tensor) -> torch.Tensor:
    """(N, T) consecutive steps the top token stayed the same, as ArgmaxStability counts them."""
    counts = torch.zeros_like(top_token)
    for i in range(1, len(top_token)):
        counts[i] = torch.where(top_token[i] == top_token[i - 1], counts[i - 1] + 1, 0)
    return counts


def _entropy_fires(traj: Trajectory, threshold: float) -> torch.Tensor:
    fired = torch.zeros_like(traj.entropy, dtype=torch.bool)
    fired[1:] = (traj.entropy[1:] - traj.entropy[:-1]).abs() < threshold  # never on the first step
    return fired


# criterion -> (trajectory, threshold) -> (N, T) whether it fires after each step; as generation_recurrent_depth.
CRITERION_FIRES: dict[str, Callable[[Trajectory, float], torch.Tensor]] = {
    "kl": lambda t, threshold: t.kl < threshold,
    "minp-kl": lambda t, threshold: t.minp_kl < threshold,
    "entropy-diff": _entropy_fires,
    "latent-diff": lambda t, threshold: t.relative_change < threshold,
    "cosine": lambda t, threshold: t.cosine_distance < threshold,
    "argmax-stability": lambda t, threshold: _stable_counts(t.top_token) >= threshold,
}


def exit_steps(
    traj: Trajectory, thresholds: dict[str, float] | None = None, min_steps: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per criterion of EXIT_CRITERIA, the steps each token would run (N if it never fires) and whether it fired.

    Thresholds default to each criterion's published default. The measures are those the criteria compute, with
    each token as its own row. Differences from adaptive exit in `generate`, which decides per sequence: there the
    logit criteria read the sequence's last position only, and the latent criteria average over its positions, so
    the result here equals the forward's `steps_used` for the last token under a logit criterion, and for a
    one-token sequence under every criterion. Here every token runs all N steps (its neighbours, which attention
    reads, do not stop), and the exit step is the first step at which its criterion fires.
    """
    thresholds = thresholds or {}
    unknown = set(thresholds) - set(EXIT_CRITERIA)
    if unknown:
        raise ValueError(f"unknown exit criteria {sorted(unknown)}; use some of {sorted(EXIT_CRITERIA)}")
    steps, fired_any = {}, {}
    for name, criterion in EXIT_CRITERIA.items():
        threshold = criterion(thresholds.get(name)).threshold
        fired = CRITERION_FIRES[name](traj, threshold)
        fired[: max(min_steps - 1, 0)] = False
        fired_any[name] = fired.any(dim=0)
        first = fired.float().argmax(dim=0) + 1
        steps[name] = torch.where(fired_any[name], first, traj.num_steps)
    return steps, fired_any


def trajectory_features(states: torch.Tensor) -> dict[str, float]:
    """Shape measures of one token's recorded trajectory (S, D), S >= 3, over its late window (the last half).

    late_change: mean relative change ||x_i - x_{i-1}|| / ||x_i|| over the last half of the late window's steps.
    contraction: median step size of the second half of the late window / that of its first half.
    straightness: net displacement of the late window / its path length (1 for a straight line, ~0 for loops).
    return_distance: the closest the late window comes back to an earlier, non-adjacent point of itself
        (min over j <= i - 2 of ||x_i - x_j||), in median step sizes.
    """
    x = torch.as_tensor(states).double()
    if x.dim() != 2 or x.shape[0] < 3:
        raise ValueError(f"a trajectory needs shape (steps >= 3, dim), got {tuple(x.shape)}")
    late = x[-max(3, (x.shape[0] + 1) // 2) :]
    step = (late[1:] - late[:-1]).norm(dim=-1)  # (m,), m >= 2
    half = len(step) // 2
    relative = step / late[1:].norm(dim=-1).clamp_min(1e-30)
    typical = float(step.median())
    early, later = float(step[:half].median()), float(step[half:].median())
    path = float(step.sum())
    distances = torch.cdist(late, late)
    far = torch.ones_like(distances, dtype=torch.bool).tril(-2)  # pairs j <= i - 2
    closest = float(distances[far].min())
    return {
        "late_change": float(relative[half:].mean()),
        "contraction": later / early if early > 0 else 0.0,
        "straightness": float((late[-1] - late[0]).norm()) / path if path > 0 else 0.0,
        "return_distance": closest / typical if typical > 0 else 0.0,
    }


def classify(
    states: torch.Tensor,
    *,
    resting_change: float = RESTING_CHANGE,
    contraction: float = CONTRACTION,
    return_distance: float = RETURN_DISTANCE,
    straightness: float = STRAIGHTNESS,
) -> str:
    """Label one token's recorded trajectory (S, D), S >= 3: "converging", "orbiting" or "sliding".

    Judged on the late window (the last half of the recorded states, after the transient), in this order:
    1. converging: it is at rest (late relative change < `resting_change`, 1e-3 per recorded step), or still
       contracting (late step sizes shrink by at least `contraction`, 0.5, across the late window), i.e. it
       approaches a fixed point.
    2. orbiting: it keeps moving but turns back: it returns within `return_distance` (1) median step sizes of an
       earlier non-adjacent point (periodic orbits), or its net displacement is under `straightness` (0.5) of
       its path length (loops, bounded wandering).
    3. sliding: it keeps moving in a near-constant direction (straight and never returning), a steady drift.
    With every=k, the recorded states are k steps apart: an orbit whose period divides k looks like a fixed point.
    """
    f = trajectory_features(states)
    if f["late_change"] < resting_change or f["contraction"] < contraction:
        return "converging"
    if f["return_distance"] < return_distance or f["straightness"] < straightness:
        return "orbiting"
    return "sliding"


# --- the `recurrent-depth trace` command ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .demo import DEFAULT_MODEL

    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="model folder (default: the shipped chain model)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the text whose recurrence is traced")
    what.add_argument(
        "--walk-probe",
        action="store_true",
        help="instead of one prompt: fit linear probes on the answering position's state after each step of fresh "
        "chain problems (the variable a look-up has reached, the running offset, the answer) and write "
        "OUT/walk_probe.json",
    )
    parser.add_argument(
        "--num-steps",
        type=int,
        default=None,
        help="recurrence steps (default 64, more than --every; 7 with --walk-probe)",
    )
    parser.add_argument("--n-fit", type=int, default=None, help="--walk-probe: fit problems (2000)")
    parser.add_argument("--n-test", type=int, default=None, help="--walk-probe: other, scored problems (500)")
    parser.add_argument("--out", default="trace-out", help="output directory (created if missing)")
    parser.add_argument(
        "--tokens",
        default=None,
        help="comma-separated token indices to plot (negative from the end; default: "
        "the last few tokens and the digits)",
    )
    parser.add_argument("--every", type=int, default=1, help="keep the state of every k-th step")
    parser.add_argument(
        "--init-scale", type=float, default=None, help="initial state scale (default: config; 0 with --walk-probe)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initial state")


def parse_tokens(text: str, length: int) -> list[int]:
    """'0,3,-1' -> sorted indices into a prompt of `length` tokens; ValueError naming the bad value."""
    return resolve_positions(parse_integers(text, "--tokens", positive=False), length)


def default_tokens(texts: list[str], last: int = 4, limit: int = 8) -> list[int]:
    """The last `last` tokens and the digit tokens, at most `limit` of them (the latest)."""
    digits = [i for i, t in enumerate(texts) if t.strip().isdigit()]
    return sorted(set(digits) | set(range(max(len(texts) - last, 0), len(texts))))[-limit:]


def run(args: argparse.Namespace) -> int:
    from .demo import load
    from .trace_plots import plot_convergence, plot_exit_histogram, plot_pca

    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model}: no such model folder")
    if args.walk_probe:
        return run_walk_probe(args)
    if args.n_fit is not None or args.n_test is not None:
        raise ValueError("--n-fit and --n-test are options of --walk-probe, not of tracing a --prompt")
    num_steps = 64 if args.num_steps is None else args.num_steps
    if args.every < 1:
        raise ValueError(f"--every must be >= 1, got {args.every}")
    if num_steps <= args.every:  # the classifier needs three recorded states: 0, every, ..., num_steps
        raise ValueError(f"--num-steps must be more than --every ({args.every}) and >= 2, got {num_steps}")
    tokenizer, model = load(args.model)
    input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    if input_ids.shape[1] == 0:
        raise ValueError("--prompt gives no tokens")
    texts = [tokenizer.decode([int(i)]) for i in input_ids[0]]
    chosen = parse_tokens(args.tokens, len(texts)) if args.tokens else default_tokens(texts)
    torch.manual_seed(args.seed)
    traj = record_trajectory(model, input_ids, num_steps, every=args.every, init_scale=args.init_scale)
    features = [trajectory_features(traj.states[:, i]) for i in range(len(texts))]
    classes = [classify(traj.states[:, i]) for i in range(len(texts))]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = [
        plot_convergence(traj, texts, out / "convergence_heatmap.png"),
        plot_pca(traj, texts, chosen, classes, out / "pca_trajectories.png"),
        plot_exit_histogram(traj, out / "exit_steps_histogram.png"),
    ]
    report = {
        "model": str(args.model),
        "prompt": args.prompt,
        "num_steps": num_steps,
        "every": args.every,
        "init_scale": model.config.init_scale if args.init_scale is None else args.init_scale,
        "seed": args.seed,
        "recorded_steps": traj.steps.tolist(),
        "plotted_tokens": chosen,
        "exit_thresholds": {name: criterion().threshold for name, criterion in EXIT_CRITERIA.items()},
        "classifier": {
            "resting_change": RESTING_CHANGE,
            "contraction": CONTRACTION,
            "return_distance": RETURN_DISTANCE,
            "straightness": STRAIGHTNESS,
        },
        "tokens": [
            {
                "index": i,
                "id": int(input_ids[0, i]),
                "text": texts[i],
                "class": classes[i],
                "features": features[i],
                "exit_steps": {n: int(s[i]) if traj.exited[n][i] else None for n, s in traj.exit_steps.items()},
                "relative_change": traj.relative_change[:, i].tolist(),
                "cosine_distance": traj.cosine_distance[:, i].tolist(),
                "distance_to_final": traj.distance_to_final[:, i].tolist(),
                "top_token": traj.top_token[:, i].tolist(),
                "top_prob": traj.top_prob[:, i].tolist(),
                "entropy": traj.entropy[:, i].tolist(),
                "kl": traj.kl[:, i].tolist(),
            }
            for i in range(len(texts))
        ],
    }
    files.append(out / "trace.json")
    files[-1].write_text(json.dumps(report, indent=1))
    print_table(traj, texts, classes)
    print("\nwrote " + ", ".join(str(f) for f in files))
    return 0


def run_walk_probe(args: argparse.Namespace) -> int:
    from .demo import load
    from .walk_probe import format_report, walk_probe

    if args.tokens is not None or args.every != 1:
        raise ValueError("--tokens and --every choose what a --prompt trace plots and keeps; --walk-probe has neither")
    settings = {
        "model": str(args.model),
        "num_steps": 7 if args.num_steps is None else args.num_steps,
        "n_fit": 2000 if args.n_fit is None else args.n_fit,
        "n_test": 500 if args.n_test is None else args.n_test,
        "seed": args.seed,
        "init_scale": 0.0 if args.init_scale is None else args.init_scale,
    }
    if settings["num_steps"] < 1:
        raise ValueError(f"--num-steps must be >= 1, got {settings['num_steps']}")
    tokenizer, model = load(args.model)
    torch.manual_seed(args.seed)
    report = walk_probe(model, tokenizer, **{k: v for k, v in settings.items() if k != "model"})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "walk_probe.json"
    path.write_text(json.dumps({**settings, "steps": report}, indent=1))
    print(format_report(report))
    print(f"\nwrote {path}")
    return 0


def print_table(traj: Trajectory, texts: list[str], classes: list[str]) -> None:
    names = list(traj.exit_steps)
    print(f"\nTrajectories over {traj.num_steps} steps (exit step per criterion at its default; '-' = no exit)")
    header = f"{'idx':>4} {'token':<8} {'class':<10} {'rel.change':>10} | " + " ".join(f"{n:>8.8}" for n in names)
    print(header)
    print("-" * len(header))
    for i, text in enumerate(texts):
        exits = [str(int(traj.exit_steps[n][i])) if traj.exited[n][i] else "-" for n in names]
        print(
            f"{i:>4} {text!r:<8.8} {classes[i]:<10} {float(traj.relative_change[-1, i]):>10.2e} | "
            + " ".join(f"{e:>8}" for e in exits)
        )
