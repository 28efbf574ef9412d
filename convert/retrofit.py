"""Retrofitted recurrence (McLeish et al. 2025, arXiv 2511.07384): a Llama-family causal LM -> recurrent depth.

The user picks which source layers become the prelude, the core (iterated) and the coda; the other layers are
dropped. Blocks stay pre-norm with Llama's half-split RoPE (scaling included), grouped-query attention, Qwen2's
q/k/v biases and Qwen3's q/k norms; embeddings are unscaled, there is no norm between core and coda, and the final
norm becomes `ln_f`. The new adapter (concat injection: Linear([state, embeddings]) -> hidden) is initialised as
[0 | I] ("identity": it passes the prelude output through and ignores the state, so one step with any initial state
reproduces the source model when all its layers are kept in order) or randomly ("random", as the paper's released
Llama conversion). See convert/README.md for the training recipe that follows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedConfig

from modeling_recurrent import RecurrentDepthConfig

from .checkpoint import open_checkpoint
from .keymap import Fused, KeyTable, Plan, Step, apply_plan, check_shapes, expected_state, import_plan
from .output import atomic_output, check_destination, copy_side_files, write_config
from .shards import output_specs, save_plan

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# RoPE variants whose frequencies do not change with the sequence length (ours are computed once).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
ADAPTER_INITS = ("identity", "random")
ADAPTER = "transformer.adapter.weight"
EMBEDDING = "transformer.wte.weight"


def _qkv_sizes(config: RecurrentDepthConfig) -> tuple[int, int, int]:
    head_dim = config.attention_head_dim
    return (
        config.num_attention_heads * head_dim,
        config.num_kv_heads * head_dim,
        config.num_kv_heads * head_dim,
    )


def _gate_up_sizes(config: RecurrentDepthConfig) -> tuple[int, int]:
    return config.intermediate_size, config.intermediate_size


LLAMA_TABLE = KeyTable(
    name="llama",
    globals={
        EMBEDDING: "model.embed_tokens.weight",
        "transformer.ln_f.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    },
    block={
        "norm_1.weight": "input_layernorm.weight",
        "norm_3.weight": "post_attention_layernorm.weight",
        "attn.Wqkv.weight": Fused(
            ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), _qkv_sizes
        ),
        "attn.Wqkv.bias": Fused(
            ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), _qkv_sizes
        ),
        "attn.q_norm.weight": "self_attn.q_norm.weight",
        "attn.k_norm.weight": "self_attn.k_norm.weight",
        "attn.proj.weight": "self_attn.o_proj.weight",
        "mlp.fc.weight": Fused(("mlp.gate_proj.weight", "mlp.up_proj.weight"), _gate_up_sizes),
        "mlp.proj.weight": "mlp.down_proj.weight",
    },
    ignored=(r"^model\.rotary_emb\.inv_freq$", r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),
)
SOURCE_LAYER = "model.layers.{}."


def parse_range(text: str) -> tuple[int, ...]:
    """ "3-5" -> (3, 4, 5) (inclusive); "7" -> (7,); "" or "none" -> ()."""
    text = text.strip()
    if text.lower() in ("", "none"):
        return ()
    match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", text)
    if match is None:
        raise ValueError(f"layer range must look like 'first-last' (inclusive) or 'n', got {text!r}")
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) is not None else first
    if last < first:
        raise ValueError(f"layer range {text!r} ends before it starts")
    return tuple(range(first, last + 1))


@dataclass(frozen=True)
class LayerSelection:
    """Source layer indices of the prelude, core and coda (each in order)."""

    prelude: tuple[int, ...]
    core: tuple[int, ...]
    coda: tuple[int, ...]

    @classmethod
    def parse(cls, prelude: str | Sequence[int], core: str | Sequence[int], coda: str | Sequence[int]):
        def layers(value):
            return parse_range(value) if isinstance(value, str) else tuple(int(i) for i in value)

        return cls(layers(prelude), layers(core), layers(coda))

    def validate(self, num_layers: int) -> None:
        """Raise ValueError for an empty core, indices outside the model, or a layer used twice."""
        if not self.core:
            raise ValueError("the core needs at least one layer")
        phases = {"prelude": self.prelude, "core": self.core, "coda": self.coda}
        outside = {name: [i for i in ids if not 0 <= i < num_layers] for name, ids in phases.items()}
        outside = {name: ids for name, ids in outside.items() if ids}
        if outside:
            raise ValueError(f"layers {outside} are outside the source model's layers 0-{num_layers - 1}")
        seen: dict[int, str] = {}
        for name, ids in phases.items():
            for i in ids:
                if i in seen:
                    raise ValueError(f"layer ranges overlap: layer {i} is in both {seen[i]} and {name}")
                seen[i] = name

    def blocks(self) -> dict[str, str]:
        """Our block prefix -> source layer prefix."""
        phases = (("prelude", self.prelude), ("core_block", self.core), ("coda", self.coda))
        return {f"transformer.{ph}.{j}.": SOURCE_LAYER.format(i) for ph, ids in phases for j, i in enumerate(ids)}

    def dropped(self, num_layers: int) -> list[str]:
        used = set(self.prelude) | set(self.core) | set(self.coda)
        return [SOURCE_LAYER.format(i) for i in range(num_layers) if i not in used]


def check_source_config(source: PreTrainedConfig) -> None:
    """Refuse source models whose blocks the recurrent-depth block cannot express, naming the reason."""
    model_type = getattr(source, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    problems = []
    if getattr(source, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={source.hidden_act!r} (needs silu)")
    if getattr(source, "attention_bias", False):
        problems.append("attention_bias=True (adds an output-projection bias)")
    if getattr(source, "mlp_bias", False):
        problems.append("mlp_bias=True")
    layer_types = getattr(source, "layer_types", None) or []
    if getattr(source, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
        problems.append("sliding-window attention")
    rope_type = (source.rope_parameters or {}).get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        problems.append(f"rope_type={rope_type!r} (supported: {SUPPORTED_ROPE_TYPES})")
    if problems:
        raise ValueError(f"cannot retrofit this {model_type} model: " + "; ".join(problems))


def retrofit_config(
    source: PreTrainedConfig,
    layers: LayerSelection,
    *,
    mean_recurrence: int = 32,
    mean_backprop_depth: int = 8,
) -> RecurrentDepthConfig:
    """The recurrent-depth config of a retrofitted Llama / Qwen2 / Qwen3 model."""
    check_source_config(source)
    layers.validate(source.num_hidden_layers)
    head_dim = getattr(source, "head_dim", None) or source.hidden_size // source.num_attention_heads
    return RecurrentDepthConfig(
        vocab_size=source.vocab_size,
        hidden_size=source.hidden_size,
        num_attention_heads=source.num_attention_heads,
        num_key_value_heads=source.num_key_value_heads or source.num_attention_heads,
        head_dim=head_dim,
        intermediate_size=source.intermediate_size,
        n_prelude=len(layers.prelude),
        n_core=len(layers.core),
        n_coda=len(layers.coda),
        max_position_embeddings=source.max_position_embeddings,
        rope_parameters=dict(source.rope_parameters),
        rope_layout="half",
        block_style="prenorm",
        injection="concat",
        qk_bias=False,
        qkv_bias=source.model_type == "qwen2",
        qk_norm=source.model_type == "qwen3",
        adapter_bias=False,
        scale_embeddings=False,
        core_output_norm=False,
        tie_word_embeddings=bool(source.tie_word_embeddings),
        rms_norm_eps=source.rms_norm_eps,
        mean_recurrence=mean_recurrence,
        mean_backprop_depth=mean_backprop_depth,
        bos_token_id=source.bos_token_id,
        eos_token_id=source.eos_token_id,
        pad_token_id=source.pad_token_id,
        architectures=["RecurrentDepthForCausalLM"],
    )


def adapter_weight(config: RecurrentDepthConfig, init: str, seed: int = 0):
    """Step function making the adapter (hidden, 2*hidden): [0 | I] for "identity", truncated normal for "random"."""
    if init not in ADAPTER_INITS:
        raise ValueError(f"adapter_init must be one of {ADAPTER_INITS}, got {init!r}")
    d = config.hidden_size

    def make(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if torch.device(device).type == "meta":
            return torch.empty(d, 2 * d, dtype=dtype, device=device)
        if init == "identity":
            weight = torch.cat([torch.zeros(d, d), torch.eye(d)], dim=1)
        else:
            std = config.init_std
            generator = torch.Generator().manual_seed(seed)
            weight = torch.nn.init.trunc_normal_(
                torch.empty(d, 2 * d), std=std, a=-3 * std, b=3 * std, generator=generator
            )
        return weight.to(dtype=dtype, device=device)

    return make


def retrofit_plan(
    keys, source: PreTrainedConfig, config: RecurrentDepthConfig, layers: LayerSelection, adapter_init: str, seed: int
) -> Plan:
    plan = import_plan(
        LLAMA_TABLE,
        keys,
        config,
        layers.blocks(),
        dropped_blocks=layers.dropped(source.num_hidden_layers),
        generated=(ADAPTER,),
    )
    plan[ADAPTER] = Step((), adapter_weight(config, adapter_init, seed), like=LLAMA_TABLE.globals[EMBEDDING])
    return plan


def retrofit_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    source: PreTrainedConfig,
    layers: LayerSelection,
    *,
    adapter_init: str = "identity",
    seed: int = 0,
    **config_kwargs,
) -> tuple[RecurrentDepthConfig, dict[str, torch.Tensor]]:
    """(config, state dict) of the recurrent-depth model retrofitted from a Llama-family state dict."""
    config = retrofit_config(source, layers, **config_kwargs)
    out = apply_plan(retrofit_plan(state_dict.keys(), source, config, layers, adapter_init, seed), state_dict)
    check_shapes(f"{source.model_type} -> recurrent_depth", out, expected_state(config))
    return config, out


def convert_retrofit(
    src: str | Path,
    dst: str | Path,
    *,
    prelude: str | Sequence[int],
    core: str | Sequence[int],
    coda: str | Sequence[int],
    adapter_init: str = "identity",
    mean_recurrence: int = 32,
    mean_backprop_depth: int = 8,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Retrofit a Transformers Llama / Qwen2 / Qwen3 model folder into a recurrent-depth model folder.

    The source's tokenizer files, chat template and generation config are copied when present.
    """
    src, dst = Path(src), Path(dst)
    check_destination(src, dst, overwrite)
    source_config = AutoConfig.from_pretrained(src)
    layers = LayerSelection.parse(prelude, core, coda)
    config = retrofit_config(
        source_config, layers, mean_recurrence=mean_recurrence, mean_backprop_depth=mean_backprop_depth
    )
    source = open_checkpoint(src)
    plan = retrofit_plan(source.keys(), source_config, config, layers, adapter_init, seed)
    specs = output_specs(plan, source, dtype)
    check_shapes(str(src), specs, expected_state(config))
    with atomic_output(dst, overwrite) as tmp:
        save_plan(plan, source, tmp, specs=specs, max_shard_size=max_shard_size, progress=progress)
        write_config(config, tmp, specs[EMBEDDING].dtype)
        copy_side_files(src, tmp)
    return dst
