"""generate() estimates its KV cache before allocating anything and refuses, naming the estimate and a shared-slot
cache that would fit, instead of being killed for running out of memory."""

import pytest
import torch

from modeling_recurrent import RecurrentCache, StaticRecurrentCache

from ..conftest import tiny_config


def prompt(batch=2, length=6):
    return torch.randint(1, 64, (batch, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("core_slots", [None, 1, 3])
def test_estimate_equals_what_a_cache_holds(model, core_slots):
    cache = RecurrentCache(model.config, core_slots=core_slots)
    with torch.no_grad():
        model(prompt(2, 7), past_key_values=cache, num_steps=5)
    assert cache.nbytes() == RecurrentCache.estimate_bytes(model.config, 2, 7, 5, core_slots)
    # kv heads x head_dim x bytes: (1 prelude + 1 coda + 2 core x held steps) x 2 x 2 rows x 4 x 8 x 7 x 4 bytes
    held = 5 if core_slots is None else core_slots
    assert cache.nbytes() == (2 + 2 * held) * 2 * 2 * 4 * 8 * 7 * 4
    static = StaticRecurrentCache(model.config, max_cache_len=7, batch_size=2, num_steps=5, core_slots=core_slots)
    assert static.nbytes() == cache.nbytes()


def test_estimate_follows_gqa_head_dim_and_dtype():
    config = tiny_config(num_key_value_heads=2, head_dim=6, qk_bias=False)
    full = RecurrentCache.estimate_bytes(config, 3, 10, 4, dtype=torch.bfloat16)
    assert full == (1 + 1 + 2 * 4) * 2 * 3 * 2 * 6 * 10 * 2
    assert RecurrentCache.estimate_bytes(config, 3, 10, 4, core_slots=8) == 2 * full  # float32, 4 held steps


def test_huge_num_steps_is_refused_before_allocating(model):
    with pytest.raises(ValueError, match=r"GiB of KV cache .*num_steps=1000000000.*=RecurrentCache\(model\.config, "
                                         r"core_slots=\d+\)"):  # fmt: skip
        model.generate(prompt(), num_steps=10**9, max_new_tokens=4)


def test_huge_max_new_tokens_is_refused_before_allocating(model):
    with pytest.raises(ValueError, match="even one shared core slot per layer would not fit: lower max_new_tokens"):
        model.generate(prompt(), num_steps=4, max_new_tokens=10**12)


@pytest.mark.parametrize("generation", [dict(num_beams=3), dict(num_return_sequences=3, do_sample=True)])
def test_beams_and_return_sequences_count_as_rows(model, monkeypatch, generation):
    need = RecurrentCache.estimate_bytes(model.config, 2 * 3, 6 + 4, 8)  # 2 prompts x 3 rows each
    monkeypatch.setattr(RecurrentCache, "available_bytes", staticmethod(lambda device: need - 1))
    with pytest.raises(ValueError, match="6 rows x 10 positions"):
        model.generate(prompt(), num_steps=8, max_new_tokens=4, **generation)
    monkeypatch.setattr(RecurrentCache, "available_bytes", staticmethod(lambda device: need))
    model.generate(prompt(), num_steps=8, max_new_tokens=4, **generation)


def test_the_suggested_sharing_fits_and_is_accepted(model, monkeypatch):
    x, steps, new_tokens = prompt(), 8, 5
    length = x.shape[1] + new_tokens
    # the suggestion leaves half of the memory free (a growing cache may reserve twice its length): 3 slots fit
    available = 2 * RecurrentCache.estimate_bytes(model.config, 2, length, steps, core_slots=3)
    monkeypatch.setattr(RecurrentCache, "available_bytes", staticmethod(lambda device: available))
    with pytest.raises(ValueError, match=r"core_slots=3\)") as error:
        model.generate(x, num_steps=steps, max_new_tokens=new_tokens)
    assert f"{RecurrentCache.estimate_bytes(model.config, 2, length, steps) / 2**30:.3g} GiB" in str(error.value)
    with pytest.raises(ValueError, match=r"core_slots=8\).* core_slots=3\)"):  # a given cache that is too large
        model.generate(x, num_steps=steps, max_new_tokens=new_tokens, cache=RecurrentCache(model.config, core_slots=8))
    cache = RecurrentCache(model.config, core_slots=3)
    out = model.generate(x, num_steps=steps, max_new_tokens=new_tokens, cache=cache, do_sample=False)
    assert out.shape == (2, length) and cache.nbytes() <= available


def test_static_cache_request_is_checked_and_a_given_static_cache_is_not(model, monkeypatch):
    monkeypatch.setattr(RecurrentCache, "available_bytes", staticmethod(lambda device: 1024))
    with pytest.raises(ValueError, match="KV cache"):
        model.generate(prompt(), num_steps=4, max_new_tokens=3, cache_implementation="static")
    static = StaticRecurrentCache(model.config, max_cache_len=9, batch_size=2, num_steps=4)  # already allocated
    model.generate(prompt(), num_steps=4, max_new_tokens=3, cache=static, do_sample=False)


def test_no_cache_or_unknown_memory_is_not_refused(model, monkeypatch):
    monkeypatch.setattr(RecurrentCache, "available_bytes", staticmethod(lambda device: 0))
    model.generate(prompt(), num_steps=2, max_new_tokens=2, use_cache=False)
    monkeypatch.setattr(RecurrentCache, "available_bytes", staticmethod(lambda device: None))
    model.generate(prompt(), num_steps=2, max_new_tokens=2)


def test_available_memory_on_cpu_is_psutils():
    psutil = pytest.importorskip("psutil")
    available = RecurrentCache.available_bytes(torch.device("cpu"))
    assert 0 < available <= psutil.virtual_memory().total
