"""Measurements behind `recurrent-depth bench`: each function times one thing for one model, and `paired` runs
two contenders in alternation so that both see the same machine load (ratios, never absolute targets).

Decode is measured as a greedy loop of one-token forwards on a cache prefilled with a real prompt; a batch of 8
repeats the batch-1 cache rows (`batch_repeat_interleave`), so no long batched prefill is needed. `PRESETS` names the
model shapes and the cases measured on each.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch
from torch import nn

from .cache_recurrent_depth import RecurrentCache
from .configuration_recurrent_depth import RecurrentDepthConfig
from .modeling_recurrent_depth import RecurrentDepthForCausalLM
from .static_cache_recurrent_depth import StaticRecurrentCache

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

ModelT = TypeVar("ModelT", bound=nn.Module)


@dataclass(frozen=True)
class Shape:
    """A benchmark model shape and the cases measured on it."""

    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    blocks: tuple[int, int, int]  # prelude, core, coda
    num_steps: int
    prefill_contexts: tuple[int, ...]
    decode_cases: tuple[tuple[int, int], ...]  # (context, batch)
    generate_cases: tuple[tuple[int, int, int], ...] = ()  # (prompt, new tokens, batch)
    static_contexts: tuple[int, ...] = ()  # batch-1 decode with a static cache
    train_batch: tuple[int, int] = (2, 256)  # (batch, sequence length)
    decode_tokens: int = 16
    warmup_tokens: int = 2
    max_position_embeddings: int = 4096


PRESETS: dict[str, Shape] = {
    # The shape of issue 3: width 256, 4 heads, MLP 704, vocab 4096, blocks 2/4/2 at num_steps 8 (36 layers deep).
    "tiny": Shape(
        hidden_size=256,
        num_attention_heads=4,
        intermediate_size=704,
        vocab_size=4096,
        blocks=(2, 4, 2),
        num_steps=8,
        prefill_contexts=(32, 512, 2048),
        decode_cases=((32, 1), (128, 1), (512, 1), (2048, 1), (32, 8), (512, 8), (2048, 8)),
        generate_cases=((32, 64, 1), (512, 64, 1), (128, 64, 8)),
        static_contexts=(32, 512, 2048),
        train_batch=(2, 256),
    ),
    # About 51M unique parameters (the unrolled Llama: 162M).
    "50m": Shape(
        hidden_size=576,
        num_attention_heads=9,
        intermediate_size=1536,
        vocab_size=32768,
        blocks=(2, 4, 2),
        num_steps=8,
        prefill_contexts=(32, 512),
        decode_cases=((32, 1), (512, 1), (32, 8), (512, 8)),
        static_contexts=(32, 512),
        train_batch=(1, 256),
        decode_tokens=8,
    ),
    # Optional: about 120M unique parameters (the unrolled Llama: 430M); not part of the default run.
    "120m": Shape(
        hidden_size=1024,
        num_attention_heads=16,
        intermediate_size=2816,
        vocab_size=32768,
        blocks=(2, 4, 2),
        num_steps=8,
        prefill_contexts=(32, 512),
        decode_cases=((32, 1), (512, 1)),
        train_batch=(1, 128),
        decode_tokens=8,
    ),
    # The smallest end-to-end run (tests): every code path, in seconds.
    "quick": Shape(
        hidden_size=64,
        num_attention_heads=2,
        intermediate_size=128,
        vocab_size=256,
        blocks=(1, 2, 1),
        num_steps=2,
        prefill_contexts=(16,),
        decode_cases=((16, 1), (16, 2)),
        generate_cases=((8, 4, 1),),
        static_contexts=(16,),
        train_batch=(1, 16),
        decode_tokens=4,
        warmup_tokens=1,
        max_position_embeddings=128,
    ),
}
DEFAULT_PRESETS = "tiny,50m"


@dataclass
class Contender(Generic[ModelT]):
    """A model with the forward arguments and cache factories it is measured with."""

    name: str
    model: ModelT
    kwargs: dict[str, Any]
    new_cache: Callable[[], Any]
    new_static_cache: Callable[[int, int], Any]  # (max_cache_len, batch) -> cache

    def forward(self, input_ids: torch.Tensor, cache: Any = None, model: Callable | None = None, **extra):
        model = self.model if model is None else model  # (no truth test: a compiled module has none)
        return model(input_ids=input_ids, cache=cache, use_cache=True, **self.kwargs, **extra)


def build_contenders(
    shape: Shape, dtype: torch.dtype, seed: int = 0
) -> tuple[Contender[RecurrentDepthForCausalLM], Contender[LlamaForCausalLM]]:
    """This package's model and transformers' LlamaForCausalLM of the same width, heads, MLP, vocabulary and total
    depth (prelude + core * num_steps + coda), random weights, both with SDPA attention."""
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

    torch.manual_seed(seed)
    prelude, core, coda = shape.blocks
    # transformers' dataclass_transform signature of configs omits the extra kwargs (attn_implementation) their
    # __init__ accepts
    config = RecurrentDepthConfig(  # type: ignore[call-arg]
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        intermediate_size=shape.intermediate_size,
        n_prelude=prelude,
        n_core=core,
        n_coda=coda,
        max_position_embeddings=shape.max_position_embeddings,
        mean_recurrence=shape.num_steps,
        mean_backprop_depth=shape.num_steps,
        init_scale=0.0,
        attn_implementation="sdpa",
    )
    rope = config.rope_parameters
    assert rope is not None  # transformers fills in the default RoPE parameters
    # PreTrainedModel.to is decorated with functools.wraps, whose stub leaves `self` unbound: the dtype is taken for it
    ours: RecurrentDepthForCausalLM = RecurrentDepthForCausalLM(config).to(dtype).eval()  # type: ignore[arg-type]
    llama_config = LlamaConfig(  # type: ignore[call-arg]  # attn_implementation, as for our config
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.effective_depth(shape.num_steps),
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        rope_parameters=dict(rope),
        attn_implementation="sdpa",
    )
    llama: LlamaForCausalLM = LlamaForCausalLM(llama_config).to(dtype).eval()  # type: ignore[arg-type]  # `to`, as for ours
    steps = shape.num_steps
    return (
        Contender(
            "ours",
            ours,
            {"num_steps": steps, "init_scale": 0.0},
            lambda: RecurrentCache(config),
            lambda length, batch: StaticRecurrentCache(config, length, batch, steps, dtype=dtype),
        ),
        Contender(
            "llama",
            llama,
            {},
            lambda: DynamicCache(config=llama_config),
            lambda length, batch: StaticCache(config=llama_config, max_cache_len=length),
        ),
    )


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def interleaved(measures: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run every measurement once per round, `repeats` rounds, the order reversed every other round, so that all
    of them see the same machine load. Returns the values of each, round by round."""
    values: dict[str, list[float]] = {name: [] for name in measures}
    names = list(measures)
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            values[name].append(measures[name]())
    return values


