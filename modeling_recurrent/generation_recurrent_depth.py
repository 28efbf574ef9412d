"""Test-time compute strategies: per-token adaptive exit criteria and self-speculative decoding.

Adaptive exit is a forward option (`exit_criterion`, `exit_threshold`, `min_steps`), so it works inside the standard
`generate` with every decoding strategy; speculative decoding is its own named entry point. This file travels as
remote code with every saved model.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F

Readout = Callable[[], torch.Tensor]  # logits (rows, V) of the last position for the rows being checked


class ExitCriterion(ABC):
    """Decides after each recurrence step which rows have converged. Subclasses hold per-row history for all B rows.

    `check(rows, state, readout)` gets the indices of the rows still iterating, their new state (R, T, D) and a
    callable giving their last-position logits (R, V); it returns a bool tensor (R,) of rows that may exit.
    """

    name = ""
    default = 0.0
    needs_logits = False

    def __init__(self, threshold: float | int | None = None):
        self.threshold = self.default if threshold is None else self._checked(threshold)

    def _checked(self, threshold: float | int) -> float | int:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise TypeError(f"exit_threshold for {self.name!r} must be a finite number, got {threshold!r}")
        if threshold < 0:
            raise ValueError(f"exit_threshold for {self.name!r} must be >= 0, got {threshold}")
        return float(threshold)

    @abstractmethod
    def start(self, state: torch.Tensor) -> None:
        """Reset the history for a new token; `state` (B, T, D) is the initial latent."""

    @abstractmethod
    def check(self, rows: torch.Tensor, state: torch.Tensor, readout: Readout) -> torch.Tensor:
        """Bool (R,): which of the checked rows may exit now."""


class _LatentCriterion(ExitCriterion):
    def start(self, state):
        self.previous = state.clone()

    def check(self, rows, state, readout):
        value = self.distance(state.float(), self.previous[rows].float())
        self.previous[rows] = state
        return value < self.threshold

    @abstractmethod
    def distance(self, current: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """(R,) distance between successive states (R, T, D)."""


class LatentDiff(_LatentCriterion):
    """Relative change ||s_t - s_{t-1}|| / ||s_t||, averaged over positions."""

    name, default = "latent-diff", 0.03

    def distance(self, current, previous):
        return ((current - previous).norm(dim=-1) / current.norm(dim=-1).clamp_min(1e-12)).mean(dim=-1)


class Cosine(_LatentCriterion):
    """1 - cos(s_t, s_{t-1}), averaged over positions."""

    name, default = "cosine", 1e-3

    def distance(self, current, previous):
        return (1 - F.cosine_similarity(current, previous, dim=-1)).mean(dim=-1)


class _LogitCriterion(ExitCriterion):
    needs_logits = True

    def start(self, state):
        self.batch, self.previous = state.shape[0], None
        self.seen = torch.zeros(self.batch, dtype=torch.bool, device=state.device)

    def check(self, rows, state, readout):
        log_probs = self.log_probs(readout().float())
        if self.previous is None:  # the reference starts from the uniform distribution
            vocab = log_probs.shape[-1]
            self.previous = torch.full((self.batch, vocab), -math.log(vocab), device=log_probs.device)
        done = self.compare(log_probs, self.previous[rows], first=~self.seen[rows])
        self.previous[rows] = log_probs
        self.seen[rows] = True
        return done

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(logits, dim=-1)

    def compare(self, log_probs: torch.Tensor, previous: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        kl = F.kl_div(log_probs, previous, reduction="none", log_target=True).sum(dim=-1)  # KL(previous || current)
        return kl < self.threshold


class KL(_LogitCriterion):
    """KL divergence between successive steps' next-token distributions (paper: 5e-4)."""

    name, default = "kl", 5e-4


class MinPKL(_LogitCriterion):
    """KL after a min-p filter (tokens below 0.1 x max probability flattened to 1/V)."""

    name, default = "minp-kl", 1e-5

    def log_probs(self, logits):
        probs = F.softmax(logits, dim=-1)
        small = probs < 0.1 * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(small, 1.0 / probs.shape[-1])
        return (probs / probs.sum(dim=-1, keepdim=True)).log()


class EntropyDiff(_LogitCriterion):
    """Change of the next-token entropy between successive steps (never on the first step)."""

    name, default = "entropy-diff", 1e-3

    def compare(self, log_probs, previous, first):
        def entropy(lp):
            return -(lp.exp() * lp).sum(dim=-1)

        return ((entropy(log_probs) - entropy(previous)).abs() < self.threshold) & ~first


