"""Property-based tests over configs and inputs.

Any valid tiny config (block style, RoPE layout and scaling, GQA, head_dim, biases, q/k norms, injection, tying,
0..2 prelude/coda blocks) builds, runs for any num_steps with left or right padding (each padded row equal to the row
alone), and saves/reloads bit-exactly. Any config with one bad field raises a ValueError naming that field, at
construction or when the field is assigned later; bad forward/generate arguments raise ValueError or TypeError
from the argument checks, never from deep inside torch.
"""

import math
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from modeling_recurrent import RecurrentCache, RecurrentDepthConfig, RecurrentDepthForCausalLM
from modeling_recurrent.configuration_recurrent_depth import _FIELD_RULES

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def valid_fields(draw) -> dict:
    heads = draw(st.sampled_from([1, 2, 4]))
    kv_heads = draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0]))
    head_dim = draw(st.sampled_from([None, 4, 6]))
    hidden = heads * draw(st.sampled_from([2, 4, 8])) if head_dim is None else draw(st.sampled_from([6, 8, 12]))
    rope = draw(
        st.sampled_from(
            [
                None,
                {"rope_type": "default", "rope_theta": 10_000.0},
                {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0},
            ]
        )
    )
    return dict(
        vocab_size=draw(st.integers(8, 40)),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=draw(st.integers(1, 24)),
        n_prelude=draw(st.integers(0, 2)),
        n_core=draw(st.integers(1, 2)),
        n_coda=draw(st.integers(0, 2)),
        max_position_embeddings=32,
        rope_parameters=rope,
        rope_layout=draw(st.sampled_from(["adjacent", "half"])),
        block_style=draw(st.sampled_from(["sandwich", "prenorm"])),
        injection=draw(st.sampled_from(["concat", "add"])),
        qk_bias=kv_heads == heads and draw(st.booleans()),  # huginn's qk_bias has one entry per query head
        qkv_bias=draw(st.booleans()),
        qk_norm=draw(st.booleans()),
        adapter_bias=draw(st.booleans()),
        scale_embeddings=draw(st.booleans()),
        core_output_norm=draw(st.booleans()),
        tie_word_embeddings=draw(st.booleans()),
        mean_recurrence=draw(st.integers(1, 4)),
        mean_backprop_depth=draw(st.integers(1, 3)),
        init_scale=draw(st.sampled_from([0.0, 1.0])),
    )


