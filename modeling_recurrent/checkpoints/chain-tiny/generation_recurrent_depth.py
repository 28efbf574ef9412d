"""Generation: per-token adaptive exit criteria, self-speculative decoding and the causal LM's `generate`.

Adaptive exit is a forward option (`exit_criterion`, `exit_threshold`, `min_steps`, checked together by
`exit_criterion_for`, run by `iterate_until_exit`), so it works inside the standard `generate` with every decoding
strategy; speculative decoding is its own named entry point. `RecurrentGenerationMixin` gives the causal LM
Transformers' `generate` with this package's caches and a memory check; `resolve_num_steps` interprets the `num_steps`
argument for it and for the model's forward, and `sample_num_steps` draws the training depth when none is given.
This file travels as remote code with every saved model.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
import torch.nn.functional as F
from transformers import GenerationMixin
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from .cache_recurrent_depth import RecurrentCache, one_cache
from .layers_recurrent_depth import BlockContext
from .static_cache_recurrent_depth import StaticRecurrentCache

Readout = Callable[[], torch.Tensor]  # logits (rows, V) of the last position for the rows being checked


def resolve_num_steps(num_steps: object, default: int, training: bool, backprop_depth: int) -> tuple[int, int]:
    """Turn a `num_steps` argument into (steps without gradient, steps with gradient).

    An int r runs r steps; in training mode only the last `backprop_depth` of them keep gradients (truncated
    backprop). A pair (n, k) runs n steps without and k with gradient. None means the config default.
    """
    if num_steps is None:
        num_steps = default
    if isinstance(num_steps, torch.Tensor) and num_steps.numel() == 1 and not num_steps.is_floating_point():
        num_steps = int(num_steps)
    if isinstance(num_steps, (tuple, list)):
        if len(num_steps) != 2 or not all(is_count(n) and n >= 0 for n in num_steps) or sum(num_steps) < 1:
            raise ValueError(
                f"num_steps as a pair must be two integers >= 0 (steps without, with gradient) summing to >= 1, "
                f"got {num_steps!r}"
            )
        return int(num_steps[0]), int(num_steps[1])
    if not is_count(num_steps):
        raise TypeError(
            f"num_steps must be an int >= 1 or a pair of ints, got {type(num_steps).__name__} {num_steps!r}"
        )
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if training:
        with_grad = min(num_steps, backprop_depth)
        return num_steps - with_grad, with_grad
    return 0, num_steps


def sample_num_steps(
    mean_recurrence: int, backprop_depth: int, generator: torch.Generator | None = None
) -> tuple[int, int]:
    """Training depth of the paper: n = Poisson(LogNormal(mu, 0.5)) + 1, split as (max(n - k, 0), min(n, k))."""
    t = max(mean_recurrence - backprop_depth, 0)
    sigma = 0.5
    mu = math.log(t + backprop_depth) - sigma**2 / 2
    rate = torch.empty(1).log_normal_(mean=mu, std=sigma, generator=generator)
    n = int(torch.poisson(rate, generator=generator).item()) + 1
    return max(n - backprop_depth, 0), min(n, backprop_depth)


def is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


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


def exit_criterion_for(
    name: str | None, threshold: float | None, min_steps: object, max_steps: int, *, training: bool, has_head: bool
) -> ExitCriterion | None:
    """The forward's adaptive-exit arguments checked together; None when adaptive exit is off (`name` None)."""
    if name is None:
        if threshold is not None or min_steps:
            raise ValueError("exit_threshold and min_steps only apply with an exit_criterion")
        return None
    if training:
        raise ValueError("exit_criterion is an inference option; call model.eval() first")
    if not is_count(min_steps) or min_steps < 0:
        raise TypeError(f"min_steps must be an int >= 0, got {min_steps!r}")
    if max_steps < min_steps:
        raise ValueError(f"num_steps ({max_steps}) is below min_steps ({min_steps})")
    criterion = make_exit_criterion(name, threshold)
    if criterion.needs_logits and not has_head:
        raise ValueError(f"exit_criterion {name!r} reads logits: use RecurrentDepthForCausalLM")
    return criterion


