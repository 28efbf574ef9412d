"""Forward semantics, padding, training depth, outputs and bad input of RecurrentDepthForCausalLM."""

import math

import pytest
import torch

from modeling_recurrent import RecurrentDepthForCausalLM
from modeling_recurrent.flops import flops_per_token
from modeling_recurrent.generation_recurrent_depth import resolve_num_steps, sample_num_steps

from .conftest import tiny_config, tiny_model


def ids(batch=2, length=7, vocab=64, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_zero_state_is_deterministic_and_steps_matter(model):
    x = ids()
    with torch.no_grad():
        a, b = model(x, num_steps=3, init_scale=0.0), model(x, num_steps=3, init_scale=0.0)
        c = model(x, num_steps=6, init_scale=0.0)
    assert torch.equal(a.logits, b.logits)
    assert a.logits.dtype == torch.float32 and a.logits.shape == (2, 7, 64)
    assert not torch.allclose(a.logits, c.logits, atol=1e-3)
    assert a.loss is None and a.num_steps == (0, 3)


def test_random_state_init_follows_seed_and_scale(model):
    x = ids()
    with torch.no_grad():
        torch.manual_seed(1)
        a = model(x, num_steps=2).logits
        torch.manual_seed(1)
        b = model(x, num_steps=2).logits
        torch.manual_seed(2)
        c = model(x, num_steps=2).logits
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_initial_state_statistics(model):
    embeds = torch.zeros(4, 256, 32)
    state = model.transformer.initialize_state(embeds, init_scale=1.0)
    std = math.sqrt(2 / (5 * 32))
    scale = model.config.embed_scale
    assert state.abs().max() <= 3 * std * scale + 1e-6
    assert 0.7 * std * scale < state.std() < 1.0 * std * scale  # truncation at 3 std shrinks the std slightly
    assert torch.equal(model.transformer.initialize_state(embeds, 0.0), embeds)


def test_pair_runs_same_total_steps(model):
    x = ids()
    with torch.no_grad():
        a = model(x, num_steps=5, init_scale=0.0).logits
        b = model(x, num_steps=(3, 2), init_scale=0.0).logits
    assert torch.allclose(a, b, atol=1e-6)


def test_input_states_warm_start(model):
    x = ids()
    with torch.no_grad():
        first = model(x, num_steps=2, init_scale=0.0)
        resumed = model(x, num_steps=3, input_states=first.latent_states * 0 + _raw_state(model, x, 2))
        direct = model(x, num_steps=5, init_scale=0.0)
    assert torch.allclose(resumed.logits, direct.logits, atol=1e-5)


def _raw_state(model, x, steps):
    """The un-normed core state after `steps` steps from a zero state."""
    t = model.transformer
    e = t.embed(x, None)
    ctx = t.block_context(e, None, None, None)
    for block in t.prelude:
        e = block(e, ctx)
    return t.iterate(torch.zeros_like(e), e, ctx, (steps, 0))


def test_training_mode_int_backprops_through_last_steps():
    model = tiny_model().train()
    assert resolve_num_steps(5, 4, True, 2) == (3, 2)
    assert resolve_num_steps(1, 4, True, 2) == (0, 1)
    assert resolve_num_steps(5, 4, False, 2) == (0, 5)
    out = model(ids(), labels=ids(), num_steps=5)
    assert out.num_steps == (3, 2)
    out.loss.backward()
    assert model.transformer.core_block[0].attn.Wqkv.weight.grad.abs().sum() > 0
    assert model.transformer.adapter.weight.grad.abs().sum() > 0


def test_training_mode_samples_depth():
    model = tiny_model(mean_recurrence=8, mean_backprop_depth=3).train()
    depths = {model(ids(), labels=ids()).num_steps for _ in range(12)}
    assert len(depths) > 1
    assert all(k == min(n + k, 3) for n, k in depths)


def test_depth_sampler_mean():
    gen = torch.Generator().manual_seed(0)
    draws = [sum(sample_num_steps(32, 8, gen)) for _ in range(3000)]
    assert 30 < sum(draws) / len(draws) < 35  # Poisson(lognormal with mean 32) + 1


def test_gradient_checkpointing_matches():
    model = tiny_model().train()
    x = ids()
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model(x, labels=x, num_steps=(1, 3), init_scale=0.0).loss.backward()
        grads.append(model.transformer.core_block[1].mlp.fc.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_labels_follow_transformers_convention(model):
    x = ids()
    labels = x.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        out = model(x, labels=labels, num_steps=2, init_scale=0.0)
    logits = out.logits[:, :-1].reshape(-1, 64)
    expected = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, expected, atol=1e-6)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sequence_alone(model, side):
    lengths = [7, 4, 2]
    rows = [ids(1, n, seed=n)[0] for n in lengths]
    width = max(lengths)
    batch = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        batch[i, span], mask[i, span] = row, 1
    with torch.no_grad():
        padded = model(batch, attention_mask=mask, num_steps=3, init_scale=0.0).logits
        for i, row in enumerate(rows):
            alone = model(row[None], num_steps=3, init_scale=0.0).logits[0]
            span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            assert torch.isfinite(padded[i]).all()
            assert (padded[i, span] - alone).abs().max() <= 1e-5


def test_eager_and_sdpa_agree():
    x = ids()
    sdpa = tiny_model()
    eager = tiny_model()
    eager.config._attn_implementation = "eager"
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    with torch.no_grad():
        a = sdpa(x, attention_mask=mask, num_steps=3, init_scale=0.0).logits
        b = eager(x, attention_mask=mask, num_steps=3, init_scale=0.0).logits
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1, 2:], b[1, 2:], atol=1e-5)