def compare(values: dict[str, list[float]], ours: str, baseline: str) -> dict[str, float]:
    """Medians of two measured throughputs and the median of their round-by-round ratio ours / baseline."""
    return {
        "ours": statistics.median(values[ours]),
        "baseline": statistics.median(values[baseline]),
        "ratio": statistics.median(a / b for a, b in zip(values[ours], values[baseline], strict=True)),
    }


def paired(ours: Callable[[], float], baseline: Callable[[], float], repeats: int) -> dict[str, float]:
    """`compare` of two measurements run in alternation (each returns a throughput: higher is better)."""
    return compare(interleaved({"ours": ours, "baseline": baseline}, repeats), "ours", "baseline")


def crop_to(cache: Any, length: int) -> None:
    """Cut a cache back to `length` positions (negative crop: every cache class accepts it)."""
    current = int(cache.get_seq_length())
    if current > length:
        cache.crop(length - current)


def prompt_ids(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def prefill(contender: Contender, ids: torch.Tensor, cache: Any) -> tuple[float, torch.Tensor]:
    """Tokens/s of one forward over the prompt (logits of the last position only) and the next greedy token."""
    start = time.perf_counter()
    logits = contender.forward(ids, cache, logits_to_keep=1).logits
    seconds = time.perf_counter() - start
    return ids.numel() / seconds, logits[:, -1:].argmax(-1)


@torch.no_grad()
def decode(contender: Contender, cache: Any, token: torch.Tensor, tokens: int, model: Callable | None = None) -> float:
    """Tokens/s of a greedy loop of `tokens` one-token forwards (all rows counted)."""
    start = time.perf_counter()
    for _ in range(tokens):
        token = contender.forward(token, cache, model=model).logits[:, -1:].argmax(-1)
    return token.shape[0] * tokens / (time.perf_counter() - start)


def decode_on(contender: Contender, cache: Any, token: torch.Tensor, context: int, shape: Shape, model=None):
    """A measurement callable: warm up, then decode `shape.decode_tokens` and crop back to `context`."""

    def measure() -> float:
        decode(contender, cache, token, shape.warmup_tokens, model)
        crop_to(cache, context)
        value = decode(contender, cache, token, shape.decode_tokens, model)
        crop_to(cache, context)
        return value

    return measure


@torch.no_grad()
def generate_throughput(contender: Contender, ids: torch.Tensor, new_tokens: int, **extra) -> float:
    """Tokens/s of a whole greedy `generate` (prefill included)."""
    start = time.perf_counter()
    contender.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        **contender.kwargs,
        **extra,
    )
    return ids.shape[0] * new_tokens / (time.perf_counter() - start)


