"""Builders shared by the conversion tests: tiny Llama-family source folders and a published fixture copy."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from ..conftest import FIXTURES

PUBLISHED = FIXTURES / "huginn_tiny"
SIDE_FILES = {
    "generation_config.json": json.dumps({"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}),
    "chat_template.jinja": "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}",
}

TINY_LLAMA = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)
SOURCES = {
    "llama": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=16, tie_word_embeddings=False)),
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 64)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_source(kind: str, folder: Path, seed: int = 0, tokenizer: bool = False, **overrides):
    """A random tiny Llama / Qwen2 / Qwen3 causal LM saved to `folder` (norms and biases perturbed)."""
    config_cls, model_cls, extra = SOURCES[kind]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY_LLAMA, **extra, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    if tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    return model


@pytest.fixture
def published_with_side_files(tmp_path) -> Path:
    """A copy of the published fixture with a tokenizer, chat template and generation config beside it."""
    folder = tmp_path / "published"
    shutil.copytree(PUBLISHED, folder)
    tiny_tokenizer().save_pretrained(folder)
    for name, text in SIDE_FILES.items():
        (folder / name).write_text(text)
    return folder


def leftovers(parent: Path) -> list[str]:
    """Temporary output folders left in `parent` (there must be none after a failed conversion)."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))
