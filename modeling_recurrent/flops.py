"""Compute accounting: FLOPs per token of a recurrent-depth forward pass at a given number of steps."""

from __future__ import annotations

from .configuration_recurrent_depth import RecurrentDepthConfig


def block_flops_per_token(config: RecurrentDepthConfig, context: int) -> int:
    """Multiply-adds x 2 of one block for one token attending to `context` positions."""
    d, hd = config.hidden_size, config.attention_head_dim
    heads, kv = config.num_attention_heads, config.num_kv_heads
    projections = d * (heads + 2 * kv) * hd + heads * hd * d
    mlp = d * 2 * config.intermediate_size + config.intermediate_size * d
    attention = 2 * heads * hd * context  # scores and weighted sum
    return 2 * (projections + mlp + attention)


def flops_per_token(config: RecurrentDepthConfig, num_steps: int | float, context: int = 0) -> float:
    """Forward FLOPs per token: prelude + core x steps (+ adapter) + coda + lm_head. `num_steps` may be an average."""
    block = block_flops_per_token(config, context)
    adapter = 2 * 2 * config.hidden_size * config.hidden_size if config.injection == "concat" else 0
    head = 2 * config.hidden_size * config.vocab_size
    return (config.n_prelude + config.n_coda) * block + num_steps * (config.n_core * block + adapter) + head
