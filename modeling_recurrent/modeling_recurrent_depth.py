"""Recurrent-depth causal language model (Geiping et al. 2025, huginn-0125), for Transformers 5.

    e = P(wte(x) * embed_scale)                 prelude
    s_0 ~ TruncNormal(0, sigma^2) * embed_scale  (or zeros with init_scale=0, or given `input_states`)
    s_i = R(adapter([s_{i-1}, e]))  i = 1..r    core, iterated r = num_steps times
    p = lm_head(norm(C(norm(s_r))))             coda

This file travels as remote code with every saved model: it imports only torch, transformers and its sibling
`*_recurrent_depth.py` files.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import cast

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.utils import ModelOutput

from .cache_recurrent_depth import CODA, CORE, PRELUDE, RecurrentCache, one_cache
from .configuration_recurrent_depth import HuginnRavenConfig, RecurrentDepthConfig
from .generation_recurrent_depth import (
    RecurrentGenerationMixin,
    exit_criterion_for,
    iterate_until_exit,
    resolve_num_steps,
    sample_num_steps,
)
from .layers_recurrent_depth import Attention, BlockContext, GatedMLP, RecurrentBlock, RMSNorm, RotaryEmbedding
from .serialization_recurrent_depth import StrictCheckpointPreTrainedModel
from .static_cache_recurrent_depth import StaticRecurrentCache

StepSpec = int | tuple[int, int]


@dataclass
class RecurrentDepthOutput(ModelOutput):
    """Output of `RecurrentDepthForCausalLM`.

    loss: () next-token loss when `labels` are given, else None.
    logits: (B, T', V) float32.
    cache: the `RecurrentCache` (also readable as `past_key_values`).
    latent_states: (B, T, D) the final latent state, normed as the coda sees it.
    hidden_states: embeddings, each prelude block, each core step, each coda block (the last one normed).
    num_steps: (steps without gradient, steps with gradient) that this call ran at most.
    steps_used: (B,) recurrence steps each row ran (fewer than num_steps where an exit criterion stopped it).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: RecurrentCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    latent_states: torch.Tensor | None = None
    num_steps: tuple[int, int] | None = None
    steps_used: torch.Tensor | None = None


class RecurrentDepthPreTrainedModel(StrictCheckpointPreTrainedModel):
    config_class = RecurrentDepthConfig
    config: RecurrentDepthConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RecurrentBlock"]
    _supports_sdpa = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False
    # Published huginn checkpoints also store their RoPE table; it is recomputed from the config.
    _keys_to_ignore_on_load_unexpected = [r"freqs_cis"]

    def _init_weights(self, module: nn.Module) -> None:
        """The published "takase" init: std sqrt(2/5d), output projections scaled by the expected depth."""
        config = self.config
        std = config.init_std
        out_std = std / math.sqrt(2 * config.effective_depth())
        if isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, RotaryEmbedding):
            # A non-persistent buffer: from_pretrained materialises it empty, so it is recomputed here.
            init.copy_(module.inv_freq, module.compute_inv_freq()[0])
        elif isinstance(module, nn.Embedding):
            init.trunc_normal_(module.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
        elif isinstance(module, Attention):
            init.trunc_normal_(module.Wqkv.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
            init.trunc_normal_(module.proj.weight, mean=0.0, std=out_std, a=-3 * out_std, b=3 * out_std)
            if module.Wqkv.bias is not None:
                init.zeros_(module.Wqkv.bias)
            if config.qk_bias:
                init.zeros_(module.qk_bias)
        elif isinstance(module, GatedMLP):
            # The gate half of `fc` gets std, its value half and `proj` the depth-scaled std, as published.
            init.trunc_normal_(module.fc.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
            if not getattr(module.fc.weight, "_is_hf_initialized", False):
                with torch.no_grad():
                    value_half = module.fc.weight[module.fc.out_features // 2 :]
                    nn.init.trunc_normal_(value_half, mean=0.0, std=out_std, a=-3 * out_std, b=3 * out_std)
            init.trunc_normal_(module.proj.weight, mean=0.0, std=out_std, a=-3 * out_std, b=3 * out_std)
        elif isinstance(module, nn.Linear):
            # adapter and lm_head; block projections are re-initialised by their parent module, visited later.
            init.trunc_normal_(module.weight, mean=0.0, std=std, a=-3 * std, b=3 * std)
            if module.bias is not None:
                init.zeros_(module.bias)


class RecurrentDepthModel(RecurrentDepthPreTrainedModel):
    """Prelude, adapter, iterated core and coda; returns the final normed hidden states (no lm_head)."""

    def __init__(self, config: RecurrentDepthConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.prelude = nn.ModuleList(RecurrentBlock(config, PRELUDE, i) for i in range(config.n_prelude))
        if config.injection == "concat":
            self.adapter = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=config.adapter_bias)
        self.core_block = nn.ModuleList(RecurrentBlock(config, CORE, i) for i in range(config.n_core))
        self.coda = nn.ModuleList(RecurrentBlock(config, CODA, i) for i in range(config.n_coda))
        self.ln_f = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Module) -> None:
        if not isinstance(value, nn.Embedding):
            raise TypeError(f"the input embeddings must be an nn.Embedding, got {type(value).__name__}")
        self.wte = value

    def initialize_state(self, embeds: torch.Tensor, init_scale: float) -> torch.Tensor:
        """Initial latent (B, T, D): truncated normal at +-3 std, std = sqrt(2/5d) * init_scale, times embed_scale."""
        std = self.config.init_std * init_scale
        if std == 0:
            return torch.zeros_like(embeds)
        state = torch.empty_like(embeds)
        nn.init.trunc_normal_(state, mean=0.0, std=std, a=-3 * std, b=3 * std)
        return state * self.config.embed_scale

    def core_step(self, state: torch.Tensor, embeds: torch.Tensor, ctx: BlockContext, step: int) -> torch.Tensor:
        """One recurrence: inject the embeddings into the state, run the core blocks. (B, T, D) -> (B, T, D)."""
        concat = self.config.injection == "concat"
        x = self.adapter(torch.cat([state, embeds], dim=-1)) if concat else state + embeds
        for block in self.core_block:
            x = block(x, ctx, step)
        return x

    def iterate(
        self,
        state: torch.Tensor,
        embeds: torch.Tensor,
        ctx: BlockContext,
        steps: tuple[int, int],
        record: Callable[[torch.Tensor], None] | None = None,
        first_step: int = 0,
    ) -> torch.Tensor:
        """Run steps[0] core steps without gradient, then steps[1] with it (checkpointed per step if enabled)."""
        no_grad, with_grad = steps
        with torch.no_grad():
            for step in range(first_step, first_step + no_grad):
                state = self.core_step(state, embeds, ctx, step)
                if record is not None:
                    record(state)
        for step in range(first_step + no_grad, first_step + no_grad + with_grad):
            if self.gradient_checkpointing and self.training:
                state = self._gradient_checkpointing_func(self.core_step, state, embeds, ctx, step)
            else:
                state = self.core_step(state, embeds, ctx, step)
            if record is not None:
                record(state)
        return state

    def readout(self, state: torch.Tensor, ctx: BlockContext, head: nn.Module, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V) that the coda and `head` give for a core state (the logit lens of a recurrence step);
        with `last_only`, (B, 1, V) for the last position (the coda still runs on all of them, the head does not)."""
        x = self.ln_f(state) if self.config.core_output_norm else state
        for block in self.coda:
            x = block(x, ctx)
        return head(self.ln_f(x[:, -1:] if last_only else x)).float()

    def embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """Scaled token embeddings (B, T, D), with the input checked against the vocabulary."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        given = cast(torch.Tensor, input_ids if inputs_embeds is None else inputs_embeds)
        if given.dim() >= 2 and 0 in given.shape[:2]:
            raise ValueError(f"the input needs at least one row and one position, got shape {tuple(given.shape)}")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
            if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
                raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
            if (
                not torch.compiler.is_compiling()  # a data-dependent check: eager only
                and input_ids.numel()
                and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size)
            ):
                raise ValueError(
                    f"input_ids must lie in [0, {self.config.vocab_size}), got values in "
                    f"[{int(input_ids.min())}, {int(input_ids.max())}]"
                )
            embeds = self.wte(input_ids)
        else:
            embeds = given
            if embeds.dim() != 3 or embeds.shape[-1] != self.config.hidden_size or not embeds.is_floating_point():
                raise ValueError(
                    f"inputs_embeds must be a float tensor (batch, seq_len, {self.config.hidden_size}), got "
                    f"{embeds.dtype} {tuple(embeds.shape)}"
                )
        embeds = embeds.to(self.wte.weight.dtype)
        return embeds * self.config.embed_scale if self.config.scale_embeddings else embeds

    def block_context(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: RecurrentCache | None,
        num_steps: int = 1,
    ) -> BlockContext:
        """Positions (following the padding mask), RoPE tables and the causal mask, built once per forward that runs
        up to `num_steps` recurrence steps (the cache checks they fit before anything is written)."""
        past = cache.get_seq_length() if cache is not None else 0  # a tensor for a StaticRecurrentCache
        batch, length = embeds.shape[:2]
        if cache is not None:
            cache.check_room(length, num_steps, batch)
        if (
            attention_mask is not None
            and attention_mask.dim() == 2
            and (attention_mask.shape[0] != batch or attention_mask.shape[1] < length)
        ):
            raise ValueError(
                f"attention_mask must have shape (batch, past + seq_len) with batch={batch}, seq_len={length}; got "
                f"{tuple(attention_mask.shape)}"
            )
        if position_ids is not None and (
            position_ids.dim() != 2 or position_ids.shape[1] != length or position_ids.shape[0] not in (1, batch)
        ):
            raise ValueError(f"position_ids must have shape ({batch} or 1, {length}), got {tuple(position_ids.shape)}")
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 2:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -length:]
            else:
                position_ids = (torch.arange(length, device=embeds.device) + past)[None]
        if (
            not torch.compiler.is_compiling()  # a data-dependent check: eager only
            and position_ids.numel()
            and int(position_ids.max()) >= self.config.max_position_embeddings
        ):
            raise ValueError(
                f"position {int(position_ids.max())} is beyond max_position_embeddings "
                f"({self.config.max_position_embeddings}); the sequence is too long for this model"
            )
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            # A static cache returns whole buffers: only an explicit mask hides the positions not written yet.
            allow_is_causal_skip=not isinstance(cache, StaticRecurrentCache),
        )
        return BlockContext(self.rotary(position_ids), mask, cache, past)

    def encode(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: RecurrentCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        record: Callable[[torch.Tensor], None] | None = None,
        num_steps: int = 1,
    ) -> tuple[torch.Tensor, BlockContext]:
        """Embeddings and prelude: the prelude output (B, T, D) that every core step injects, and the block context
        for the (up to `num_steps`) steps and the coda. `record` sees the embeddings and each prelude block's output."""
        embeds = self.embed(input_ids, inputs_embeds)
        ctx = self.block_context(embeds, attention_mask, position_ids, cache, num_steps)
        x = embeds
        if record is not None:
            record(x)
        for block in self.prelude:
            x = block(x, ctx)
            if record is not None:
                record(x)
        return x, ctx

    def resolve_cache(self, past_key_values: object, use_cache: bool | None) -> RecurrentCache | None:
        """The RecurrentCache to use: the given one (an empty Transformers cache is replaced), a new one, or None."""
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # recomputed steps would write the cache twice
        if not use_cache:
            return None
        if past_key_values is None:
            return RecurrentCache(self.config)
        if not isinstance(past_key_values, Cache):
            raise TypeError(f"past_key_values must be a RecurrentCache or None, got {type(past_key_values).__name__}")
        if not isinstance(past_key_values, RecurrentCache):
            if past_key_values.get_seq_length() != 0:
                raise ValueError(
                    f"past_key_values must be a RecurrentCache (got a non-empty {type(past_key_values).__name__})"
                )
            return RecurrentCache(self.config)
        past_key_values.check_compatible(self.config)
        return past_key_values

    def initial_state(
        self,
        embeds: torch.Tensor,
        input_states: torch.Tensor | None,
        warm_start: bool,
        cache: RecurrentCache | None,
        init_scale: float,
    ) -> torch.Tensor:
        """Given `input_states`, else random (scaled by init_scale); with `warm_start` the first new position
        starts from the previous position's final latent kept in the cache ("continuous compute")."""
        if input_states is not None:
            if input_states.shape != embeds.shape:
                raise ValueError(f"input_states must have shape {tuple(embeds.shape)}, got {tuple(input_states.shape)}")
            return input_states.to(embeds.dtype).clone()
        state = self.initialize_state(embeds, init_scale)
        if not isinstance(warm_start, bool):
            raise TypeError(f"warm_start must be True or False, got {warm_start!r}")
        if warm_start and cache is not None and cache.last_latent is not None:
            state[:, :1] = cache.last_latent.to(state.dtype)
        return state

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: RecurrentCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        num_steps: StepSpec | None = None,
        init_scale: float | None = None,
        input_states: torch.Tensor | None = None,
        warm_start: bool = False,
        exit_criterion: str | None = None,
        exit_threshold: float | None = None,
        min_steps: int = 0,
        output_hidden_states: bool | None = None,
        head: nn.Module | None = None,
        **kwargs,
    ) -> RecurrentDepthOutput:
        """Prelude, core iterations, coda. `logits` of the output holds the final normed hidden states (B, T, D).

        See RecurrentDepthForCausalLM.forward for the arguments; `head` is the output layer that logit-based exit
        criteria read through.
        """
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions=True is not supported: attention weights are not kept (fused kernels)")
        cache = self.resolve_cache(one_cache(past_key_values, kwargs.pop("cache", None)), use_cache)
        init_scale = self.config.init_scale if init_scale is None else init_scale
        if isinstance(init_scale, bool) or not isinstance(init_scale, (int, float)) or not 0 <= init_scale < math.inf:
            raise ValueError(f"init_scale must be a finite number >= 0, got {init_scale!r}")
        if num_steps is None and self.training:
            steps = sample_num_steps(self.config.mean_recurrence, self.config.mean_backprop_depth)
        else:
            steps = resolve_num_steps(
                num_steps, self.config.mean_recurrence, self.training, self.config.mean_backprop_depth
            )
        criterion = exit_criterion_for(
            exit_criterion, exit_threshold, min_steps, sum(steps), training=self.training, has_head=head is not None
        )

        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        hidden: list[torch.Tensor] | None = [] if output_hidden_states else None
        record = hidden.append if hidden is not None else None
        x, ctx = self.encode(input_ids, attention_mask, position_ids, cache, inputs_embeds, record, sum(steps))
        state = self.initial_state(x, input_states, warm_start, cache, init_scale)
        if criterion is None:
            state = self.iterate(state, x, ctx, steps, record=record)
            steps_used = torch.full((x.shape[0],), sum(steps), dtype=torch.long, device=x.device)
        else:
            logit_head = cast(nn.Module, head)  # exit_criterion_for refuses a criterion that reads logits without one
            readout = partial(self.readout, head=logit_head)
            state, steps_used = iterate_until_exit(
                self.core_step, readout, state, x, ctx, sum(steps), criterion, min_steps
            )
        latent = self.ln_f(state) if self.config.core_output_norm else state
        x = latent
        for block in self.coda:
            x = block(x, ctx)
            if hidden is not None:
                hidden.append(x)
        x = self.ln_f(x)
        if hidden is not None:
            hidden[-1] = x
        if cache is not None:
            cache.record(ctx.start, steps_used, latent.shape[1], latent[:, -1:].detach())
        return RecurrentDepthOutput(
            logits=x,
            cache=cache,
            hidden_states=tuple(hidden) if hidden is not None else None,
            latent_states=latent,
            num_steps=steps,
            steps_used=steps_used,
        )