def train_step(contender: Contender, ids: torch.Tensor) -> float:
    """Training tokens/s of one forward + backward (no optimizer, activation checkpointing off)."""
    model = contender.model
    kwargs = dict(contender.kwargs)
    if "num_steps" in kwargs:  # backpropagate through every step, as the unrolled model does
        kwargs["num_steps"] = (0, kwargs["num_steps"])
    model.train()
    model.zero_grad(set_to_none=True)
    try:
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False, **kwargs).loss
        loss.backward()
        seconds = time.perf_counter() - start
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    return ids.numel() / seconds


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of CPU bytes allocated (and not yet freed) while `fn` runs, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    current = peak = 0
    for event in events:
        current += event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def cache_bytes(cache: Any) -> tuple[int, int]:
    """(bytes of the positions in use, bytes allocated) of the keys and values of any cache of this benchmark."""
    length = int(cache.get_seq_length())
    used = allocated = 0
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if keys is None or keys.numel() == 0:
            continue
        capacity = keys.shape[-2]
        held = min(getattr(layer, "length", length), capacity)
        assert values is not None  # a cache layer holding keys holds their values
        for tensor in (keys, values):
            allocated += tensor.nbytes
            used += tensor.nbytes * held // capacity
    return used, allocated


# ---- the chain task: adaptive exit and KV-cache sharing on a trained model ----


def chain_texts(tokenizer, n: int, seed: int, n_queries: int = 4) -> list[dict[str, torch.Tensor]]:
    """`n` chain-task texts (statements, then answered queries) as single rows: ids (1, L) and labels at the answers."""
    from .chain_training import ChainOptions, training_batch

    batch = training_batch(tokenizer, random.Random(seed), n, options=ChainOptions(n_queries=n_queries))
    rows = []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
        length = int(mask.sum())
        labels = labels[:length].clone()
        labels[length - 1] = -100  # the appended end-of-text: score the answers only
        rows.append({"input_ids": ids[None, :length], "labels": labels[None]})
    return rows


