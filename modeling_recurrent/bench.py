"""`recurrent-depth bench`: speed and memory against transformers' LlamaForCausalLM of the same total depth.

Both models run in this process, with the same threads and dtype, in alternation (see `bench_cases.interleaved`),
and every result is a ratio of medians: this package / the unrolled Llama (prelude + core * num_steps + coda layers
of the same width, heads, MLP and vocabulary). Absolute numbers are printed for context only. Targets (issue 8):
decode >= 1.0 at batch 1 and 8, prefill >= 0.95, training step >= 0.9, KV-cache sharing with 4 slots per core layer at
num_steps 32 >= 4x smaller, adaptive exit (kl) on the chain model >= 1.5x fixed num_steps 32 within 1 accuracy point,
and a static-cache decode path faster than the dynamic one at batch 1.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .bench_cases import DEFAULT_PRESETS, PRESETS, Shape

DEFAULT_CHAIN_MODEL = Path(__file__).resolve().parent / "checkpoints" / "chain-tiny"


# metric -> (target, what the ratio means). A target is a lower bound ("higher is better for this package"), except
# for "decode growth", an upper bound.
TARGETS: dict[str, tuple[float | None, str]] = {
    "prefill": (0.95, "tokens/s ours / llama"),
    "decode": (1.0, "tokens/s ours / llama"),
    "generate": (1.0, "tokens/s ours / llama (whole generate, prefill included)"),
    "train step": (0.9, "tokens/s ours / llama (forward + backward)"),
    "decode static": (None, "tokens/s ours / llama, both with a static cache, eager"),
    "static vs dynamic": (None, "tokens/s ours static / ours dynamic, eager"),
    "compiled static vs dynamic": (1.0, "tokens/s ours compiled static / ours dynamic eager"),
    "compiled static vs llama": (None, "tokens/s ours compiled static / llama dynamic eager"),
    "compiled vs compiled llama": (None, "tokens/s ours compiled static / llama compiled static"),
    "kv bytes": (None, "bytes llama / ours (in use)"),
    "peak memory": (None, "bytes llama / ours (peak allocated during generate)"),
    "kv sharing 4 slots": (4.0, "bytes one slot per step / 4 slots per core layer, num_steps 32"),
    "decode growth": (2.0, "ms/token at context 2048 / at context 128, ours (at most 2: linear attention cost)"),
    "adaptive exit": (1.5, "tokens/s kl / fixed num_steps 32, chain model"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        default=DEFAULT_PRESETS,
        help=f"comma-separated shapes among {sorted(PRESETS)} (default {DEFAULT_PRESETS}; 'quick' is the smoke test)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the smoke test: preset 'quick', 1 repeat, no compile, 2 chain texts at 4 steps (overrides --preset, "
        "--repeats, --compile and --chain-problems)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds per measurement; medians are reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of both models")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time torch.compile'd static-cache decode (compiles twice per preset; on by default)",
    )
    parser.add_argument(
        "--compile-llama",
        action="store_true",
        help="with --compile, also compile Llama's static-cache decode (compiled vs compiled; twice the compile time)",
    )
    parser.add_argument(
        "--chain-model",
        default=str(DEFAULT_CHAIN_MODEL),
        help="trained chain model for adaptive exit and KV-sharing quality (skipped if the folder does not exist)",
    )
    parser.add_argument("--chain-problems", type=int, default=24, help="chain-task texts (4 answered queries each)")
    parser.add_argument("--out", default="bench.json", help="JSON file for the results")


def run(args: argparse.Namespace) -> int:
    presets = ["quick"] if args.quick else [name.strip() for name in args.preset.split(",") if name.strip()]
    unknown = [name for name in presets if name not in PRESETS]
    if unknown or not presets:
        raise ValueError(f"--preset must name shapes among {sorted(PRESETS)}, got {args.preset!r}")
    counts = {"--repeats": args.repeats, "--chain-problems": args.chain_problems, "--threads": args.threads}
    for name, value in counts.items():
        if value is not None and value < 1:  # checked before the first preset: a late failure would lose every result
            raise ValueError(f"{name} must be >= 1, got {value}")
    repeats = 1 if args.quick else args.repeats
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "settings": {
            "presets": presets,
            "repeats": repeats,
            "threads": torch.get_num_threads(),
            "dtype": args.dtype,
            "compile": args.compile and not args.quick,
            "compile_llama": args.compile and args.compile_llama and not args.quick,
            "torch": torch.__version__,
            "transformers": _transformers_version(),
            "machine": platform.processor() or platform.machine(),
        },
        "rows": [],
        "presets": {},
    }
    for name in presets:
        report["presets"][name] = bench_preset(
            name,
            PRESETS[name],
            dtype,
            repeats,
            compile_decode=report["settings"]["compile"],
            compile_llama=report["settings"]["compile_llama"],
            rows=report["rows"],
        )
    problems = 2 if args.quick else args.chain_problems
    report["chain"] = bench_chain(Path(args.chain_model), problems, report["rows"], quick=args.quick)
    report["seconds"] = time.perf_counter() - started
    print_table(report["rows"])
    print_chain(report["chain"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"\n{len(report['rows'])} results in {report['seconds']:.0f} s; JSON written to {args.out}")
    return 0


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _row(rows: list, preset: str, metric: str, case: str, result: dict[str, float], unit: str, **extra) -> dict:
    target, meaning = TARGETS[metric]
    row = {
        "preset": preset,
        "metric": metric,
        "case": case,
        "ours": result["ours"],
        "baseline": result["baseline"],
        "unit": unit,
        "ratio": result["ratio"],
        "meaning": meaning,
        "target": target,
        "met": None if target is None else bool(_within(metric, result["ratio"], target)),
        **extra,
    }
    rows.append(row)
    _log(f"  {metric:<26} {case:<22} ratio {row['ratio']:.2f}")
    return row


def _within(metric: str, ratio: float, target: float) -> bool:
    return ratio <= target if metric == "decode growth" else ratio >= target


def bench_preset(
    name: str,
    shape: Shape,
    dtype: torch.dtype,
    repeats: int,
    compile_decode: bool,
    rows: list,
    compile_llama: bool = False,
) -> dict[str, Any]:
    """Every measurement of one shape; appends its rows and returns the shape's description and extra details."""
    from . import bench_cases as bc

    _log(f"[{name}] building models")
    ours, llama = bc.build_contenders(shape, dtype)
    info: dict[str, Any] = {
        "shape": {key: getattr(shape, key) for key in shape.__dataclass_fields__},
        "parameters": {"ours": bc.parameter_count(ours.model), "llama": bc.parameter_count(llama.model)},
        "depth": ours.model.config.effective_depth(shape.num_steps),
    }
    vocab = shape.vocab_size
    for contender in (ours, llama):  # one-off costs (first allocations, lazy imports) out of the timings
        bc.prefill(contender, bc.prompt_ids(1, 8, vocab), contender.new_cache())

    decode_ms: dict[int, float] = {}
    contexts = sorted({*shape.prefill_contexts, *(context for context, _ in shape.decode_cases)})
    for context in contexts:
        ids = bc.prompt_ids(1, context, vocab, seed=context)
        kept: dict[str, tuple] = {}

        def prefill_of(contender, ids=ids, kept=kept):
            def measure() -> float:
                cache = contender.new_cache()
                tokens_per_s, token = bc.prefill(contender, ids, cache)
                kept[contender.name] = (cache, token)
                return tokens_per_s

            return measure

        _log(f"[{name}] context {context}")
        if context in shape.prefill_contexts:
            result = bc.paired(prefill_of(ours), prefill_of(llama), repeats)
            _row(rows, name, "prefill", f"context {context}", result, "tokens/s")
        else:
            prefill_of(ours)()
            prefill_of(llama)()
        if context == max(contexts):
            info["kv_bytes"] = _kv_bytes(rows, name, context, kept["ours"][0], kept["llama"][0])
        for batch in sorted(b for c, b in shape.decode_cases if c == context):
            if batch > 1:
                for contender_name, (cache, token) in list(kept.items()):
                    cache.batch_repeat_interleave(batch)
                    kept[contender_name] = (cache, token.repeat_interleave(batch, dim=0))
            measures = {
                c.name: bc.decode_on(c, kept[c.name][0], kept[c.name][1], context, shape) for c in (ours, llama)
            }
            result = bc.paired(measures["ours"], measures["llama"], repeats)
            _row(rows, name, "decode", f"context {context}, batch {batch}", result, "tokens/s")
            if batch == 1:
                decode_ms[context] = 1000 / result["ours"]
    if 128 in decode_ms and 2048 in decode_ms:
        growth = decode_ms[2048] / decode_ms[128]
        result = {"ours": decode_ms[2048], "baseline": decode_ms[128], "ratio": growth}
        _row(rows, name, "decode growth", "ours, batch 1, 2048 vs 128", result, "ms/token")

    for prompt, new, batch in shape.generate_cases:
        _log(f"[{name}] generate {prompt}/{new}/{batch}")
        ids = bc.prompt_ids(batch, prompt, vocab, seed=prompt + batch)
        result = bc.paired(
            partial(bc.generate_throughput, ours, ids, new),
            partial(bc.generate_throughput, llama, ids, new),
            repeats,
        )
        _row(rows, name, "generate", f"{prompt}/{new}/{batch} (prompt/new/batch)", result, "tokens/s")

    _log(f"[{name}] training step")
    ids = bc.prompt_ids(*shape.train_batch, vocab)
    for contender in (ours, llama):
        bc.train_step(contender, ids[:, :16])  # first backward allocations out of the timings
    result = bc.paired(lambda: bc.train_step(ours, ids), lambda: bc.train_step(llama, ids), repeats)
    _row(rows, name, "train step", f"batch {shape.train_batch[0]} x {shape.train_batch[1]}", result, "tokens/s")

    _log(f"[{name}] memory")
    info["peak_memory"] = _peak_memory(rows, name, shape, ours, llama)
    info["kv_sharing_bytes"] = _kv_sharing_bytes(rows, name, ours)

    if shape.static_contexts:
        info["static"] = _static_decode(rows, name, shape, ours, llama, repeats, compile_decode, compile_llama)
    return info


