"""The preallocated cache: generate and forward with it equal the growing cache's, in every decode path."""

import pytest
import torch
from transformers import CompileConfig

from modeling_recurrent import RecurrentCache, StaticRecurrentCache

from .conftest import tiny_model


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


def test_a_refused_call_leaves_the_static_cache_as_it_was(model):
    """Too many steps is refused before anything is written, so later calls still match the growing cache."""
    x = torch.randint(1, 64, (1, 6), generator=torch.Generator().manual_seed(6))
    dynamic, static = RecurrentCache(model.config), StaticRecurrentCache(model.config, 8, 1, num_steps=4)
    with torch.no_grad(), pytest.raises(ValueError, match="num_steps"):
        model(x[:, :4], past_key_values=static, num_steps=6, init_scale=0.0)
    with pytest.raises(ValueError, match="batch size"):
        model(x[:, :4].expand(2, -1), past_key_values=static, num_steps=2, init_scale=0.0)
    outputs = []
    for cache in (dynamic, static):
        with torch.no_grad():
            model(x[:, :4], past_key_values=cache, num_steps=2, init_scale=0.0)
            outputs.append(model(x[:, 4:], past_key_values=cache, num_steps=4, init_scale=0.0).logits)
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-5


def test_row_repeat_and_select_match_the_growing_cache(model):
    x = torch.randint(1, 64, (2, 5), generator=torch.Generator().manual_seed(7))
    logits = []
    for cache in (RecurrentCache(model.config), StaticRecurrentCache(model.config, 8, 2, num_steps=3)):
        with torch.no_grad():
            model(x, past_key_values=cache, num_steps=3, init_scale=0.0)
            cache.batch_repeat_interleave(2)
            cache.batch_select_indices(torch.tensor([0, 3]))
            logits.append(model(x[:, :1], past_key_values=cache, num_steps=3, init_scale=0.0).logits)
    assert (logits[0] - logits[1]).abs().max() <= 1e-5
    assert cache.steps.shape[0] == 2 and cache.layers[0].keys.shape[0] == 2
