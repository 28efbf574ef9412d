"""Published huginn-0125 format (Hub folders with `model_type: huginn_raven`) <-> this package's format.

Tensor names are the same in both; the published checkpoint also stores the RoPE table (`freqs_cis`) and both
copies of the tied embedding, and its config.json uses the reference's field names. Both directions derive from
`HUGINN_TABLE`; a round trip reproduces every tensor bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedConfig

from modeling_recurrent import HuginnRavenConfig, RecurrentDepthConfig
from modeling_recurrent.configuration_recurrent_depth import HUGINN_FIELD_NAMES, HUGINN_SUPPORTED_VARIANTS
from modeling_recurrent.layers_recurrent_depth import RotaryEmbedding

from .checkpoint import open_checkpoint
from .keymap import (
    OUR_HEAD,
    KeyTable,
    Plan,
    Step,
    apply_plan,
    block_prefixes,
    check_shapes,
    expected_state,
    export_plan,
    import_plan,
)
from .output import atomic_output, check_destination, copy_side_files, write_config
from .shards import output_specs, save_plan

BLOCK_TENSORS = (
    "norm_1.weight",
    "norm_2.weight",
    "norm_3.weight",
    "norm_4.weight",
    "attn.Wqkv.weight",
    "attn.qk_bias",
    "attn.proj.weight",
    "mlp.fc.weight",
    "mlp.proj.weight",
)
GLOBAL_TENSORS = (
    "transformer.wte.weight",
    "transformer.adapter.weight",
    "transformer.adapter.bias",
    "transformer.ln_f.weight",
    OUR_HEAD,
)
ROPE_TABLE = "freqs_cis"
EMBEDDING = "transformer.wte.weight"

HUGINN_TABLE = KeyTable(
    name="huginn_raven",
    globals={k: k for k in GLOBAL_TENSORS},
    block={k: k for k in BLOCK_TENSORS},
    ignored=(rf"^{ROPE_TABLE}$",),
)

# Our config fields (beyond the generic PreTrainedConfig ones).
OUR_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(RecurrentDepthConfig)
    if f.name not in {g.name for g in dataclasses.fields(PreTrainedConfig)}
)
# Published fields that only record how the reference was built; written with the reference's defaults.
PUBLISHED_BOOKKEEPING = {
    "architecture_class_name": "RecurrentGPT",
    "padding_multiple": 4096,
    "init_strategy": "takase",
    "init_orthogonal": False,
    "activation_checkpoint_impl": "per-iteration",
}
# What a config must look like to be expressible in the published format: field -> required value.
PUBLISHED_ARCHITECTURE = {
    "rope_layout": "adjacent",
    "block_style": "sandwich",
    "injection": "concat",
    "scale_embeddings": True,
    "core_output_norm": True,
    "qkv_bias": False,
    "qk_norm": False,
}
HUB_CODE_REPO = "tomg-group-umd/huginn-0125"


def huginn_config_to_ours(published: Mapping[str, Any]) -> RecurrentDepthConfig:
    """This package's config for a published config.json (reference field names, `model_type: huginn_raven`)."""
    huginn = HuginnRavenConfig.from_dict(dict(published))
    return RecurrentDepthConfig(
        **{name: getattr(huginn, name) for name in OUR_FIELDS},
        architectures=["RecurrentDepthForCausalLM"],
        dtype=huginn.dtype,
    )


def huginn_config_from_ours(config: RecurrentDepthConfig, code_repo: str = HUB_CODE_REPO) -> dict[str, Any]:
    """A published-format config.json dict; its auto_map points at the reference code in `code_repo` on the Hub."""
    wrong = {k: getattr(config, k) for k, v in PUBLISHED_ARCHITECTURE.items() if getattr(config, k) != v}
    if config.num_kv_heads != config.num_attention_heads:
        wrong["num_key_value_heads"] = config.num_key_value_heads
    if config.attention_head_dim * config.num_attention_heads != config.hidden_size:
        wrong["head_dim"] = config.head_dim
    rope = config.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        wrong["rope_parameters"] = rope
    if wrong:
        raise ValueError(
            f"the published huginn format cannot express {wrong}; it needs {PUBLISHED_ARCHITECTURE}, "
            "num_key_value_heads == num_attention_heads, head_dim == hidden_size / num_attention_heads and default RoPE"
        )
    ours_to_theirs = {ours: theirs for theirs, ours in HUGINN_FIELD_NAMES.items()}
    out: dict[str, Any] = {
        "architectures": ["RavenForCausalLM"],
        "auto_map": {
            "AutoConfig": f"{code_repo}--raven_config_minimal.RavenConfig",
            "AutoModelForCausalLM": f"{code_repo}--raven_modeling_minimal.RavenForCausalLM",
        },
        "model_type": HuginnRavenConfig.model_type,
        "n_layers": config.num_hidden_layers,
        **{theirs: getattr(config, ours) for ours, theirs in ours_to_theirs.items()},
        **{field: supported[0] for field, supported in HUGINN_SUPPORTED_VARIANTS.items()},
        **PUBLISHED_BOOKKEEPING,
        "rope_base": rope["rope_theta"],
    }
    for name in (
        "vocab_size",
        "intermediate_size",
        "qk_bias",
        "mean_recurrence",
        "mean_backprop_depth",
        "num_attention_heads",
        "num_key_value_heads",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ):
        if getattr(config, name) is not None:
            out[name] = getattr(config, name)
    if config.dtype is not None:
        out["torch_dtype"] = str(config.dtype).removeprefix("torch.")
    return out


