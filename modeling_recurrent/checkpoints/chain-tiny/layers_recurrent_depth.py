"""The blocks of a recurrent-depth model: norms, rotary embeddings, attention, gated MLP and the transformer block.

Each block owns its fixed (phase, layer) index and passes it to the cache; nothing here counts layers. This file
travels as remote code with every saved model, next to modeling_recurrent_depth.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .cache_recurrent_depth import RecurrentCache
from .configuration_recurrent_depth import RecurrentDepthConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, as in huginn-0125 and Llama."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's rms_norm is x * rsqrt(mean(x^2) + eps), the same arithmetic in one call (fewer dispatches).
        if x.dtype == self.weight.dtype == torch.float32:
            # Nothing to cast: the weight goes into the same call, bit for bit the same result.
            return nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        normed = nn.functional.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return normed.type_as(x) * self.weight


class RotaryEmbedding(nn.Module):
    """cos/sin tables (B, T, 1, hd) from position ids; built once per forward and shared by all blocks."""

    inv_freq: torch.Tensor  # a buffer

    def __init__(self, config: RecurrentDepthConfig):
        super().__init__()
        self.config = config
        self.layout = config.rope_layout
        inv_freq, self.attention_scaling = self.compute_inv_freq()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def compute_inv_freq(self) -> tuple[torch.Tensor, float]:
        """Inverse frequencies (hd/2,) in float32 and the attention scaling of the configured rope type."""
        config = self.config
        rope = config.rope_parameters or {}  # never None once the config validated itself
        rope_type = rope.get("rope_type", "default")
        if rope_type == "default":
            dim, theta = config.attention_head_dim, rope["rope_theta"]
            return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)), 1.0
        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(
                f"rope_parameters.rope_type={rope_type!r} is not supported; use one of "
                f"{['default', *ROPE_INIT_FUNCTIONS]}"
            )
        return ROPE_INIT_FUNCTIONS[rope_type](config, None)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (B, T, 1, hd) in float32, laid out so that `apply_rotary` is x * cos + swap(x) * sin."""
        freqs = position_ids.float()[..., None] * self.inv_freq.float().to(position_ids.device)  # (B, T, hd/2)
        cos, sin = freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling
        if self.layout == "half":  # pairs (x[i], x[i + hd/2]): swap(x) = (x2, x1), sin' = (-sin, sin)
            cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)
        else:  # pairs (x[2i], x[2i+1]): swap(x) = (x[2i+1], x[2i]), sin' = (-sin_i, sin_i) interleaved
            cos, sin = cos.repeat_interleave(2, dim=-1), torch.stack([-sin, sin], dim=-1).flatten(-2)
        return cos[:, :, None], sin[:, :, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """Rotate (B, T, H, hd) in float32: adjacent pairs (x[2i], x[2i+1]) for huginn, halves for Llama.

    With the tables of `RotaryEmbedding` this is x * cos + swap(x) * sin, bit for bit the textbook
    (a cos - b sin, b cos + a sin) since a - b * s == a + b * (-s) in IEEE arithmetic, in four kernels.
    """
    x32 = x.float()
    if layout == "adjacent":
        swapped = x32.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    else:
        swapped = x32.roll(x32.shape[-1] // 2, dims=-1)
    return (x32 * cos + swapped * sin).type_as(x)


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention over (B, H, T, hd) with grouped kv heads and an optional additive/bool mask."""
    groups = module.num_key_value_groups
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    elif query.shape[2] > 1:
        causal = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device)
        causal = causal.tril(key.shape[2] - query.shape[2])
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


@dataclass
class BlockContext:
    """What every block of one forward shares: RoPE tables, the mask, the cache and where new tokens start."""

    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    attention_mask: torch.Tensor | None
    cache: RecurrentCache | None
    start: int | torch.Tensor  # a 0-d tensor with a StaticRecurrentCache
    rows: torch.Tensor | None = None

    def select(self, rows: torch.Tensor) -> BlockContext:
        """The context of a subset of batch rows (adaptive exit: rows still iterating)."""
        cos, sin = self.position_embeddings
        if cos.shape[0] > 1:
            cos, sin = cos[rows], sin[rows]
        mask = self.attention_mask[rows] if self.attention_mask is not None else None
        return BlockContext((cos, sin), mask, self.cache, self.start, rows)


class Attention(nn.Module):
    """Causal self-attention with fused Wqkv, optional qk_bias (huginn), q/k/v biases (Qwen2), q/k norms (Qwen3)."""

    def __init__(self, config: RecurrentDepthConfig):
        super().__init__()
        self.config = config
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_kv_heads
        self.head_dim = config.attention_head_dim
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.chunks = [
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        ]
        self.Wqkv = nn.Linear(config.hidden_size, sum(self.chunks), bias=config.qkv_bias)
        if config.qk_bias:
            self.qk_bias = nn.Parameter(torch.zeros(2, 1, self.num_heads, self.head_dim))
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        # Read once here: config attribute access is slow, and forward runs num_steps times per core block.
        self.use_qk_norm, self.use_qk_bias, self.rope_layout = config.qk_norm, config.qk_bias, config.rope_layout
        # Without q/k norms, q and k heads are adjacent in Wqkv's output: biased and rotated in one go.
        self.joint_qk = not config.qk_norm and (not config.qk_bias or self.num_kv_heads == self.num_heads)

    def forward(self, x: torch.Tensor, ctx: BlockContext, phase: str, layer: int, step: int) -> torch.Tensor:
        b, t, _ = x.shape
        cos, sin = ctx.position_embeddings
        qkv = self.Wqkv(x)
        heads = [self.num_heads, self.num_kv_heads]
        if self.joint_qk:
            qk, v = qkv.split([self.chunks[0] + self.chunks[1], self.chunks[2]], dim=-1)
            qk = qk.view(b, t, sum(heads), self.head_dim)  # (B, T, H + KV, hd)
            if self.use_qk_bias:
                qk = (qk + self.qk_bias.view(-1, self.head_dim)).to(qk.dtype)
            q, k = apply_rotary(qk, cos, sin, self.rope_layout).split(heads, dim=2)
        else:
            q, k, v = qkv.split(self.chunks, dim=-1)
            q = q.view(b, t, self.num_heads, self.head_dim)  # (B, T, H, hd)
            k = k.view(b, t, self.num_kv_heads, self.head_dim)
            if self.use_qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            if self.use_qk_bias:
                q_bias, k_bias = self.qk_bias.split(1, dim=0)
                q, k = (q + q_bias).to(q.dtype), (k + k_bias).to(k.dtype)
            q, k = apply_rotary(q, cos, sin, self.rope_layout), apply_rotary(k, cos, sin, self.rope_layout)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, hd)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if ctx.cache is not None:
            k, v = ctx.cache.update_block(k, v, phase, layer, step, ctx.start, ctx.rows)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        y, _ = attention(self, q, k, v, ctx.attention_mask, scaling=self.scaling, dropout=0.0)
        return self.proj(y.reshape(b, t, -1))


class GatedMLP(nn.Module):
    """`fc` to 2 x intermediate, chunk into (a, b), silu(a) * b, `proj` back."""

    def __init__(self, config: RecurrentDepthConfig):
        super().__init__()
        self.fc = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc(x).chunk(2, dim=-1)
        return self.proj(nn.functional.silu(a) * b)


class RecurrentBlock(nn.Module):
    """One transformer block; `phase` and `layer` (its index within its phase) are fixed at construction.

    sandwich (huginn): x = n2(attn(n1(x)) + x); x = n4(mlp(n3(x)) + x)
    prenorm (Llama):   x = x + attn(n1(x));     x = x + mlp(n3(x))
    """

    def __init__(self, config: RecurrentDepthConfig, phase: str, layer: int):
        super().__init__()
        self.phase, self.layer = phase, layer
        self.sandwich = config.block_style == "sandwich"
        eps = config.rms_norm_eps
        self.norm_1 = RMSNorm(config.hidden_size, eps)
        self.attn = Attention(config)
        self.norm_3 = RMSNorm(config.hidden_size, eps)
        self.mlp = GatedMLP(config)
        if self.sandwich:
            self.norm_2 = RMSNorm(config.hidden_size, eps)
            self.norm_4 = RMSNorm(config.hidden_size, eps)

    def forward(self, x: torch.Tensor, ctx: BlockContext, step: int = 0) -> torch.Tensor:
        attn_out = self.attn(self.norm_1(x), ctx, self.phase, self.layer, step)
        if self.sandwich:
            x = self.norm_2(attn_out + x)
            return self.norm_4(self.mlp(self.norm_3(x)) + x)
        x = x + attn_out
        return x + self.mlp(self.norm_3(x))
