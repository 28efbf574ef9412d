"""Published huginn format <-> ours: parity with the published code, bit-exact round trips, meta at full size."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from modeling_recurrent import HuginnRavenForCausalLM, RecurrentDepthConfig, RecurrentDepthForCausalLM
from modeling_recurrent.configuration import preset_path
from modeling_recurrent.convert import (
    KeyMismatchError,
    convert_huginn,
    expected_state,
    huginn_config_from_ours,
    huginn_config_to_ours,
    huginn_to_ours,
    ours_to_huginn,
)
from modeling_recurrent.convert.huginn import PUBLISHED_BOOKKEEPING

from ..conftest import FIXTURES, tiny_config, tiny_model
from .conftest import PUBLISHED, SIDE_FILES


@pytest.fixture(scope="module")
def expected():
    return load_file(FIXTURES / "huginn_tiny_expected.safetensors")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_huginn(PUBLISHED, tmp_path_factory.mktemp("conv") / "ours", progress=False)


@pytest.fixture(scope="module")
def converted_model(converted):
    return AutoModelForCausalLM.from_pretrained(converted).eval()


@pytest.mark.parametrize("steps", [1, 8])
def test_converted_fixture_matches_published_code(converted_model, expected, steps):
    assert type(converted_model) is RecurrentDepthForCausalLM
    assert converted_model.config.model_type == "recurrent_depth"
    with torch.no_grad():
        logits = converted_model(expected["input_ids"], num_steps=steps, init_scale=0.0, use_cache=False).logits
    assert (logits - expected[f"logits_steps_{steps}"]).abs().max() <= 1e-4


def test_converted_folder_is_our_format(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "recurrent_depth" and config["architectures"] == ["RecurrentDepthForCausalLM"]
    assert "n_embd" not in config and config["hidden_size"] == 64
    keys = set(load_file(converted / "model.safetensors"))
    assert "freqs_cis" not in keys and "lm_head.weight" not in keys  # tied head saved once


def test_published_round_trip_is_bit_exact_and_carries_side_files(published_with_side_files, tmp_path):
    ours = convert_huginn(published_with_side_files, tmp_path / "ours", progress=False)
    back = convert_huginn(ours, tmp_path / "back", to="published", progress=False)
    original, again = load_file(PUBLISHED / "model.safetensors"), load_file(back / "model.safetensors")
    assert original.keys() == again.keys()
    for key, tensor in original.items():
        assert again[key].dtype == tensor.dtype and torch.equal(again[key], tensor), key
    for folder in (ours, back):
        for name in ("tokenizer.json", "tokenizer_config.json", *SIDE_FILES):
            assert (folder / name).read_bytes() == (published_with_side_files / name).read_bytes(), name
    published, returned = (json.loads((f / "config.json").read_text()) for f in (PUBLISHED, back))
    ignored = {"auto_map", "transformers_version", *PUBLISHED_BOOKKEEPING}
    assert {k: v for k, v in published.items() if k not in ignored} == {
        k: v for k, v in returned.items() if k not in ignored
    }
    assert AutoModelForCausalLM.from_pretrained(back).__class__ is HuginnRavenForCausalLM


def test_our_round_trip_is_bit_exact(tmp_path):
    model = tiny_model()
    published = ours_to_huginn(model.state_dict(), model.config)  # the tied head is the embedding
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert published["freqs_cis"].shape == (1, 128, 1, 4, 2)
    assert torch.equal(published["lm_head.weight"], state["transformer.wte.weight"])
    back = huginn_to_ours(published, model.config)
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())

    model.save_pretrained(tmp_path / "ours")
    convert_huginn(tmp_path / "ours", tmp_path / "published", to="published", progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "published").eval()
    x = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(x, num_steps=3, init_scale=0.0).logits, loaded(x, num_steps=3, init_scale=0.0).logits)


def test_config_translation_round_trip():
    config = tiny_config(bos_token_id=1, eos_token_id=2, mean_recurrence=6)
    back = huginn_config_to_ours(huginn_config_from_ours(config))
    fields = ("hidden_size", "n_prelude", "n_core", "n_coda", "rope_parameters", "mean_recurrence", "eos_token_id")
    assert all(getattr(back, f) == getattr(config, f) for f in fields)
    config.architectures = back.architectures
    assert back.to_diff_dict() | {"dtype": None} == config.to_diff_dict() | {"dtype": None}


@pytest.mark.parametrize(
    "overrides",
    [
        dict(block_style="prenorm"),
        dict(rope_layout="half"),
        dict(num_key_value_heads=2, qk_bias=False),  # qk_bias needs as many kv heads as query heads
        dict(qk_norm=True),
    ],
)
def test_configs_the_published_format_cannot_express_are_refused(overrides):
    config = tiny_config(**overrides)
    with pytest.raises(ValueError, match="published huginn format cannot express"):
        ours_to_huginn(expected_state(config), config)


def test_meta_conversion_at_huginn_0125_size():
    config = RecurrentDepthConfig.from_pretrained(preset_path("huginn-0125"))
    ours = expected_state(config)
    assert all(t.is_meta for t in ours.values())
    assert sum(t.numel() for t in ours.values()) == 3_564_976_800
    published = ours_to_huginn(ours, config)
    assert published["freqs_cis"].shape == (1, 4096, 1, 48, 2) and published["lm_head.weight"].shape == (65536, 5280)
    back = huginn_to_ours(published, config)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in ours.items()}
    core = sum(v.numel() for k, v in back.items() if k.startswith("transformer.core_block."))
    assert core == 1_581_592_320


def test_missing_and_unknown_keys_are_listed():
    config = tiny_config()
    published = ours_to_huginn(expected_state(config), config)
    del published["transformer.core_block.1.attn.qk_bias"]
    published["transformer.core_block.1.attn.extra"] = torch.empty(1, device="meta")
    with pytest.raises(KeyMismatchError) as error:
        huginn_to_ours(published, config)
    assert error.value.missing == ["transformer.core_block.1.attn.qk_bias"]
    assert error.value.unknown == ["transformer.core_block.1.attn.extra"]
    assert "transformer.core_block.1.attn.qk_bias" in str(error.value)


def test_shape_mismatch_is_refused(tmp_path):
    config = json.loads((PUBLISHED / "config.json").read_text())
    folder = tmp_path / "wrong"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    (folder / "model.safetensors").symlink_to(PUBLISHED / "model.safetensors")
    with pytest.raises(ValueError, match="mlp.fc.weight"):
        convert_huginn(folder, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_sharded_output_with_dtype_conversion(tmp_path, expected):
    out = convert_huginn(PUBLISHED, tmp_path / "bf16", dtype=torch.bfloat16, max_shard_size="100KB", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((out / s).stat().st_size < 100_000 + 40_000 for s in shards)
    original = load_file(PUBLISHED / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[key].to(torch.bfloat16)), key
    # Sharded input converts back to a single published file.
    back = convert_huginn(out, tmp_path / "back", to="published", progress=False)
    assert load_file(back / "model.safetensors")["transformer.wte.weight"].dtype == torch.bfloat16
