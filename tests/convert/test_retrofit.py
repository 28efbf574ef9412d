"""Retrofitting Llama / Qwen2 / Qwen3 into recurrent depth: identity when every layer is kept, layer ranges, errors."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from modeling_recurrent import RecurrentDepthForCausalLM
from modeling_recurrent.convert import KeyMismatchError, LayerSelection, convert_retrofit, retrofit_state_dict
from modeling_recurrent.convert.retrofit import parse_range

from .conftest import leftovers, save_source


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_all_layers_in_order_reproduce_the_source(kind, tmp_path):
    source = save_source(kind, tmp_path / "src", tokenizer=kind == "llama")
    dst = convert_retrofit(tmp_path / "src", tmp_path / "rd", prelude="0", core="1-2", coda="3", progress=False)
    model = AutoModelForCausalLM.from_pretrained(dst).eval()
    assert isinstance(model, RecurrentDepthForCausalLM)
    config = model.config
    assert (config.rope_layout, config.block_style, config.scale_embeddings) == ("half", "prenorm", False)
    assert config.rope_parameters == source.config.rope_parameters
    assert config.tie_word_embeddings == source.config.tie_word_embeddings
    assert config.qkv_bias == (kind == "qwen2") and config.qk_norm == (kind == "qwen3")
    x = torch.randint(0, 64, (2, 10))
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # left padding goes through the same mask
    with torch.no_grad():
        want = source(x, attention_mask=mask).logits
        for init_scale in (0.0, 1.0):  # the [0 | I] adapter ignores the initial state
            got = model(x, attention_mask=mask, num_steps=1, init_scale=init_scale).logits
            assert (got - want)[mask.bool()].abs().max() <= 1e-4
    if kind == "llama":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            assert (dst / name).read_bytes() == (tmp_path / "src" / name).read_bytes()
    else:
        assert not (dst / "tokenizer.json").exists()


def test_layer_ranges_select_and_drop_layers(tmp_path):
    source = save_source("llama", tmp_path / "src", num_hidden_layers=6)
    state = source.state_dict()
    config, out = retrofit_state_dict(state, source.config, LayerSelection.parse("0", "2-3", "5"))
    assert (config.n_prelude, config.n_core, config.n_coda) == (1, 2, 1)
    assert torch.equal(out["transformer.core_block.1.mlp.proj.weight"], state["model.layers.3.mlp.down_proj.weight"])
    assert torch.equal(out["transformer.coda.0.norm_3.weight"], state["model.layers.5.post_attention_layernorm.weight"])
    q, k, v = (state[f"model.layers.2.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(out["transformer.core_block.0.attn.Wqkv.weight"], torch.cat([q, k, v]))
    eye = torch.cat([torch.zeros(32, 32), torch.eye(32)], dim=1)
    assert torch.equal(out["transformer.adapter.weight"], eye)
    _, random = retrofit_state_dict(state, source.config, LayerSelection.parse("0", "2-3", "5"), adapter_init="random")
    assert not torch.equal(random["transformer.adapter.weight"], eye)


def test_sharded_bf16_output(tmp_path):
    save_source("qwen3", tmp_path / "src")
    dst = convert_retrofit(
        tmp_path / "src",
        tmp_path / "rd",
        prelude=[0],
        core=[1, 2],
        coda=[3],
        dtype=torch.bfloat16,
        max_shard_size="20KB",
        progress=False,
    )
    assert (dst / "model.safetensors.index.json").is_file()
    assert AutoModelForCausalLM.from_pretrained(dst).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("prelude", "core", "coda", "message"),
    [
        ("0-1", "1-2", "3", "overlap: layer 1"),
        ("0", "1-2", "3-4", "outside"),
        ("0", "", "3", "at least one layer"),
        ("0", "2-1", "3", "ends before it starts"),
        ("0", "1-x", "3", "first-last"),
    ],
)
def test_bad_layer_ranges(tmp_path, prelude, core, coda, message):
    save_source("llama", tmp_path / "src")
    with pytest.raises(ValueError, match=message):
        convert_retrofit(tmp_path / "src", tmp_path / "rd", prelude=prelude, core=core, coda=coda, progress=False)
    assert not (tmp_path / "rd").exists() and leftovers(tmp_path) == []


def test_unsupported_architecture(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'.*llama, qwen2, qwen3"):
        convert_retrofit(tmp_path / "gpt2", tmp_path / "rd", prelude="0", core="1", coda="", progress=False)
    assert not (tmp_path / "rd").exists()


def test_unsupported_llama_variant(tmp_path):
    save_source("llama", tmp_path / "src", attention_bias=True)
    with pytest.raises(ValueError, match="attention_bias"):
        convert_retrofit(tmp_path / "src", tmp_path / "rd", prelude="0", core="1-2", coda="3", progress=False)


def test_unknown_source_tensors_are_listed(tmp_path):
    source = save_source("llama", tmp_path / "src")
    state = dict(source.state_dict())
    state["model.layers.2.self_attn.o_proj.bias"] = torch.zeros(32)
    state["model.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyMismatchError) as error:
        retrofit_state_dict(state, source.config, LayerSelection.parse("0", "1", "3"))
    assert error.value.unknown == ["model.extra.weight", "model.layers.2.self_attn.o_proj.bias"]


def test_parse_range():
    assert parse_range("0-3") == (0, 1, 2, 3) and parse_range("7") == (7,) and parse_range("none") == ()


def test_source_config_is_read_from_folder(tmp_path):
    save_source("qwen2", tmp_path / "src")
    dst = convert_retrofit(tmp_path / "src", tmp_path / "rd", prelude="", core="0-3", coda="", progress=False)
    config = AutoConfig.from_pretrained(dst)
    assert (config.n_prelude, config.n_core, config.n_coda) == (0, 4, 0)
    assert "lm_head.weight" not in load_file(dst / "model.safetensors")  # tied, as in the source