@torch.no_grad()
def teacher_forced(model, text: dict[str, torch.Tensor], cache: RecurrentCache, **kwargs) -> dict[str, float]:
    """Feed a text one token per forward through `cache`; loss and accuracy at the labelled positions, steps used."""
    ids, labels = text["input_ids"], text["labels"]
    step_logits: list[torch.Tensor] = []
    steps: list[int] = []
    for i in range(ids.shape[1] - 1):
        out = model(input_ids=ids[:, i : i + 1], past_key_values=cache, use_cache=True, **kwargs)
        step_logits.append(out.logits[:, -1])
        steps.append(int(out.steps_used.sum()))
    logits = torch.stack(step_logits, dim=1)  # (1, L - 1, V): predictions of tokens 1..L-1
    targets = labels[:, 1:]
    scored = targets != -100
    loss = nn.functional.cross_entropy(logits[scored], targets[scored], reduction="sum")
    correct = (logits.argmax(-1)[scored] == targets[scored]).sum()
    return {
        "loss_sum": float(loss),
        "correct": int(correct),
        "scored": int(scored.sum()),
        "tokens": ids.shape[1] - 1,
        "steps": sum(steps),
        "cache_bytes": cache.nbytes(),
    }


def summarize(runs: list[dict[str, float]], seconds: float | None = None) -> dict[str, float]:
    total = {key: sum(run[key] for run in runs) for key in ("loss_sum", "correct", "scored", "tokens", "steps")}
    result = {
        "loss": total["loss_sum"] / max(total["scored"], 1),
        "accuracy": total["correct"] / max(total["scored"], 1),
        "answers": total["scored"],
        "tokens": total["tokens"],
        "mean_steps": total["steps"] / max(total["tokens"], 1),
        "cache_bytes": max(run["cache_bytes"] for run in runs),
    }
    if seconds is not None:
        result["tokens_per_s"] = total["tokens"] / seconds
    return result


def adaptive_exit(model, texts: list[dict[str, torch.Tensor]], num_steps: int, criterion: str) -> dict[str, dict]:
    """Teacher-forced decode of the chain texts at a fixed `num_steps` and with the exit `criterion` (num_steps then
    the maximum), alternating text by text so that both see the same machine load."""
    modes: dict[str, dict[str, Any]] = {
        "fixed": {"num_steps": num_steps, "init_scale": 0.0},
        criterion: {"num_steps": num_steps, "init_scale": 0.0, "exit_criterion": criterion},
    }
    runs: dict[str, list] = {mode: [] for mode in modes}
    seconds = dict.fromkeys(modes, 0.0)
    for i, text in enumerate(texts):
        for mode in list(modes) if i % 2 == 0 else reversed(list(modes)):
            start = time.perf_counter()
            runs[mode].append(teacher_forced(model, text, RecurrentCache(model.config), **modes[mode]))
            seconds[mode] += time.perf_counter() - start
    return {mode: summarize(runs[mode], seconds[mode]) for mode in modes}


def kv_sharing(model, texts: list[dict[str, torch.Tensor]], num_steps: int, slots: tuple[int, ...]) -> list[dict]:
    """Teacher-forced loss and cache bytes with one slot per step, and with N shared slots per core layer."""
    rows = []
    for core_slots in (None, *slots):
        runs = [
            teacher_forced(
                model, text, RecurrentCache(model.config, core_slots=core_slots), num_steps=num_steps, init_scale=0.0
            )
            for text in texts
        ]
        rows.append({"core_slots": core_slots, **summarize(runs)})
    return rows


__all__ = [
    "DEFAULT_PRESETS",
    "PRESETS",
    "Contender",
    "Shape",
    "adaptive_exit",
    "build_contenders",
    "cache_bytes",
    "chain_texts",
    "compare",
    "crop_to",
    "decode",
    "decode_on",
    "generate_throughput",
    "interleaved",
    "kv_sharing",
    "paired",
    "peak_bytes",
    "prefill",
    "prompt_ids",
    "train_step",
]
