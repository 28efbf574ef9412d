"""A checkpoint in the published huginn-0125 format loads natively and reproduces the published implementation.

Fixtures: tests/fixtures/huginn_tiny (published config names and weight names, both tied copies, `freqs_cis`) and
the outputs the published code computed for it (see tests/fixtures/README.md for the script that made them).
"""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from modeling_recurrent import HuginnRavenConfig, HuginnRavenForCausalLM

from .conftest import FIXTURES

FOLDER = FIXTURES / "huginn_tiny"


@pytest.fixture(scope="module")
def expected():
    return load_file(FIXTURES / "huginn_tiny_expected.safetensors")


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(FOLDER).eval()


def test_loads_natively_without_remote_code(model):
    assert isinstance(model, HuginnRavenForCausalLM) and isinstance(model.config, HuginnRavenConfig)
    assert model.config.hidden_size == 64 and model.config.n_core == 2 and model.config.embed_scale == 8.0
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("steps", [1, 4, 8, 32])
def test_logits_match_published_code(model, expected, steps):
    with torch.no_grad():
        logits = model(expected["input_ids"], num_steps=steps, init_scale=0.0).logits
    assert (logits - expected[f"logits_steps_{steps}"]).abs().max() <= 1e-4


def test_latents_and_loss_match(model, expected):
    with torch.no_grad():
        out = model(expected["input_ids"], labels=expected["input_ids"], num_steps=8, init_scale=0.0)
    assert (out.latent_states - expected["latent_states_steps_8"]).abs().max() <= 1e-4
    # The published forward takes pre-shifted labels; ours shifts inside, so both see the same targets.
    assert torch.allclose(out.loss, expected["loss_steps_8"], atol=1e-5)


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_continuation_matches(model, expected, use_cache):
    out = model.generate(
        expected["input_ids"][:1],
        num_steps=8,
        init_scale=0.0,
        do_sample=False,
        max_new_tokens=8,
        min_new_tokens=8,
        use_cache=use_cache,
    )
    assert torch.equal(out[0, expected["input_ids"].shape[1] :], expected["greedy_steps_8"][0])


def test_fresh_model_from_published_config():
    config = AutoConfig.from_pretrained(FOLDER)
    fresh = AutoModelForCausalLM.from_config(config)
    assert isinstance(fresh, HuginnRavenForCausalLM)
    assert sum(p.numel() for p in fresh.parameters()) == sum(
        v.numel()
        for k, v in load_file(FOLDER / "model.safetensors").items()
        if k not in ("lm_head.weight", "freqs_cis")
    )


def test_unsupported_published_variant_is_refused(tmp_path):
    with pytest.raises(ValueError, match="block_class_name"):
        HuginnRavenConfig(block_class_name="TransformerPreNormBlock")


def test_mismatched_weights_are_refused(tmp_path):
    config = AutoConfig.from_pretrained(FOLDER)
    config.intermediate_size = 96
    config.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").symlink_to(FOLDER / "model.safetensors")
    with pytest.raises(Exception, match="size mismatch|shape|mismatch"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
