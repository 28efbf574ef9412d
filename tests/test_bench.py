"""The benchmark command end to end in its smallest mode (no timing is asserted), and the static-cache decode path."""

import json

import pytest
import torch
from transformers import CompileConfig

from modeling_recurrent import RecurrentCache, RecurrentDepthForCausalLM, StaticRecurrentCache
from modeling_recurrent.chain_task import build_tokenizer
from modeling_recurrent.cli import main

from .conftest import tiny_config, tiny_model


@pytest.fixture(scope="module")
def chain_folder(tmp_path_factory):
    """A random model with the chain task's tokenizer: enough to run the bench's chain measurements."""
    tokenizer = build_tokenizer()
    folder = tmp_path_factory.mktemp("chain")
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    RecurrentDepthForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_quick_bench_writes_every_ratio(tmp_path, chain_folder):
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:  # one thread: tiny kernels on a busy machine are faster without OpenMP barriers
        assert main(["bench", "--quick", "--threads", "1", "--out", str(out), "--chain-model", str(chain_folder)]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    assert report["settings"]["presets"] == ["quick"] and report["settings"]["threads"] == 1
    metrics = {row["metric"] for row in report["rows"]}
    assert {
        "prefill",
        "decode",
        "generate",
        "train step",
        "kv bytes",
        "peak memory",
        "kv sharing 4 slots",
        "decode static",
        "static vs dynamic",
        "adaptive exit",
    } <= metrics
    for row in report["rows"]:
        assert row["ratio"] > 0 and row["ours"] > 0 and row["baseline"] > 0, row
        assert set(row) >= {"preset", "case", "unit", "target", "met", "meaning"}
    decode_cases = {row["case"] for row in report["rows"] if row["metric"] == "decode"}
    assert decode_cases == {"context 16, batch 1", "context 16, batch 2"}
    chain = report["chain"]
    assert set(chain["adaptive_exit"]) == {"fixed", "kl"}
    assert chain["adaptive_exit"]["fixed"]["mean_steps"] == chain["num_steps"]
    assert [r["core_slots"] for r in chain["kv_sharing"]] == [None, 1, 2, 4]
    assert all(r["cache_bytes"] > 0 and r["loss"] > 0 for r in chain["kv_sharing"])


def test_bench_skips_the_chain_part_without_a_model(tmp_path):
    from modeling_recurrent.bench import bench_chain

    rows = []
    assert "skipped" in bench_chain(tmp_path / "missing", 2, rows) and rows == []


def test_bench_refuses_unknown_presets(tmp_path):
    with pytest.raises(SystemExit):
        main(["bench", "--preset", "huge", "--out", str(tmp_path / "b.json")])


def padded_batch():
    prompts = [torch.randint(1, 64, (n,), generator=torch.Generator().manual_seed(n)) for n in (6, 3, 5)]
    batch = torch.zeros(3, 6, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, 6 - len(p) :], mask[i, 6 - len(p) :] = p, 1
    return batch, mask


GREEDY = dict(init_scale=0.0, max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True)


def assert_same_generation(dynamic, static):
    assert torch.equal(dynamic.sequences, static.sequences)
    assert max((a - b).abs().max() for a, b in zip(dynamic.logits, static.logits, strict=True)) <= 1e-5
    assert torch.equal(dynamic.num_steps_used, static.num_steps_used)


@pytest.mark.parametrize("steps", [1, 3])
def test_static_generate_equals_dynamic_with_padding(model, steps):
    batch, mask = padded_batch()
    kwargs = dict(GREEDY, num_steps=steps, output_logits=True)
    dynamic = model.generate(batch, attention_mask=mask, **kwargs)
    static = model.generate(batch, attention_mask=mask, cache_implementation="static", **kwargs)
    assert isinstance(static.cache, StaticRecurrentCache) and isinstance(dynamic.cache, RecurrentCache)
    assert static.cache.max_cache_len == batch.shape[1] + 6 - 1
    assert_same_generation(dynamic, static)


def test_static_generate_with_adaptive_exit_and_beams(model):
    batch, mask = padded_batch()
    kwargs = dict(GREEDY, num_steps=6, exit_criterion="kl", exit_threshold=1e-2, output_logits=True)
    dynamic = model.generate(batch, attention_mask=mask, **kwargs)
    static = model.generate(batch, attention_mask=mask, cache_implementation="static", **kwargs)
    assert_same_generation(dynamic, static)
    assert (static.num_steps_used < 6).any()
    beams = dict(GREEDY, num_steps=2, num_beams=2, num_return_sequences=2)
    dynamic = model.generate(batch, attention_mask=mask, **beams)
    static = model.generate(batch, attention_mask=mask, cache_implementation="static", **beams)
    assert torch.equal(dynamic.sequences, static.sequences)


def test_static_cache_fills_steps_a_call_did_not_run(model):
    """Fewer steps, then more: the static cache copies the last step forward, as the dynamic one looks it up."""
    x = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    dynamic, static = RecurrentCache(model.config), StaticRecurrentCache(model.config, 16, 2, num_steps=5)
    outputs = []
    for cache in (dynamic, static):
        with torch.no_grad():
            model(x[:, :4], past_key_values=cache, num_steps=2, init_scale=0.0)
            model(x[:, 4:5], past_key_values=cache, num_steps=5, init_scale=0.0)
            outputs.append(model(x[:, 5:], past_key_values=cache, num_steps=3, init_scale=0.0).logits)
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-5
    assert int(static.get_seq_length()) == 7 and torch.equal(static.steps[:, :7], dynamic.steps)


def test_static_cache_shared_slots_match_dynamic(model):
    x = torch.randint(1, 64, (1, 6), generator=torch.Generator().manual_seed(4))
    dynamic = RecurrentCache(model.config, core_slots=2)
    static = StaticRecurrentCache(model.config, 8, 1, num_steps=5, core_slots=2)
    assert static.num_core_slots == 2 and len(static.layers) == 2 + 2 * 2
    logits = []
    for cache in (dynamic, static):
        with torch.no_grad():
            model(x[:, :5], past_key_values=cache, num_steps=5, init_scale=0.0)
            logits.append(model(x[:, 5:], past_key_values=cache, num_steps=5, init_scale=0.0).logits)
    assert (logits[0] - logits[1]).abs().max() <= 1e-5


def test_static_cache_bad_use_is_named(model):
    cache = StaticRecurrentCache(model.config, max_cache_len=4, batch_size=1, num_steps=2)
    assert cache.is_compileable and cache.nbytes() > 0
    with torch.no_grad(), pytest.raises(ValueError, match="max_cache_len"):
        model(torch.ones(1, 5, dtype=torch.long), past_key_values=cache, num_steps=2)
    with torch.no_grad(), pytest.raises(ValueError, match="num_steps"):
        model(torch.ones(1, 2, dtype=torch.long), past_key_values=cache, num_steps=3)
    with pytest.raises(ValueError, match="batch_size"):
        StaticRecurrentCache(model.config, max_cache_len=4, batch_size=0)
    with pytest.raises(ValueError, match="'dynamic' or 'static'"):
        model.generate(torch.ones(1, 2, dtype=torch.long), cache_implementation="offloaded", max_new_tokens=2)


def test_static_cache_crop_and_reset(model):
    x = torch.randint(1, 64, (1, 6), generator=torch.Generator().manual_seed(5))
    cache = StaticRecurrentCache(model.config, 8, 1, num_steps=2)
    with torch.no_grad():
        model(x, past_key_values=cache, num_steps=2, init_scale=0.0)
        cache.crop(-2)
        again = model(x[:, 4:], past_key_values=cache, num_steps=2, init_scale=0.0).logits
        full = model(x, num_steps=2, init_scale=0.0).logits
    assert (again - full[:, 4:]).abs().max() <= 1e-5
    cache.reset()
    assert int(cache.get_seq_length()) == 0 and cache.last_latent is None


@pytest.mark.slow
def test_compiled_static_generate_equals_dynamic():
    """torch.compile of the decode step (about a minute of compilation on 2 CPU cores)."""
    model = tiny_model()
    batch, mask = padded_batch()
    compile_config = CompileConfig(mode="default")
    compile_config._compile_all_devices = True  # Transformers compiles on accelerators only unless told
    kwargs = dict(GREEDY, num_steps=3, output_logits=True)
    dynamic = model.generate(batch, attention_mask=mask, **kwargs)
    for _ in range(2):  # the second call reuses the compiled step
        static = model.generate(
            batch, attention_mask=mask, cache_implementation="static", compile_config=compile_config, **kwargs
        )
        assert_same_generation(dynamic, static)


@pytest.mark.parametrize("option", ["--chain-problems", "--threads", "--repeats"])
def test_bad_counts_fail_before_any_measurement(tmp_path, capsys, option):
    with pytest.raises(SystemExit):
        main(["bench", "--preset", "tiny", option, "0", "--out", str(tmp_path / "b.json")])
    assert f"{option} must be >= 1" in capsys.readouterr().err
