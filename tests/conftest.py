"""Shared tiny models for the tests (fast on 2 CPU cores)."""

from pathlib import Path

import pytest
import torch

import modeling_recurrent  # noqa: F401  (registers the Auto classes)
from modeling_recurrent import RecurrentDepthConfig, RecurrentDepthForCausalLM

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def tiny_config(**overrides) -> RecurrentDepthConfig:
    """A 4-block model of width 32 (prelude 1, core 2, coda 1); override any field."""
    fields = dict(
        vocab_size=64,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=48,
        n_prelude=1,
        n_core=2,
        n_coda=1,
        max_position_embeddings=128,
        mean_recurrence=4,
        mean_backprop_depth=2,
    )
    fields.update(overrides)
    return RecurrentDepthConfig(**fields)


def tiny_model(seed: int = 0, **overrides) -> RecurrentDepthForCausalLM:
    """A random tiny model in eval mode, its norms and biases perturbed so that every parameter matters."""
    torch.manual_seed(seed)
    model = RecurrentDepthForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "qk_bias" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
        model.transformer.adapter.weight.mul_(2.0) if hasattr(model.transformer, "adapter") else None
    return model


@pytest.fixture
def model() -> RecurrentDepthForCausalLM:
    return tiny_model()


@pytest.fixture
def chain_model_dir(tmp_path) -> Path:
    """A saved tiny model with the chain task's tokenizer (vocabulary 44), as the commands load one."""
    from modeling_recurrent.chain_task import build_tokenizer

    folder = tmp_path / "model"
    tiny_model(vocab_size=44).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder
