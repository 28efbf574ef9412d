"""Configuration of recurrent-depth language models (prelude -> iterated core -> coda).

This file travels as remote code with every saved model: it imports only torch-free standard modules and
transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

from transformers import PreTrainedConfig

BLOCK_STYLES = ("sandwich", "prenorm")
ROPE_LAYOUTS = ("adjacent", "half")
INJECTIONS = ("concat", "add")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _non_negative_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _non_negative_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _positive_number(value: Any) -> bool:
    return _non_negative_number(value) and value > 0


def _one_of(options: tuple[str, ...]) -> Callable[[Any], bool]:
    return lambda value: value in options


def _optional(rule: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or rule(value)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


# field -> (rule, description of the allowed values). The single place where field values are checked: used at
# construction and again whenever a field is assigned later (e.g. `from_pretrained(path, num_steps=8)`).
_FIELD_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "vocab_size": (_positive_int, "a positive integer"),
    "hidden_size": (_positive_int, "a positive integer"),
    "num_attention_heads": (_positive_int, "a positive integer"),
    "num_key_value_heads": (_optional(_positive_int), "a positive integer dividing num_attention_heads, or None"),
    "head_dim": (_optional(_positive_int), "a positive integer, or None for hidden_size // num_attention_heads"),
    "intermediate_size": (_positive_int, "a positive integer"),
    "n_prelude": (_non_negative_int, "an integer >= 0"),
    "n_core": (_positive_int, "an integer >= 1"),
    "n_coda": (_non_negative_int, "an integer >= 0"),
    "max_position_embeddings": (_positive_int, "a positive integer"),
    "rope_parameters": (_optional(lambda value: isinstance(value, dict)), "a dict (rope_type, rope_theta) or None"),
    "rope_layout": (_one_of(ROPE_LAYOUTS), f"one of {ROPE_LAYOUTS}"),
    "block_style": (_one_of(BLOCK_STYLES), f"one of {BLOCK_STYLES}"),
    "injection": (_one_of(INJECTIONS), f"one of {INJECTIONS}"),
    "qk_bias": (_is_bool, "True or False"),
    "qkv_bias": (_is_bool, "True or False"),
    "qk_norm": (_is_bool, "True or False"),
    "adapter_bias": (_is_bool, "True or False"),
    "scale_embeddings": (_is_bool, "True or False"),
    "core_output_norm": (_is_bool, "True or False"),
    "tie_word_embeddings": (_is_bool, "True or False"),
    "rms_norm_eps": (_positive_number, "a positive number"),
    "mean_recurrence": (_positive_int, "an integer >= 1 (the default number of recurrence steps)"),
    "mean_backprop_depth": (_positive_int, "an integer >= 1"),
    "init_scale": (_non_negative_number, "a number >= 0 (0 gives a zero initial state)"),
}


class RecurrentDepthConfig(PreTrainedConfig):
    r"""Configuration of a recurrent-depth causal LM.

    A prelude of `n_prelude` blocks embeds the tokens, a core of `n_core` blocks is iterated `num_steps` times on a
    latent state injected with the embeddings, and a coda of `n_coda` blocks reads out. Block style, RoPE layout,
    grouped-query heads, embedding scale, injection and tying are configuration, so huginn-0125, retrofitted
    Llama-family models and looped models share one implementation.

    `mean_recurrence` is both the mean of the training depth sampler and the default number of steps at inference;
    `num_steps` is its alias (`from_pretrained(path, num_steps=8)`). `init_scale` scales the random initial state
    (0 gives a zero, deterministic state). Per-call arguments of `forward` / `generate` override both.
    """

    model_type = "recurrent_depth"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]
    attribute_map: ClassVar[dict[str, str]] = {"num_steps": "mean_recurrence"}
    default_theta = 50_000.0  # huginn-0125's; read by Transformers' RoPE standardization

    vocab_size: int = 65536
    hidden_size: int = 5280
    num_attention_heads: int = 55
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int = 17920
    n_prelude: int = 2
    n_core: int = 4
    n_coda: int = 2
    max_position_embeddings: int = 4096
    rope_parameters: dict | None = None
    rope_layout: str = "adjacent"
    block_style: str = "sandwich"
    injection: str = "concat"
    qk_bias: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False
    adapter_bias: bool = False
    scale_embeddings: bool = True
    core_output_norm: bool = True
    tie_word_embeddings: bool = True
    rms_norm_eps: float = 1e-6
    mean_recurrence: int = 32
    mean_backprop_depth: int = 8
    init_scale: float = 1.0
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        self._check_field("rope_parameters")  # Transformers standardizes it first and fails obscurely on a non-dict
        super().__post_init__(**kwargs)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.validate()

    def __setattr__(self, key, value):
        super().__setattr__(key, value)
        # Re-check single fields assigned after construction (from_pretrained applies its kwargs this way).
        key = self.attribute_map.get(key, key)
        if key in _FIELD_RULES and self.__dict__.get("_post_init_done", False):
            self._check_field(key)
            if key == "rope_parameters":  # None is allowed only at construction, where Transformers fills it in
                self._check_rope()

    def _check_field(self, name: str) -> None:
        rule, allowed = _FIELD_RULES[name]
        value = getattr(self, name)
        if not rule(value):
            raise ValueError(f"{type(self).__name__}.{name} must be {allowed}, got {value!r}")

    def validate(self) -> None:
        """Check every field and their relations; raise ValueError naming the field and the allowed values."""
        for name in _FIELD_RULES:
            self._check_field(name)
        if self.head_dim is None and self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads}); set head_dim explicitly"
            )
        if self.num_attention_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.attention_head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.attention_head_dim}")
        if self.qk_bias and self.num_kv_heads != self.num_attention_heads:
            raise ValueError(
                f"qk_bias (huginn's (2, 1, heads, head_dim) parameter) needs num_key_value_heads "
                f"({self.num_key_value_heads}) == num_attention_heads ({self.num_attention_heads})"
            )
        self._check_rope()

    def _check_rope(self) -> None:
        rope = self.rope_parameters or {}
        theta = rope.get("rope_theta")
        if not _positive_number(theta):
            raise ValueError(f"rope_parameters.rope_theta must be a positive number, got {theta!r}")
        rope_type = rope.get("rope_type", "default")
        if not hasattr(self, f"_validate_{rope_type}_rope_parameters"):  # Transformers only logs a warning
            raise ValueError(f"rope_parameters.rope_type={rope_type!r} is not a RoPE type Transformers knows")
        try:
            self.validate_rope()  # Transformers' own checks of the rope_type's keys (our `validate` shadows it)
        except KeyError as error:
            raise ValueError(f"rope_parameters: {error.args[0]}") from None

    @property
    def attention_head_dim(self) -> int:
        """Width of one attention head: `head_dim` when given, else hidden_size // num_attention_heads."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads: `num_key_value_heads`, or num_attention_heads (plain multi-head attention) when None."""
        return self.num_attention_heads if self.num_key_value_heads is None else self.num_key_value_heads

    @property
    def num_hidden_layers(self) -> int:
        """Number of unique blocks (prelude + core + coda)."""
        return self.n_prelude + self.n_core + self.n_coda

    @property
    def embed_scale(self) -> float:
        """Multiplier of the token embeddings (sqrt(hidden_size) as in huginn-0125, else 1)."""
        return math.sqrt(self.hidden_size) if self.scale_embeddings else 1.0

    @property
    def init_std(self) -> float:
        """Standard deviation of the published initialisation ("takase"), also used for the state init."""
        return math.sqrt(2 / (5 * self.hidden_size))

    def effective_depth(self, num_steps: int | None = None) -> int:
        """Number of block applications for `num_steps` recurrences (prelude + core * steps + coda)."""
        steps = self.mean_recurrence if num_steps is None else num_steps
        return self.n_prelude + self.n_core * steps + self.n_coda