def _kv_bytes(rows: list, preset: str, context: int, ours_cache, llama_cache) -> dict[str, int]:
    from .bench_cases import cache_bytes

    ours_used, ours_allocated = cache_bytes(ours_cache)
    llama_used, llama_allocated = cache_bytes(llama_cache)
    result = {"ours": ours_used, "baseline": llama_used, "ratio": llama_used / ours_used}
    _row(rows, preset, "kv bytes", f"context {context}", result, "bytes", allocated_ours=ours_allocated)
    return {"ours_used": ours_used, "ours_allocated": ours_allocated, "llama": llama_used}


def _peak_memory(rows: list, preset: str, shape: Shape, ours, llama) -> dict[str, int]:
    from . import bench_cases as bc

    context = min(512, max(context for context, _ in shape.decode_cases))
    ids = bc.prompt_ids(1, context, shape.vocab_size)
    peaks = {c.name: bc.peak_bytes(partial(bc.generate_throughput, c, ids, shape.decode_tokens)) for c in (ours, llama)}
    result = {"ours": peaks["ours"], "baseline": peaks["llama"], "ratio": peaks["llama"] / peaks["ours"]}
    _row(rows, preset, "peak memory", f"generate {context}+{shape.decode_tokens}", result, "bytes")
    return peaks


