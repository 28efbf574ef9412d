"""The blocks against their textbook definitions: RMSNorm, both rotary layouts, eager attention."""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from modeling_recurrent.layers_recurrent_depth import RMSNorm, RotaryEmbedding, apply_rotary, eager_attention

from .conftest import tiny_config


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_the_published_arithmetic_bit_for_bit(dtype):
    norm = RMSNorm(32, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32))
    x = (3 * torch.randn(2, 5, 32)).to(dtype)
    published = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.equal(norm(x), published.type_as(x) * norm.weight)


def rotary(layout: str, positions: torch.Tensor):
    config = tiny_config(rope_layout=layout)
    return RotaryEmbedding(config)(positions), config.attention_head_dim, config.rope_parameters["rope_theta"]


def test_adjacent_layout_is_huginns_complex_rotation():
    positions = torch.tensor([[0, 3, 4, 9]])
    (cos, sin), hd, theta = rotary("adjacent", positions)
    x = torch.randn(1, 4, 2, hd)  # (B, T, H, hd)
    # huginn-0125: pairs (x[2i], x[2i+1]) as complex numbers times exp(i * position * theta^(-2i/hd)).
    angles = positions[0, :, None].float() / theta ** (torch.arange(0, hd, 2).float() / hd)  # (T, hd/2)
    turns = torch.polar(torch.ones_like(angles), angles)[:, None]  # (T, 1, hd/2)
    expected = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * turns)
    torch.testing.assert_close(apply_rotary(x, cos, sin, "adjacent"), expected.flatten(-2), rtol=0, atol=1e-6)


def test_half_layout_is_llamas_rotation():
    positions = torch.tensor([[0, 1, 5, 7], [2, 3, 4, 5]])
    (cos, sin), hd, theta = rotary("half", positions)
    q, k = torch.randn(2, 4, 3, hd), torch.randn(2, 4, 3, hd)  # (B, T, H, hd)
    # Llama's tables: cos/sin (B, T, hd) of the frequencies repeated over both halves.
    freqs = positions[..., None].float() / theta ** (torch.arange(0, hd, 2).float() / hd)
    angles = torch.cat([freqs, freqs], dim=-1)
    llama_q, llama_k = apply_rotary_pos_emb(q, k, angles.cos(), angles.sin(), unsqueeze_dim=2)
    torch.testing.assert_close(apply_rotary(q, cos, sin, "half"), llama_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(apply_rotary(k, cos, sin, "half"), llama_k, rtol=0, atol=1e-6)


@pytest.mark.parametrize("groups", [1, 2])
def test_eager_attention_matches_sdpa_causal_and_masked(groups):
    b, h, t, hd = 2, 4, 6, 8
    module = torch.nn.Module()
    module.num_key_value_groups = groups
    q = torch.randn(b, h, t, hd)
    k, v = torch.randn(b, h // groups, t, hd), torch.randn(b, h // groups, t, hd)
    out, weights = eager_attention(module.eval(), q, k, v, None, scaling=hd**-0.5)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)
    torch.testing.assert_close(out, expected.transpose(1, 2))
    assert torch.allclose(weights.sum(-1), torch.ones(b, h, t)) and weights.triu(1).abs().max() == 0
    mask = torch.ones(b, 1, t, t, dtype=torch.bool).tril()
    mask[0, :, :, 0] = False  # row 0 is left-padded by one token
    mask[0, :, 0, 0] = True
    out, _ = eager_attention(module.eval(), q, k, v, mask, scaling=hd**-0.5)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=groups > 1)
    torch.testing.assert_close(out, expected.transpose(1, 2))