@torch.no_grad()
def iterate_until_exit(
    core_step: Callable[[torch.Tensor, torch.Tensor, BlockContext, int], torch.Tensor],
    logits_of: Callable[[torch.Tensor, BlockContext], torch.Tensor],
    state: torch.Tensor,
    embeds: torch.Tensor,
    ctx: BlockContext,
    max_steps: int,
    criterion: ExitCriterion,
    min_steps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Iterate `core_step` on each row until `criterion` says it converged (after >= min_steps, at most max_steps);
    `logits_of(state, ctx)` gives logits (rows, T', V) whose last position logit criteria compare (criteria that
    read logits call it once per step, so it need not compute the other positions).

    Rows that exited stop costing compute: later steps run on the remaining rows only, and the cache fills
    their skipped steps with their last computed one. Returns the final states (B, T, D) and the steps each
    row ran (B,).
    """
    batch = state.shape[0]
    active = torch.arange(batch, device=state.device)
    steps_used = torch.full((batch,), max_steps, dtype=torch.long, device=state.device)
    criterion.start(state)
    for step in range(max_steps):
        sub = ctx if len(active) == batch else ctx.select(active)
        new = core_step(state[active], embeds[active], sub, step)
        state[active] = new

        def last_logits(new: torch.Tensor = new, sub: BlockContext = sub) -> torch.Tensor:
            return logits_of(new, sub)[:, -1]

        done = criterion.check(active, new, last_logits)
        if step + 1 >= min_steps and done.any():
            steps_used[active[done]] = step + 1
            active = active[~done]
            if len(active) == 0:
                break
    return state, steps_used


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


class RecurrentGenerationMixin(GenerationMixin):
    """Transformers' `generate` for recurrent-depth models: a `RecurrentCache` (or, with cache_implementation="static",
    a `StaticRecurrentCache` sized for the call), `num_steps_used` in dict outputs, a refusal of calls whose KV cache
    would not fit in memory, and `generate_speculative`."""

    if TYPE_CHECKING:  # what the host PreTrainedModel provides
        config: Any

        @property
        def device(self) -> torch.device: ...

        @property
        def dtype(self) -> torch.dtype: ...

    def _total_steps(self, num_steps: object) -> int:
        """All recurrence steps a call with this `num_steps` argument runs (a ValueError/TypeError if it is bad)."""
        return sum(resolve_num_steps(num_steps, self.config.mean_recurrence, False, self.config.mean_backprop_depth))

    # Not the base signature (mypy's override check is silenced): this also takes the call forms of other
    # Transformers 5 releases (defaults, extra keywords) and returns None, as the base does despite its `-> bool`.
    def _prepare_cache_for_generation(  # type: ignore[override]
        self, generation_config, model_kwargs, generation_mode=None, batch_size=1, max_cache_length=None, **kwargs
    ) -> None:
        """generate() gets a RecurrentCache unless the caller passed one (e.g. with shared core slots); with
        cache_implementation="static" a StaticRecurrentCache sized for this call (length, rows, num_steps)."""
        if model_kwargs.get("cache") is not None or generation_config.use_cache is False:
            # GenerationMixin types `self` as a Protocol no PreTrainedModel satisfies (its device is a property).
            super()._prepare_cache_for_generation(  # type: ignore[misc]
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, **kwargs
            )
            return None
        implementation = generation_config.cache_implementation
        if implementation == "static":
            if getattr(generation_config, "max_cache_len", None) is not None:
                max_cache_length = max(max_cache_length, generation_config.max_cache_len)
            rows = max(generation_config.num_beams, generation_config.num_return_sequences) * batch_size
            model_kwargs["cache"] = StaticRecurrentCache(
                self.config,
                max_cache_len=max_cache_length,
                batch_size=rows,
                num_steps=self._total_steps(model_kwargs.get("num_steps")),
                dtype=self.dtype,
                device=self.device,
            )
            return None
        if implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={implementation!r} is not supported by recurrent-depth models (use 'dynamic' "
                "or 'static'); pass past_key_values=RecurrentCache(model.config, core_slots=N) to share cache slots"
            )
        # Slots allocate the whole generation length at their first write: no regrowth (copies) while decoding.
        model_kwargs["cache"] = RecurrentCache(self.config, reserve=max_cache_length or 0)
        return None

    def generate(self, *args, **kwargs):
        """Transformers' generate with `num_steps`, `init_scale`, `warm_start` and adaptive-exit options passed to
        every forward. With return_dict_in_generate, the output also carries `num_steps_used` (B, new_tokens): the
        recurrence steps that produced each generated token. Refuses (ValueError) a call whose KV cache would not fit
        in the available memory."""
        self._check_cache_fits(args, kwargs)
        output = super().generate(*args, **kwargs)
        cache = output.get("cache") if isinstance(output, ModelOutput) else None
        if isinstance(cache, RecurrentCache) and cache.steps is not None:
            # Token i of the continuation was predicted at position prompt - 1 + i.
            first = cache.prompt_length - 1
            output["num_steps_used"] = cache.steps[:, first : output.sequences.shape[1] - 1]
        return output

    def _check_cache_fits(self, args: tuple, kwargs: dict) -> None:
        """Check the cache argument, estimate the KV cache of a generate call (rows x (prompt + max_new_tokens)
        positions, num_steps steps) and raise a ValueError naming it and the shared-slot cache that would fit, if it
        exceeds the available memory."""
        names = ("inputs", "input_ids", "inputs_embeds")
        inputs = args[0] if args else next((kwargs[k] for k in names if kwargs.get(k) is not None), None)
        config = kwargs.get("generation_config") or self.generation_config

        def option(name):
            return kwargs[name] if kwargs.get(name) is not None else getattr(config, name, None)

        cache = one_cache(kwargs.get("past_key_values"), kwargs.get("cache"))
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError(f"the cache must be a RecurrentCache or None, got {type(cache).__name__}")
        steps = self._total_steps(kwargs.get("num_steps"))
        new_tokens, max_length = option("max_new_tokens"), option("max_length")
        if (
            option("use_cache") is False
            or isinstance(cache, StaticRecurrentCache)  # already allocated
            or not isinstance(inputs, torch.Tensor)
            or inputs.dim() < 2
            or not is_count(new_tokens if new_tokens is not None else max_length)
        ):
            return  # nothing to estimate, or arguments that generate itself will refuse
        length = inputs.shape[1] + new_tokens if new_tokens is not None else max(max_length, inputs.shape[1])
        rows = inputs.shape[0] * max(option("num_beams") or 1, option("num_return_sequences") or 1)
        core_slots = cache.core_slots if isinstance(cache, RecurrentCache) else None

        def estimate(num_steps: int, slots: int | None = core_slots) -> int:
            return RecurrentCache.estimate_bytes(self.config, rows, length, num_steps, slots, self.dtype)

        need, available = estimate(steps), RecurrentCache.available_bytes(self.device)
        if available is None or need <= available:
            return
        gib = 2**30
        fixed, per_step = estimate(0), estimate(1) - estimate(0)
        fits = min((available // 2 - fixed) // per_step, steps - 1)  # half: a cache growing by doubling may hold 2x
        advice = (
            f"pass cache=RecurrentCache(model.config, core_slots={fits}) to share core cache slots across "
            f"steps (about {estimate(steps, fits) / gib:.3g} GiB)"
            if fits >= 1
            else "even one shared core slot per layer would not fit: lower max_new_tokens, the batch size or num_beams"
        )
        raise ValueError(
            f"generate would need about {need / gib:.3g} GiB of KV cache ({rows} rows x {length} positions, "
            f"num_steps={steps}, core_slots={core_slots}) but only {available / gib:.3g} GiB of memory is "
            f"available; {advice}"
        )

    def generate_speculative(self, input_ids: torch.Tensor, **kwargs) -> tuple[torch.Tensor, dict]:
        """Self-speculative greedy decoding (draft with few steps, verify with many); see `speculative_generate`."""
        return speculative_generate(self, input_ids, **kwargs)
