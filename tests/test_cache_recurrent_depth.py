"""RecurrentCache on its own: slot mapping, contiguous growth, missing steps, crop and batch operations."""

import pytest
import torch

from modeling_recurrent import RecurrentCache
from modeling_recurrent.cache_recurrent_depth import CODA, CORE, PRELUDE, kept_length

from .conftest import tiny_config, tiny_model


def kv(batch=2, length=3, fill=0.0):
    return torch.full((batch, 4, length, 8), fill), torch.full((batch, 4, length, 8), -fill)


@pytest.fixture
def config():
    return tiny_config(n_prelude=2, n_core=3, n_coda=1, hidden_size=32, num_attention_heads=4)


def test_slot_mapping_is_one_function(config):
    full, shared = RecurrentCache(config), RecurrentCache(config, core_slots=2)
    assert [full.slot(PRELUDE, i) for i in range(2)] == [0, 1]
    assert full.slot(CODA, 0) == 2
    assert [full.slot(CORE, j, 0) for j in range(3)] == [3, 4, 5]
    assert [full.slot(CORE, j, 4) for j in range(3)] == [15, 16, 17]
    assert shared.slot(CORE, 1, 4) == shared.slot(CORE, 1, 0) == 4 and shared.slot(CORE, 1, 5) == 7
    with pytest.raises(ValueError, match="phase"):
        full.slot("middle", 0)


def test_appends_grow_capacity_geometrically(config):
    cache = RecurrentCache(config)
    capacities = set()
    for position in range(100):
        k, v = kv(length=1, fill=float(position))
        keys, values = cache.update_block(k, v, PRELUDE, 0, 0, start=position)
        capacities.add(cache.layers[0].keys.shape[-2])
        assert keys.shape == (2, 4, position + 1, 8)
    assert len(capacities) <= 5  # 16, 32, 64, 128: no per-token reallocation
    assert torch.equal(keys[0, 0, :, 0], torch.arange(100, dtype=torch.float32))


def test_steps_a_token_skipped_take_its_latest_step(config):
    cache = RecurrentCache(config)
    # first call: 2 tokens run 3 steps; second call: 1 token runs 5 steps
    for step in range(3):
        cache.update_block(*kv(length=2, fill=10.0 + step), CORE, 0, step, start=0)
    for step in range(5):
        keys, _ = cache.update_block(*kv(length=1, fill=20.0 + step), CORE, 0, step, start=2)
        assert keys[0, 0, :, 0].tolist() == [10.0 + min(step, 2)] * 2 + [20.0 + step]


def test_rows_write_only_their_rows(config):
    cache = RecurrentCache(config)
    cache.update_block(*kv(batch=3, length=1, fill=1.0), CORE, 0, 0, start=0)
    rows = torch.tensor([0, 2])
    keys, _ = cache.update_block(*kv(batch=2, length=1, fill=2.0), CORE, 0, 1, start=0, rows=rows)
    assert keys.shape[0] == 2
    stored = cache.layers[cache.slot(CORE, 0, 1)].keys[:, 0, 0, 0]
    assert stored.tolist() == [2.0, 1.0, 2.0]  # row 1 skipped step 1: it keeps step 0


def test_crop_keeps_shorter_slots_intact(config):
    cache = RecurrentCache(config)
    cache.update_block(*kv(length=4), CORE, 0, 0, start=0)
    cache.update_block(*kv(length=4), CORE, 0, 1, start=0)
    cache.update_block(*kv(length=2), CORE, 0, 0, start=4)  # these two tokens ran one step only
    assert cache.get_seq_length() == 6
    cache.crop(-1)
    assert cache.get_seq_length() == 5
    assert cache.layers[cache.slot(CORE, 0, 0)].length == 5 and cache.layers[cache.slot(CORE, 0, 1)].length == 4
    cache.crop(3)  # a positive value is the length to keep
    assert cache.get_seq_length() == 3 and cache.layers[cache.slot(CORE, 0, 1)].length == 3


def test_batch_operations_and_memory(config):
    cache = RecurrentCache(config)
    k = torch.arange(2.0)[:, None, None, None].expand(2, 4, 3, 8).contiguous()
    cache.update_block(k, k, PRELUDE, 0, 0, start=0)
    assert cache.nbytes() == 2 * (2 * 4 * 3 * 8 * 4)
    cache.reorder_cache(torch.tensor([1, 0]))
    assert cache.layers[0].keys[:, 0, 0, 0].tolist() == [1.0, 0.0]
    cache.batch_repeat_interleave(2)
    assert cache.layers[0].keys[:, 0, 0, 0].tolist() == [1.0, 1.0, 0.0, 0.0]
    cache.batch_select_indices(torch.tensor([0, 3]))
    assert cache.layers[0].keys[:, 0, 0, 0].tolist() == [1.0, 0.0]
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0


def test_different_num_steps_per_call_in_a_model():
    """Decoding with fewer steps than the prompt, then more: every call sees a complete cache."""
    model = tiny_model()
    cache = RecurrentCache(model.config)
    x = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        model(x[:, :4], past_key_values=cache, num_steps=2, init_scale=0.0)
        model(x[:, 4:5], past_key_values=cache, num_steps=5, init_scale=0.0)
        out = model(x[:, 5:], past_key_values=cache, num_steps=3, init_scale=0.0)
    assert torch.isfinite(out.logits).all() and cache.get_seq_length() == 6
    assert cache.steps[0].tolist() == [2, 2, 2, 2, 5, 3]


@pytest.mark.parametrize(("tokens_to_remove", "kept"), [(-2, 3), (-9, 0), (0, 5), (3, 3), (9, 5)])
def test_kept_length_reads_negative_counts_as_drops_and_positive_ones_as_lengths(tokens_to_remove, kept):
    assert kept_length(tokens_to_remove, 5) == kept