def _kv_sharing_bytes(rows: list, preset: str, ours) -> dict[str, int]:
    """Cache bytes after a 64-token prompt at num_steps 32: one slot per step vs 4 slots per core layer."""
    from .bench_cases import prompt_ids
    from .cache_recurrent_depth import RecurrentCache

    model, ids = ours.model, prompt_ids(1, 64, ours.model.config.vocab_size)
    sizes = {}
    for slots in (None, 4):
        cache = RecurrentCache(model.config, core_slots=slots)
        with torch.no_grad():
            model(ids, past_key_values=cache, num_steps=32, init_scale=0.0, logits_to_keep=1)
        sizes[slots] = cache.nbytes()
    result = {"ours": sizes[4], "baseline": sizes[None], "ratio": sizes[None] / sizes[4]}
    _row(rows, preset, "kv sharing 4 slots", "64 tokens, num_steps 32", result, "bytes")
    return {"one_per_step": sizes[None], "four_slots": sizes[4]}


def _static_decode(
    rows: list, preset: str, shape: Shape, ours, llama, repeats: int, compile_decode: bool, compile_llama: bool = False
) -> dict:
    """Batch-1 decode with static caches: eager for both models, and the decode step compiled (this package's, and
    with `compile_llama` Llama's too)."""
    from . import bench_cases as bc

    info: dict[str, Any] = {"compile_seconds": {}}
    compiled = {}
    if compile_decode:
        compiled["ours compiled"] = (ours, torch.compile(ours.model))
        if compile_llama:
            compiled["llama compiled"] = (llama, torch.compile(llama.model))
    length_extra = shape.warmup_tokens + shape.decode_tokens + 1
    for context in shape.static_contexts:
        _log(f"[{preset}] static cache, context {context}")
        ids = bc.prompt_ids(1, context, shape.vocab_size, seed=context)
        measures = {}
        for key, contender, static in (
            ("ours static", ours, True),
            ("llama static", llama, True),
            ("ours dynamic", ours, False),
            ("llama dynamic", llama, False),
        ):
            cache = contender.new_static_cache(context + length_extra, 1) if static else contender.new_cache()
            _, token = bc.prefill(contender, ids, cache)
            measures[key] = bc.decode_on(contender, cache, token, context, shape)
        for key, (contender, module) in list(compiled.items()):
            cache = contender.new_static_cache(context + length_extra, 1)
            _, token = bc.prefill(contender, ids, cache)
            start = time.perf_counter()
            try:
                bc.decode(contender, cache, token, 2, model=module)  # compiles (again when the length changes)
            except Exception as error:  # report, and keep the other results
                info[f"{key} error"] = f"{type(error).__name__}: {error}"
                del compiled[key]
                continue
            info["compile_seconds"].setdefault(key, []).append(time.perf_counter() - start)
            bc.crop_to(cache, context)
            measures[key] = bc.decode_on(contender, cache, token, context, shape, model=module)
        values = bc.interleaved(measures, repeats)
        case = f"context {context}, batch 1"
        _row(rows, preset, "decode static", case, bc.compare(values, "ours static", "llama static"), "tokens/s")
        _row(rows, preset, "static vs dynamic", case, bc.compare(values, "ours static", "ours dynamic"), "tokens/s")
        if "ours compiled" in values:
            _row(
                rows,
                preset,
                "compiled static vs dynamic",
                case,
                bc.compare(values, "ours compiled", "ours dynamic"),
                "tokens/s",
            )
            _row(
                rows,
                preset,
                "compiled static vs llama",
                case,
                bc.compare(values, "ours compiled", "llama dynamic"),
                "tokens/s",
            )
        if "ours compiled" in values and "llama compiled" in values:
            result = bc.compare(values, "ours compiled", "llama compiled")
            _row(rows, preset, "compiled vs compiled llama", case, result, "tokens/s")
    return info