class RecurrentDepthForCausalLM(RecurrentDepthPreTrainedModel, RecurrentGenerationMixin):
    """Recurrent-depth causal LM. `forward(..., num_steps=r)` and `generate(..., num_steps=r)` pick the depth."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: RecurrentDepthConfig):
        super().__init__(config)
        self.transformer = RecurrentDepthModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: RecurrentCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        num_steps: StepSpec | None = None,
        init_scale: float | None = None,
        input_states: torch.Tensor | None = None,
        warm_start: bool = False,
        exit_criterion: str | None = None,
        exit_threshold: float | None = None,
        min_steps: int = 0,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> RecurrentDepthOutput:
        """Logits (B, T', V) in float32 for input_ids (B, T).

        num_steps: int r (default: config.mean_recurrence) or a pair (steps without grad, steps with grad); in
            training mode with None the depth is sampled as in the paper, and an int backpropagates through its
            last `mean_backprop_depth` steps.
        init_scale: scale of the random initial state (0 = zeros; default config.init_scale).
        input_states: (B, T, D) initial latents. warm_start: start the first new position from the previous
            position's final latent kept in the cache ("continuous compute").
        exit_criterion: per-row adaptive exit, one of "kl", "minp-kl", "entropy-diff", "latent-diff", "cosine",
            "argmax-stability", with exit_threshold (None: published default) and min_steps; num_steps is then
            the maximum. Steps each row ran are in `steps_used`.
        labels: (B, T) token ids, shifted inside, -100 ignored.
        logits_to_keep: compute logits only for the last k positions (0: all), or for these indices.
        """
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        out = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=one_cache(past_key_values, kwargs.pop("cache", None)),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            num_steps=num_steps,
            init_scale=init_scale,
            input_states=input_states,
            warm_start=warm_start,
            exit_criterion=exit_criterion,
            exit_threshold=exit_threshold,
            min_steps=min_steps,
            output_hidden_states=output_hidden_states,
            head=self.lm_head,
            **kwargs,
        )
        hidden = out.logits
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep]).float()
        loss = None
        if labels is not None:
            if labels.shape != hidden.shape[:2] or labels.is_floating_point():
                raise ValueError(
                    f"labels must be token ids of the input's shape {tuple(hidden.shape[:2])}, got {labels.dtype} "
                    f"{tuple(labels.shape)}"
                )
            ignore = kwargs.get("ignore_index", -100)
            if (
                not torch.compiler.is_compiling()
                and not ((labels == ignore) | ((labels >= 0) & (labels < self.config.vocab_size))).all()
            ):
                raise ValueError(f"labels must lie in [0, {self.config.vocab_size}) or be {ignore} (ignored)")
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return RecurrentDepthOutput(
            loss=loss,
            logits=logits,
            cache=out.cache,
            hidden_states=out.hidden_states,
            latent_states=out.latent_states,
            num_steps=out.num_steps,
            steps_used=out.steps_used,
        )


class HuginnRavenForCausalLM(RecurrentDepthForCausalLM):
    """The same model, registered for published huginn-0125 folders (`model_type: huginn_raven`)."""

    config_class = HuginnRavenConfig
    config: HuginnRavenConfig


__all__ = [
    "HuginnRavenForCausalLM",
    "RecurrentDepthForCausalLM",
    "RecurrentDepthModel",
    "RecurrentDepthOutput",
    "RecurrentDepthPreTrainedModel",
]