def test_bf16_runs(model):
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        out = model(ids(), num_steps=4, init_scale=0.0)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()


def test_logits_to_keep_and_hidden_states(model):
    x = ids()
    with torch.no_grad():
        full = model(x, num_steps=3, init_scale=0.0, output_hidden_states=True)
        last = model(x, num_steps=3, init_scale=0.0, logits_to_keep=1)
    assert last.logits.shape == (2, 1, 64)
    assert torch.allclose(last.logits[:, 0], full.logits[:, -1], atol=1e-6)
    cfg = model.config
    assert len(full.hidden_states) == 1 + cfg.n_prelude + 3 + cfg.n_coda
    # the last hidden state is the normed coda output (Transformers' convention): the head reads it
    assert torch.allclose(model.lm_head(full.hidden_states[-1]), full.logits, atol=1e-5)


def test_inputs_embeds_equals_input_ids(model):
    x = ids()
    with torch.no_grad():
        a = model(x, num_steps=2, init_scale=0.0).logits
        b = model(inputs_embeds=model.transformer.wte(x), num_steps=2, init_scale=0.0).logits
    assert torch.allclose(a, b, atol=1e-6)


def test_prenorm_gqa_half_rope_variant_runs():
    model = tiny_model(
        block_style="prenorm",
        rope_layout="half",
        num_key_value_heads=2,
        qk_bias=False,
        qkv_bias=True,
        qk_norm=True,
        injection="add",
        scale_embeddings=False,
        core_output_norm=False,
        tie_word_embeddings=False,
    )
    assert not hasattr(model.transformer, "adapter")
    with torch.no_grad():
        out = model(ids(), num_steps=3, init_scale=0.0)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize(
    "num_steps, error",
    [
        (0, ValueError),
        (-2, ValueError),
        (2.5, TypeError),
        (True, TypeError),
        ((1,), ValueError),
        ((1, -1), ValueError),
        ((0, 0), ValueError),
        ("4", TypeError),
    ],
)
def test_bad_num_steps(model, num_steps, error):
    with pytest.raises(error, match="num_steps"):
        model(ids(), num_steps=num_steps)


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="init_scale"):
        model(ids(), init_scale=-1.0)
    with pytest.raises(ValueError, match="input_ids must lie in"):
        model(torch.tensor([[1, 64]]))
    with pytest.raises(ValueError, match="input_ids must lie in"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(ids(1, 129))
    with pytest.raises(ValueError, match="input_states"):
        model(ids(), input_states=torch.zeros(2, 3, 32))
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="output_attentions"):
        model(ids(), output_attentions=True)


def test_model_is_a_causal_lm(model):
    assert isinstance(model, RecurrentDepthForCausalLM)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_set_input_embeddings_refuses_other_modules(model):
    with pytest.raises(TypeError, match="nn.Embedding"):
        model.set_input_embeddings(torch.nn.Linear(32, 64))
    embedding = torch.nn.Embedding(64, 32)
    model.set_input_embeddings(embedding)
    assert model.get_input_embeddings() is embedding


def test_key_value_heads_unset_after_construction_mean_one_per_attention_head():
    config = tiny_config()
    config.num_key_value_heads = None  # allowed by the field's rule, as at construction
    assert config.num_kv_heads == config.num_attention_heads
    torch.manual_seed(0)
    unset = RecurrentDepthForCausalLM(config).eval()
    torch.manual_seed(0)
    explicit = RecurrentDepthForCausalLM(tiny_config(num_key_value_heads=4)).eval()
    x = ids()
    with torch.no_grad():
        logits = [m(x, num_steps=2, init_scale=0.0).logits for m in (unset, explicit)]
        torch.testing.assert_close(*logits, rtol=0, atol=0)
        unset.generate(x, num_steps=2, max_new_tokens=2, do_sample=False)  # the cache sizes its slots from it too
    assert flops_per_token(config, 2) == flops_per_token(explicit.config, 2)