def bench_chain(folder: Path, problems: int, rows: list, quick: bool = False) -> dict[str, Any]:
    """Adaptive exit (kl) vs fixed num_steps 32, and KV-cache sharing quality, on a trained chain model."""
    if not (folder / "config.json").is_file():
        message = f"skipped: no chain model at {folder} (train one, or pass --chain-model PATH)"
        _log(f"[chain] {message}")
        return {"skipped": message}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import bench_cases as bc

    _log(f"[chain] {folder}: adaptive exit on {problems} texts")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    texts = bc.chain_texts(tokenizer, problems, seed=2026)
    steps = 4 if quick else 32
    modes = bc.adaptive_exit(model, texts, steps, "kl")
    fixed, kl = modes["fixed"], modes["kl"]
    result = {
        "ours": kl["tokens_per_s"],
        "baseline": fixed["tokens_per_s"],
        "ratio": kl["tokens_per_s"] / fixed["tokens_per_s"],
    }
    accuracy_drop = 100 * (fixed["accuracy"] - kl["accuracy"])
    row = _row(
        rows,
        "chain",
        "adaptive exit",
        f"kl vs fixed {steps} steps",
        result,
        "tokens/s",
        accuracy_drop_points=accuracy_drop,
    )
    row["met"] = bool(row["met"] and accuracy_drop <= 1.0)
    _log(f"[chain] KV-cache sharing at num_steps {steps}")
    sharing = bc.kv_sharing(model, texts[: max(2, problems // 3)], steps, (1, 2, 4))
    return {"model": str(folder), "num_steps": steps, "adaptive_exit": modes, "kv_sharing": sharing}


def _format(value: float, unit: str) -> str:
    if unit == "bytes":
        return f"{value / 2**20:.2f} MiB"
    if unit == "ms/token":
        return f"{value:.1f} ms"
    return f"{value:,.0f}"


def print_table(rows: list[dict]) -> None:
    header = f"{'preset':<7} {'metric':<27} {'case':<30} {'ours':>12} {'baseline':>12} {'ratio':>6} {'target':>7} met"
    print("\nratios: higher is better for this package (ours / llama for throughput, llama / ours for bytes)")
    print(header)
    print("-" * len(header))
    for row in rows:
        bound = "<=" if row["metric"] == "decode growth" else ">="
        target = "" if row["target"] is None else f"{bound}{row['target']:g}"
        met = "" if row["met"] is None else ("yes" if row["met"] else "NO")
        print(
            f"{row['preset']:<7} {row['metric']:<27} {row['case']:<30} {_format(row['ours'], row['unit']):>12} "
            f"{_format(row['baseline'], row['unit']):>12} {row['ratio']:>6.3f} {target:>7} {met}"
        )


def print_chain(chain: dict[str, Any]) -> None:
    if "skipped" in chain:
        print(f"\nchain model: {chain['skipped']}")
        return
    print(f"\nchain model {chain['model']} (teacher-forced token-by-token decode, num_steps {chain['num_steps']}):")
    for mode, r in chain["adaptive_exit"].items():
        print(
            f"  {mode:<6} {r['tokens_per_s']:8.1f} tokens/s  mean steps {r['mean_steps']:5.2f}  "
            f"answer accuracy {100 * r['accuracy']:5.1f}% of {r['answers']}  loss {r['loss']:.4f}"
        )
    print("  KV-cache sharing (core_slots: cache bytes, loss at the answers, change vs one slot per step):")
    base = chain["kv_sharing"][0]
    for r in chain["kv_sharing"]:
        label = "per step" if r["core_slots"] is None else f"N={r['core_slots']}"
        print(
            f"    {label:<9} {r['cache_bytes'] / 2**10:9.1f} KiB "
            f"({base['cache_bytes'] / r['cache_bytes']:4.1f}x less)  loss {r['loss']:.6f} "
            f"({r['loss'] - base['loss']:+.6f})  accuracy {100 * r['accuracy']:5.1f}%"
        )


__all__ = ["add_arguments", "bench_chain", "bench_preset", "run"]