class ArgmaxStability(ExitCriterion):
    """The predicted token stayed the same for `threshold` consecutive steps."""

    name, default, needs_logits = "argmax-stability", 5, True

    def _checked(self, threshold):
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise TypeError(f"exit_threshold for 'argmax-stability' must be an int >= 1, got {threshold!r}")
        return threshold

    def start(self, state):
        self.previous = torch.full((state.shape[0],), -1, dtype=torch.long, device=state.device)
        self.stable = torch.zeros(state.shape[0], dtype=torch.long, device=state.device)

    def check(self, rows, state, readout):
        current = readout().argmax(dim=-1)
        same = current == self.previous[rows]
        self.stable[rows] = torch.where(same, self.stable[rows] + 1, torch.zeros_like(current))
        self.previous[rows] = current
        return self.stable[rows] >= self.threshold


EXIT_CRITERIA: dict[str, type[ExitCriterion]] = {
    c.name: c for c in (KL, MinPKL, EntropyDiff, LatentDiff, Cosine, ArgmaxStability)
}


def make_exit_criterion(name: str, threshold: float | int | None = None) -> ExitCriterion:
    """The criterion called `name` (one of EXIT_CRITERIA) with its threshold (None: the published default)."""
    if name not in EXIT_CRITERIA:
        raise ValueError(f"exit_criterion must be one of {sorted(EXIT_CRITERIA)}, got {name!r}")
    return EXIT_CRITERIA[name](threshold)


@torch.no_grad()
def speculative_generate(
    model,
    input_ids: torch.Tensor,
    *,
    num_steps: int | None = None,
    draft_steps: int = 4,
    draft_tokens: int = 4,
    max_new_tokens: int = 32,
    eos_token_id: int | list[int] | None = None,
    init_scale: float | None = None,
    stopping_criteria=None,
) -> tuple[torch.Tensor, dict]:
    """Greedy self-speculative decoding: draft `draft_tokens` tokens with `draft_steps` recurrence steps, then verify
    them in one parallel pass with `num_steps`; the longest agreeing prefix plus the verifier's next token is kept.

    The output equals greedy decoding at `num_steps` (exactly, with init_scale=0). input_ids: (1, P).
    Returns the sequences (1, P + N) and statistics (rounds, drafted and accepted tokens).
    """
    from .cache_recurrent_depth import RecurrentCache

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(
            f"speculative decoding takes one sequence, input_ids of shape (1, P); got {tuple(input_ids.shape)}"
        )
    for name, value in (
        ("draft_steps", draft_steps),
        ("draft_tokens", draft_tokens),
        ("max_new_tokens", max_new_tokens),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    num_steps = model.config.mean_recurrence if num_steps is None else num_steps
    eos = eos_token_id if eos_token_id is not None else model.generation_config.eos_token_id
    eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    cache = RecurrentCache(model.config)

    def step(tokens: torch.Tensor, steps: int) -> torch.Tensor:
        return model(tokens, past_key_values=cache, num_steps=steps, init_scale=init_scale).logits.argmax(-1)

    sequence = torch.cat([input_ids, step(input_ids, num_steps)[:, -1:]], dim=1)
    stats = {"rounds": 0, "drafted": 0, "accepted": 0}
    while sequence.shape[1] - input_ids.shape[1] < max_new_tokens and not _stopped(sequence, eos, stopping_criteria):
        base = cache.get_seq_length()
        budget = max_new_tokens - (sequence.shape[1] - input_ids.shape[1])
        drafted, token = [], sequence[:, -1:]
        for _ in range(min(draft_tokens, budget)):
            token = step(token, draft_steps)[:, -1:]
            drafted.append(token)
        drafts = torch.cat(drafted, dim=1)  # (1, k)
        cache.crop(base)
        verified = step(torch.cat([sequence[:, -1:], drafts], dim=1), num_steps)  # (1, k + 1)
        agree = (verified[0, :-1] == drafts[0]).long().cumprod(0)
        accepted = int(agree.sum())
        cache.crop(base + 1 + accepted)
        sequence = torch.cat([sequence, drafts[:, :accepted], verified[:, accepted : accepted + 1]], dim=1)
        stats["rounds"] += 1
        stats["drafted"] += drafts.shape[1]
        stats["accepted"] += accepted
    sequence = _truncate_after_stop(sequence, input_ids.shape[1], max_new_tokens, eos)
    return sequence, stats


def _stopped(sequence: torch.Tensor, eos: set[int], stopping_criteria) -> bool:
    if eos and int(sequence[0, -1]) in eos:
        return True
    return bool(stopping_criteria is not None and stopping_criteria(sequence, None).all())


def _truncate_after_stop(sequence: torch.Tensor, prompt: int, max_new_tokens: int, eos: set[int]) -> torch.Tensor:
    """Cut what a round appended beyond the first end-of-sequence token or the token budget."""
    new = sequence[0, prompt:].tolist()[:max_new_tokens]
    for i, token in enumerate(new):
        if token in eos:
            new = new[: i + 1]
            break
    return sequence[:, : prompt + len(new)]
