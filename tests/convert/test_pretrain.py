"""Pretraining-code `.pth` checkpoints (wrapper-prefixed keys) -> ours.

The fixture is made here from our model's state dict: the keys get the prefixes the pretraining code's wrappers add
(`_orig_mod._original_module.`, plus `_forward_module.` aliases), the RoPE table and the tied head are stored, and
the file also holds optimizer state and a model config as training checkpoints do.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from modeling_recurrent.convert import CheckpointError, KeyMismatchError, convert_pretrain, pretrain_to_ours
from modeling_recurrent.convert.huginn import ours_to_huginn

from ..conftest import tiny_model
from .conftest import leftovers

PREFIX = "_orig_mod._original_module."


def training_checkpoint(model, path, transposed_head=False, extra=None):
    published = ours_to_huginn(model.state_dict(), model.config)  # the pretraining code's names = the published names
    if transposed_head:
        published["lm_head.weight"] = published["lm_head.weight"].t().contiguous()
    weights = {PREFIX + k: v for k, v in published.items()}
    weights["_forward_module.transformer.wte.weight"] = published["transformer.wte.weight"]
    weights.update(extra or {})
    torch.save({"model": weights, "optimizer": {"state": {}, "lr": 1e-3}, "model_config": {"name": "tiny"}}, path)
    return path


@pytest.mark.parametrize("tied", [True, False])
def test_training_checkpoint_converts(tmp_path, tied):
    model = tiny_model(tie_word_embeddings=tied)
    model.save_pretrained(tmp_path / "config")
    pth = training_checkpoint(model, tmp_path / "step-00000100.pth", transposed_head=not tied)
    dst = convert_pretrain(pth, tmp_path / "out", config=tmp_path / "config", progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(dst).eval()
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    x = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        assert torch.equal(model(x, num_steps=2, init_scale=0.0).logits, loaded(x, num_steps=2, init_scale=0.0).logits)


def test_pure_function_strips_prefixes(tmp_path):
    model = tiny_model()
    checkpoint = torch.load(training_checkpoint(model, tmp_path / "c.pth"), weights_only=True)
    out = pretrain_to_ours(checkpoint["model"], model.config)
    assert set(out) == {k for k in model.state_dict() if k != "lm_head.weight"}


def test_unknown_keys_are_listed(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "config")
    pth = training_checkpoint(
        model, tmp_path / "c.pth", extra={PREFIX + "transformer.step_embedding.weight": torch.ones(2)}
    )
    with pytest.raises(KeyMismatchError, match="transformer.step_embedding.weight"):
        convert_pretrain(pth, tmp_path / "out", config=tmp_path / "config", progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_not_a_training_checkpoint(tmp_path):
    torch.save({"weights": {}}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="no 'model' state dict"):
        convert_pretrain(tmp_path / "x.pth", tmp_path / "out", config="tiny", progress=False)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        convert_pretrain(tmp_path / "garbage.pth", tmp_path / "out", config="tiny", progress=False)
    assert not (tmp_path / "out").exists()


def test_unknown_config_preset(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        convert_pretrain(tmp_path / "x.pth", tmp_path / "out", config="no-such-preset", progress=False)