def rope_table(config: RecurrentDepthConfig, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The published `freqs_cis` buffer (1, block_size, 1, head_dim/2, 2): cos and sin of adjacent-pair RoPE."""
    inv_freq = RotaryEmbedding(config).inv_freq.to(device)  # the model's own frequencies
    positions = torch.arange(config.max_position_embeddings, dtype=torch.float32, device=device)
    freqs = torch.outer(positions, inv_freq).float()
    table = torch.stack([torch.cos(freqs)[None, :, None, :], torch.sin(freqs)[None, :, None, :]], dim=4)
    return table.to(dtype)


def _same_blocks(config: RecurrentDepthConfig) -> dict[str, str]:
    return {p: p for p in block_prefixes(config)}


def huginn_import_plan(keys, config: RecurrentDepthConfig) -> Plan:
    """Plan: published state dict -> ours (drops `freqs_cis` and the tied head copy)."""
    return import_plan(HUGINN_TABLE, keys, config, _same_blocks(config))


def huginn_export_plan(keys, config: RecurrentDepthConfig) -> Plan:
    """Plan: our state dict -> published (adds `freqs_cis` and, when tied, the head copy)."""
    huginn_config_from_ours(config)  # refuses configs the format cannot express
    plan = export_plan(HUGINN_TABLE, keys, config, _same_blocks(config))
    if config.tie_word_embeddings:
        plan[HUGINN_TABLE.globals[OUR_HEAD]] = Step((EMBEDDING,), torch.clone)
    plan[ROPE_TABLE] = Step((), lambda dtype, device: rope_table(config, dtype, device), like=EMBEDDING)
    return plan


def huginn_to_ours(state_dict: Mapping[str, torch.Tensor], config: RecurrentDepthConfig) -> dict[str, torch.Tensor]:
    """Published huginn state dict -> this package's state dict (config in this package's format)."""
    out = apply_plan(huginn_import_plan(state_dict.keys(), config), state_dict)
    check_shapes("huginn_raven -> recurrent_depth", out, expected_state(config))
    return out


def ours_to_huginn(state_dict: Mapping[str, torch.Tensor], config: RecurrentDepthConfig) -> dict[str, torch.Tensor]:
    """This package's state dict -> the published huginn state dict."""
    return apply_plan(huginn_export_plan(state_dict.keys(), config), state_dict)


def convert_huginn(
    src: str | Path,
    dst: str | Path,
    *,
    to: str = "ours",
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert a model folder between the published huginn format and ours (`to="ours"` or `to="published"`).

    Tokenizer files, chat template and generation_config.json beside the weights are carried over.
    """
    src, dst = Path(src), Path(dst)
    if to not in ("ours", "published"):
        raise ValueError(f"to must be 'ours' or 'published', got {to!r}")
    check_destination(src, dst, overwrite)
    raw = json.loads((src / "config.json").read_text())
    source = open_checkpoint(src)
    if to == "ours":
        config = huginn_config_to_ours(raw)
        plan = huginn_import_plan(source.keys(), config)
    else:
        if raw.get("model_type") != RecurrentDepthConfig.model_type:
            raise ValueError(f"{src}: model_type is {raw.get('model_type')!r}, expected 'recurrent_depth'")
        config = RecurrentDepthConfig.from_dict(raw)
        plan = huginn_export_plan(source.keys(), config)
    specs = output_specs(plan, source, dtype)
    if to == "ours":
        check_shapes(f"{src}", specs, expected_state(config))
    with atomic_output(dst, overwrite) as tmp:
        save_plan(plan, source, tmp, specs=specs, max_shard_size=max_shard_size, progress=progress)
        out_dtype = specs[EMBEDDING].dtype
        if to == "ours":
            write_config(config, tmp, out_dtype)
        else:
            config.dtype = out_dtype
            (tmp / "config.json").write_text(json.dumps(huginn_config_from_ours(config), indent=2) + "\n")
        copy_side_files(src, tmp)
    return dst


__all__ = [
    "HUGINN_TABLE",
    "convert_huginn",
    "huginn_config_from_ours",
    "huginn_config_to_ours",
    "huginn_to_ours",
    "ours_to_huginn",
]