# Field names of the published huginn-0125 config.json (model_type "huginn_raven") -> ours.
HUGINN_FIELD_NAMES: dict[str, str] = {
    "n_embd": "hidden_size",
    "n_heads": "num_attention_heads",
    "n_layers_in_prelude": "n_prelude",
    "n_layers_in_recurrent_block": "n_core",
    "n_layers_in_coda": "n_coda",
    "block_size": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
    "bias": "adapter_bias",
}

# Published fields whose value selects an architecture variant; only these values are implemented.
HUGINN_SUPPORTED_VARIANTS: dict[str, tuple[Any, ...]] = {
    "block_class_name": ("SandwichBlock",),
    "norm_class_name": ("RMSNorm_llama",),
    "mlp_class_name": ("GatedMLP",),
    "nonlin_name": ("SiLU",),
    "injection_type": ("linear",),
    "state_init": ("like-init",),
    "sampling_scheme": ("poisson-lognormal-filling",),
}


class HuginnRavenConfig(RecurrentDepthConfig):
    """The published huginn-0125 config (`model_type: huginn_raven`), read with the reference's field names.

    Loading a published folder with `AutoConfig` gives this class; its values live in the package's own fields,
    so the model code is shared. Unsupported architecture variants raise a ValueError.
    """

    model_type = "huginn_raven"
    attribute_map: ClassVar[dict[str, str]] = {"num_steps": "mean_recurrence", **HUGINN_FIELD_NAMES}

    def __post_init__(self, **kwargs):
        for field, supported in HUGINN_SUPPORTED_VARIANTS.items():
            value = kwargs.pop(field, supported[0])
            if value not in supported:
                raise ValueError(f"huginn_raven config: {field}={value!r} is not supported (supported: {supported})")
        if "rope_base" in kwargs:
            kwargs["rope_theta"] = kwargs.pop("rope_base")
        # Derived or bookkeeping fields of the reference; recomputed here, so dropped.
        for derived in (
            "n_layers",
            "padding_multiple",
            "init_strategy",
            "init_orthogonal",
            "activation_checkpoint_impl",
            "effective_expected_depth",
            "init_values",
            "hf_config",
            "name",
            "test_time_noise",
            "test_time_noise_type",
            "padded_vocab_size",
        ):
            kwargs.pop(derived, None)
        super().__post_init__(**kwargs)


__all__ = ["HuginnRavenConfig", "RecurrentDepthConfig"]