def perturbed(model: RecurrentDepthForCausalLM, seed: int) -> RecurrentDepthForCausalLM:
    """Norm weights and biases away from their 1 / 0 init, so that every parameter shows in the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


@SETTINGS
@given(
    fields=valid_fields(),
    num_steps=st.integers(1, 5),
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    side=st.sampled_from(["left", "right"]),
    seed=st.integers(0, 2**16),
)
def test_valid_configs_build_run_pad_and_round_trip(fields, num_steps, lengths, side, seed):
    torch.manual_seed(seed)
    model = perturbed(RecurrentDepthForCausalLM(RecurrentDepthConfig(**fields)), seed)
    vocab, width = fields["vocab_size"], max(lengths)
    rows = [torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed + n)) for n in lengths]
    ids, mask = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span], mask[i, span] = row, 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, num_steps=num_steps, init_scale=0.0).logits
        assert batch.shape == (len(rows), width, vocab) and torch.isfinite(batch).all()
        for i, row in enumerate(rows):
            alone = model(row[None], num_steps=num_steps, init_scale=0.0).logits[0]
            span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            assert (batch[i, span] - alone).abs().max() <= 1e-4 * max(1.0, alone.abs().max().item())
        torch.manual_seed(seed)
        noisy = model(ids, attention_mask=mask, num_steps=num_steps).logits  # the config's init_scale
        assert torch.isfinite(noisy).all()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert {**loaded.config.to_dict(), "_name_or_path": ""} == model.config.to_dict()
    theirs = loaded.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name
    with torch.no_grad():
        again = loaded(ids, attention_mask=mask, num_steps=num_steps, init_scale=0.0).logits
    # Weights are bit-exact; outputs agree to float32 rounding. They are not always bit-identical: a one-row input
    # takes the matrix-vector kernel, whose summation order depends on the weights' memory alignment (freshly
    # allocated tensors are 64-byte aligned, tensors loaded from safetensors 8-byte aligned): +-1 ulp.
    assert torch.allclose(again, batch, rtol=1e-5, atol=1e-6)


NOT_POSITIVE_INT = [0, -3, 2.5, "4", True, None]
NOT_NON_NEGATIVE_INT = [-1, 1.5, "1", False, None]
NOT_BOOL = ["yes", 1, 0, None]
NOT_POSITIVE_NUMBER = [0, -1e-6, math.nan, math.inf, "1e-6", None, True]
# field -> bad values; relation errors (divisibility, even head_dim, qk_bias with GQA) name the field too
BAD_VALUES = {
    "vocab_size": NOT_POSITIVE_INT,
    "hidden_size": [*NOT_POSITIVE_INT, 30],  # 30 is not divisible by 4 heads
    "num_attention_heads": [*NOT_POSITIVE_INT, 3],
    "num_key_value_heads": [0, -2, 3, 8, 1.0, "2"],
    "head_dim": [0, 3, 5, -4, 2.0],
    "intermediate_size": NOT_POSITIVE_INT,
    "n_prelude": NOT_NON_NEGATIVE_INT,
    "n_core": NOT_POSITIVE_INT,
    "n_coda": NOT_NON_NEGATIVE_INT,
    "max_position_embeddings": NOT_POSITIVE_INT,
    "rope_layout": ["interleaved", None, 1],
    "block_style": ["postnorm", None, 0],
    "injection": ["gate", None],
    "qk_bias": NOT_BOOL,
    "qkv_bias": NOT_BOOL,
    "qk_norm": NOT_BOOL,
    "adapter_bias": NOT_BOOL,
    "scale_embeddings": NOT_BOOL,
    "core_output_norm": NOT_BOOL,
    "tie_word_embeddings": NOT_BOOL,
    "rms_norm_eps": NOT_POSITIVE_NUMBER,
    "mean_recurrence": NOT_POSITIVE_INT,
    "mean_backprop_depth": NOT_POSITIVE_INT,
    "init_scale": [-1.0, math.nan, math.inf, "1", None],
    "rope_parameters": [
        [50_000.0],
        "default",
        {"rope_type": "default", "rope_theta": -1.0},
        {"rope_type": "default", "rope_theta": "1e4"},
        {"rope_type": "linear", "rope_theta": 1e4},  # no factor
        {"rope_type": "no-such-rope", "rope_theta": 1e4},
    ],
}
BAD_PAIRS = [pytest.param(f, v, id=f"{f}={v!r}") for f, values in BAD_VALUES.items() for v in values]
BASE = dict(
    vocab_size=16, hidden_size=16, num_attention_heads=4, intermediate_size=8, n_prelude=1, n_core=1, n_coda=1,
    qk_bias=False,  # so that a kv-head count of 3 meets the divisibility check, not the qk_bias one
)  # fmt: skip


def expect_error_naming(field: str):
    return pytest.raises(ValueError, match=field.replace("rope_parameters", "rope_"))


@pytest.mark.parametrize("field, value", BAD_PAIRS)
def test_every_bad_value_raises_a_value_error_naming_its_field(field, value):
    with expect_error_naming(field):
        RecurrentDepthForCausalLM(RecurrentDepthConfig(**{**BASE, field: value}))


@pytest.mark.parametrize("field, value", BAD_PAIRS)
def test_a_bad_field_assigned_later_raises(field, value):
    """Assignment (also how `from_pretrained(path, num_steps=0)` applies aliases) checks the field on its own;
    values that only break a relation between fields are caught by `validate()`, which save_pretrained runs."""
    config = RecurrentDepthConfig(**BASE)
    if not _FIELD_RULES[field][0](value) or field == "rope_parameters":  # checked whole when assigned
        with expect_error_naming(field):
            setattr(config, field, value)
        return
    setattr(config, field, value)
    with expect_error_naming(field):
        config.validate()


@SETTINGS
@given(fields=valid_fields(), data=st.data())
def test_any_valid_config_with_one_bad_field_raises_naming_it(fields, data):
    field = data.draw(st.sampled_from(sorted(BAD_VALUES)), label="field")
    value = data.draw(st.sampled_from([v for v in BAD_VALUES[field] if not _FIELD_RULES[field][0](v)]), label="value")
    with expect_error_naming(field):
        RecurrentDepthForCausalLM(RecurrentDepthConfig(**{**fields, field: value}))


def test_qk_bias_with_grouped_kv_heads_is_refused():
    """Found by the property test above: it crashed in the first forward (k has fewer heads than qk_bias)."""
    with pytest.raises(ValueError, match="qk_bias"):
        RecurrentDepthConfig(**{**BASE, "num_key_value_heads": 2, "qk_bias": True})
    RecurrentDepthConfig(**{**BASE, "num_key_value_heads": 2, "qk_bias": False})


def ids(batch=2, length=5):
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(0))


# Not covered by test_bad_inputs / test_bad_num_steps in tests/test_modeling_recurrent_depth.py; each of these used to
# fail inside torch (reshape of an empty tensor, embedding of floats, broadcast errors, cross_entropy, trunc_normal_).
BAD_CALLS = {
    "empty sequence": (lambda m: m(torch.zeros(2, 0, dtype=torch.long)), "at least one row"),
    "empty batch": (lambda m: m(torch.zeros(0, 4, dtype=torch.long)), "at least one row"),
    "float input_ids": (lambda m: m(ids().float()), "integer token ids"),
    "short attention_mask": (lambda m: m(ids(), attention_mask=torch.ones(2, 3, dtype=torch.long)), "attention_mask"),
    "attention_mask batch": (lambda m: m(ids(), attention_mask=torch.ones(3, 5, dtype=torch.long)), "attention_mask"),
    "position_ids shape": (lambda m: m(ids(), position_ids=torch.arange(3)[None]), "position_ids"),
    "1-d position_ids": (lambda m: m(ids(), position_ids=torch.arange(5)), "position_ids"),
    "inputs_embeds width": (lambda m: m(inputs_embeds=torch.randn(2, 5, 16)), "inputs_embeds"),
    "2-d inputs_embeds": (lambda m: m(inputs_embeds=torch.randn(5, 32)), "inputs_embeds"),
    "integer inputs_embeds": (lambda m: m(inputs_embeds=torch.ones(2, 5, 32, dtype=torch.long)), "inputs_embeds"),
    "labels shape": (lambda m: m(ids(), labels=torch.zeros(2, 3, dtype=torch.long)), "labels"),
    "float labels": (lambda m: m(ids(), labels=torch.zeros(2, 5)), "labels"),
    "labels beyond vocab": (lambda m: m(ids(), labels=torch.full((2, 5), 99)), "labels must lie in"),
    "infinite init_scale": (lambda m: m(ids(), init_scale=math.inf), "init_scale"),
    "foreign past_key_values": (lambda m: m(ids(), past_key_values=object()), "past_key_values"),
    "empty prompt in generate": (
        lambda m: m.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=1),
        "at least one row",
    ),
}


@pytest.mark.parametrize("call, message", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_arguments_are_refused_by_the_argument_checks(model, call, message):
    with pytest.raises((ValueError, TypeError), match=message) as error:
        call(model)
    assert error.traceback[-1].path.name == "modeling_recurrent_depth.py"  # raised by our checks, not by torch


def test_other_float_inputs_embeds_are_cast_and_valid_labels_pass(model):
    with torch.no_grad():
        double = model(inputs_embeds=model.transformer.wte(ids()).double(), num_steps=2, init_scale=0.0).logits
        single = model(ids(), num_steps=2, init_scale=0.0, labels=torch.tensor([[1, -100, 3, 4, 63]] * 2))
    assert torch.allclose(double, single.logits, atol=1e-5) and torch.isfinite(single.loss)


def test_cache_of_a_bad_type_in_generate(model):
    for name in ("past_key_values", "cache"):
        with pytest.raises(TypeError, match="must be a RecurrentCache"):
            model.generate(ids(), num_steps=2, max_new_tokens=2, **{name: [1, 2]})
    model.generate(ids(), num_steps=2, max_new_tokens=2, cache=RecurrentCache(model.config))


def test_rope_parameters_assigned_later_are_checked_whole():
    """None is allowed at construction only (Transformers fills in the defaults); later it would leave the model no
    RoPE base, and a dict without a valid rope_theta would fail in the first forward."""
    config = RecurrentDepthConfig(**BASE)
    for value in (None, {"rope_type": "default"}, {"rope_type": "default", "rope_theta": -1.0}):
        with expect_error_naming("rope_parameters"):
            config.rope_parameters = value
    config.rope_parameters = {"rope_type": "default", "rope_theta": 500.0}
    inv_freq = RecurrentDepthForCausalLM(config).transformer.rotary.inv_freq
    torch.testing.assert_close(inv_freq[1], torch.tensor(500.0 ** (-2 / config.attention_head_dim)))
