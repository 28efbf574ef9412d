"""generate() with num_steps on every decoding path, adaptive exit, warm start and speculative decoding."""

import pytest
import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteriaList,
    TextStreamer,
    pipeline,
)
from transformers.generation import MaxLengthCriteria

from modeling_recurrent import RecurrentCache
from modeling_recurrent.chain_task import build_tokenizer
from modeling_recurrent.generation_recurrent_depth import exit_criterion_for

from .conftest import tiny_model


def prompt(batch=1, length=6, seed=0):
    return torch.randint(1, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_cached_decoding_equals_full_recomputation(model, steps):
    x = prompt(2)
    out = model.generate(
        x,
        num_steps=steps,
        init_scale=0.0,
        max_new_tokens=6,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    nocache = model.generate(x, num_steps=steps, init_scale=0.0, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(out.sequences, nocache)
    with torch.no_grad():
        full = model(out.sequences, num_steps=steps, init_scale=0.0).logits
    for i, logits in enumerate(out.logits):
        assert (logits - full[:, x.shape[1] - 1 + i]).abs().max() <= 1e-5


def test_num_steps_default_comes_from_config():
    model = tiny_model(mean_recurrence=3)
    x = prompt()
    a = model.generate(x, init_scale=0.0, max_new_tokens=5, do_sample=False)
    b = model.generate(x, num_steps=3, init_scale=0.0, max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)


def test_left_padded_batch_generates_each_prompt_alone(model):
    prompts = [prompt(1, n, seed=n)[0] for n in (6, 3, 5)]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    together = model.generate(
        batch, attention_mask=mask, num_steps=4, init_scale=0.0, max_new_tokens=6, do_sample=False, pad_token_id=0
    )
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], num_steps=4, init_scale=0.0, max_new_tokens=6, do_sample=False)
        assert torch.equal(together[i, width:], alone[0, len(p) :])


def test_sampling_is_reproducible_with_a_seed(model):
    x = prompt(2)
    kwargs = dict(num_steps=3, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, min_p=0.01)
    torch.manual_seed(0)
    a = model.generate(x, **kwargs)
    torch.manual_seed(0)
    b = model.generate(x, **kwargs)
    assert torch.equal(a, b)
    torch.manual_seed(0)  # with a deterministic initial state the draws alone must change the text
    c = model.generate(x, init_scale=0.0, **kwargs)
    torch.manual_seed(1)
    assert not torch.equal(c, model.generate(x, init_scale=0.0, **kwargs))


def test_beam_search_and_return_sequences(model):
    x = prompt(2)
    beams = model.generate(
        x,
        num_steps=3,
        init_scale=0.0,
        max_new_tokens=5,
        num_beams=3,
        num_return_sequences=2,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
    )
    assert beams.sequences.shape == (4, 11)
    uncached = model.generate(x, num_steps=3, init_scale=0.0, max_new_tokens=5, num_beams=3, num_return_sequences=2,
                              do_sample=False, use_cache=False)  # fmt: skip
    assert torch.equal(beams.sequences, uncached)  # beams reorder the recurrent cache correctly
    torch.manual_seed(0)
    sampled = model.generate(x, num_steps=3, max_new_tokens=4, do_sample=True, num_return_sequences=3)
    assert sampled.shape == (6, 10)
    assert len({tuple(row.tolist()) for row in sampled[:3]}) > 1  # three samples, not three copies


class Force(LogitsProcessor):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.token] = 0.0
        return forced


def test_generation_config_processors_criteria_and_streamer(model, capsys):
    x = prompt()
    config = GenerationConfig(max_new_tokens=4, do_sample=False)
    assert model.generate(x, generation_config=config, num_steps=2, init_scale=0.0).shape == (1, 10)
    out = model.generate(
        x,
        generation_config=config,
        num_steps=2,
        init_scale=0.0,
        logits_processor=LogitsProcessorList([Force(7)]),
        stopping_criteria=StoppingCriteriaList([MaxLengthCriteria(max_length=9)]),
    )
    assert out[0, 6:].tolist() == [7, 7, 7]  # the processor decides, the criterion stops before max_new_tokens

    class Tok:
        def decode(self, ids, **kwargs):
            return "".join(f"<{i}>" for i in ids)

    streamer = TextStreamer(Tok(), skip_prompt=True)
    out = model.generate(x, num_steps=2, max_new_tokens=3, do_sample=False, streamer=streamer)
    assert capsys.readouterr().out.strip() == Tok().decode(out[0, 6:].tolist())


def test_stop_strings_stop_at_the_first_occurrence():
    tok = build_tokenizer()
    model = tiny_model(vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    x = tok("a=3;b=a+4;?b=", return_tensors="pt").input_ids
    kwargs = dict(num_steps=4, init_scale=0.0, max_new_tokens=8, do_sample=False)
    text = tok.decode(model.generate(x, **kwargs)[0, x.shape[1] :])
    stop = text[2]
    stopped = tok.decode(model.generate(x, stop_strings=[stop], tokenizer=tok, **kwargs)[0, x.shape[1] :])
    assert stopped == text[: text.index(stop) + 1] and len(stopped) < len(text)


def test_pipeline_passes_num_steps_through():
    tok = build_tokenizer()
    model = tiny_model(vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("num_steps")), with_kwargs=True)
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    text = "a=3;b=a+4;?b="
    x = tok(text, return_tensors="pt").input_ids
    for steps in (1, 5):
        seen.clear()
        out = pipe(text, num_steps=steps, init_scale=0.0, max_new_tokens=4, do_sample=False, return_full_text=False)
        direct = model.generate(x, num_steps=steps, init_scale=0.0, max_new_tokens=4, do_sample=False)
        assert out[0]["generated_text"] == tok.decode(direct[0, x.shape[1] :])
        assert seen and set(seen) == {steps}


@pytest.mark.parametrize("same_model", [True, False])
def test_assisted_decoding_equals_greedy(model, same_model):
    x = prompt(1, 5, seed=3)
    assistant = model if same_model else tiny_model(seed=1)
    calls = []
    handle = assistant.register_forward_hook(lambda *args: calls.append(1))
    greedy = model.generate(x, num_steps=4, init_scale=0.0, max_new_tokens=8, do_sample=False)
    calls.clear()
    assisted = model.generate(
        x, num_steps=4, init_scale=0.0, max_new_tokens=8, do_sample=False, assistant_model=assistant
    )
    handle.remove()
    assert torch.equal(assisted, greedy) and calls


def test_prompt_lookup_decoding_equals_greedy(model):
    x = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])
    greedy = model.generate(x, num_steps=3, init_scale=0.0, max_new_tokens=6, do_sample=False)
    lookup = model.generate(
        x, num_steps=3, init_scale=0.0, max_new_tokens=6, do_sample=False, prompt_lookup_num_tokens=3
    )
    assert torch.equal(greedy, lookup)


def test_shared_cache_slots_save_memory(model):
    x = prompt(2, 12)
    full, shared, latest = (
        RecurrentCache(model.config),
        RecurrentCache(model.config, core_slots=2),
        RecurrentCache(model.config, core_slots=1),
    )
    for cache in (full, shared, latest):
        model.generate(x, num_steps=8, init_scale=0.0, max_new_tokens=4, do_sample=False, cache=cache)
    assert full.num_core_slots == 8 and shared.num_core_slots == 2 and latest.num_core_slots == 1
    # as many shared slots as steps is the full cache: the same tokens and logits
    kwargs = dict(num_steps=8, init_scale=0.0, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                  output_logits=True)  # fmt: skip
    a = model.generate(x, **kwargs)
    b = model.generate(x, cache=RecurrentCache(model.config, core_slots=8), **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(p, q) for p, q in zip(a.logits, b.logits, strict=True))
    per_slot = full.nbytes() / (2 + 8 * 2)  # prelude + coda + core slots, all of the same size
    assert shared.nbytes() == per_slot * (2 + 2 * 2) and latest.nbytes() == per_slot * (2 + 1 * 2)


def test_warm_start_changes_the_initial_state(model):
    x = prompt()
    cold = model.generate(
        x,
        num_steps=2,
        init_scale=0.0,
        max_new_tokens=8,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    warm = model.generate(
        x,
        num_steps=2,
        init_scale=0.0,
        max_new_tokens=8,
        do_sample=False,
        warm_start=True,
        return_dict_in_generate=True,
        output_logits=True,
    )
    assert torch.equal(cold.logits[0], warm.logits[0])  # the prompt has no previous latent
    assert not torch.allclose(cold.logits[1], warm.logits[1])


def test_adaptive_exit_batch_reports_steps_and_saves_compute():
    model = tiny_model(mean_recurrence=16)
    x = prompt(3)
    out = model.generate(
        x,
        num_steps=16,
        init_scale=0.0,
        max_new_tokens=5,
        do_sample=False,
        exit_criterion="latent-diff",
        exit_threshold=0.05,
        min_steps=2,
        return_dict_in_generate=True,
    )
    steps = out.num_steps_used
    assert steps.shape == (3, 5)
    assert steps.min() >= 2 and steps.max() <= 16 and steps.float().mean() < 16
    # exiting rows run their later steps only on the remaining rows; their cache rows keep the exit step
    assert out.sequences.shape == (3, 11)


def test_kl_exit_on_easy_problems_uses_few_steps_of_the_shipped_model():
    from modeling_recurrent.demo import DEFAULT_MODEL, load

    tokenizer, model = load(str(DEFAULT_MODEL))
    enc = tokenizer(["a=3;?a=", "q=b+3;b=5;?b=", "d=0;g=d-8;?d="], return_tensors="pt", padding=True)
    out = model.generate(**enc, num_steps=32, init_scale=0.0, max_new_tokens=2, do_sample=False, exit_criterion="kl",
                         return_dict_in_generate=True)  # fmt: skip
    assert tokenizer.batch_decode(out.sequences[:, -2:]) == ["3<|endoftext|>", "5<|endoftext|>", "0<|endoftext|>"]
    assert out.num_steps_used.shape == (3, 2) and (out.num_steps_used < 32).all()


def test_warm_start_starts_from_the_previous_final_latent(model):
    x = prompt()
    warm = model.generate(x, num_steps=2, init_scale=0.0, max_new_tokens=2, do_sample=False, warm_start=True,
                          return_dict_in_generate=True, output_logits=True)  # fmt: skip
    with torch.no_grad():
        first = model(x, num_steps=2, init_scale=0.0, use_cache=True)
        token = warm.sequences[:, x.shape[1] : x.shape[1] + 1]
        second = model(token, cache=first.cache, num_steps=2, input_states=first.latent_states[:, -1:])
    assert torch.allclose(warm.logits[1], second.logits[:, -1], atol=1e-5)


@pytest.mark.parametrize("criterion", ["kl", "minp-kl", "entropy-diff", "latent-diff", "cosine", "argmax-stability"])
def test_every_exit_criterion_runs(model, criterion):
    out = model.generate(
        prompt(2),
        num_steps=12,
        init_scale=0.0,
        max_new_tokens=3,
        do_sample=False,
        exit_criterion=criterion,
        return_dict_in_generate=True,
    )
    assert out.num_steps_used.shape == (2, 3) and out.num_steps_used.max() <= 12


def test_adaptive_exit_with_huge_threshold_stops_at_min_steps(model):
    out = model.generate(
        prompt(2),
        num_steps=10,
        init_scale=0.0,
        max_new_tokens=3,
        do_sample=False,
        exit_criterion="latent-diff",
        exit_threshold=1e9,
        min_steps=3,
        return_dict_in_generate=True,
    )
    assert (out.num_steps_used == 3).all()


def test_adaptive_exit_with_zero_threshold_equals_fixed_steps(model):
    x = prompt(2)
    fixed = model.generate(x, num_steps=5, init_scale=0.0, max_new_tokens=4, do_sample=False)
    adaptive = model.generate(
        x, num_steps=5, init_scale=0.0, max_new_tokens=4, do_sample=False, exit_criterion="kl", exit_threshold=0.0
    )
    assert torch.equal(fixed, adaptive)


def test_adaptive_rows_match_each_row_alone():
    model = tiny_model(mean_recurrence=12)
    x = prompt(3)
    kwargs = dict(
        num_steps=12,
        init_scale=0.0,
        max_new_tokens=4,
        do_sample=False,
        exit_criterion="latent-diff",
        exit_threshold=0.08,
        return_dict_in_generate=True,
    )
    together = model.generate(x, **kwargs)
    for i in range(3):
        alone = model.generate(x[i : i + 1], **kwargs)
        assert torch.equal(together.sequences[i], alone.sequences[0])
        assert torch.equal(together.num_steps_used[i], alone.num_steps_used[0])


@pytest.mark.parametrize("draft_steps, draft_tokens", [(1, 3), (2, 4), (6, 2)])
def test_speculative_equals_greedy(model, draft_steps, draft_tokens):
    x = prompt(1, 5, seed=3)
    greedy = model.generate(x, num_steps=6, init_scale=0.0, max_new_tokens=10, do_sample=False)
    spec, stats = model.generate_speculative(
        x, num_steps=6, draft_steps=draft_steps, draft_tokens=draft_tokens, max_new_tokens=10, init_scale=0.0
    )
    assert torch.equal(spec, greedy)
    assert 0 < stats["accepted"] <= stats["drafted"]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(exit_criterion="nope"), ValueError, "exit_criterion must be one of"),
        (dict(exit_criterion="kl", exit_threshold="0.1"), TypeError, "exit_threshold"),
        (dict(exit_criterion="argmax-stability", exit_threshold=2.5), TypeError, "exit_threshold"),
        (dict(exit_criterion="kl", min_steps=9), ValueError, "below min_steps"),
        (dict(exit_threshold=0.1), ValueError, "only apply with an exit_criterion"),
        (dict(warm_start="yes"), TypeError, "warm_start"),
    ],
)
def test_bad_generation_options(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        model.generate(prompt(), num_steps=4, max_new_tokens=2, **kwargs)


@pytest.mark.parametrize(
    "name, min_steps, training, has_head, error, match",
    [
        ("kl", 0, True, True, ValueError, "inference option"),
        ("kl", 1.5, False, True, TypeError, "min_steps must be an int"),
        ("kl", -1, False, True, TypeError, "min_steps must be an int"),
        ("kl", 0, False, False, ValueError, "reads logits"),
        (None, 2, False, True, ValueError, "only apply with"),
    ],
)
def test_exit_arguments_are_checked_together(name, min_steps, training, has_head, error, match):
    with pytest.raises(error, match=match):
        exit_criterion_for(name, None, min_steps, 4, training=training, has_head=has_head)
    assert exit_criterion_for(None, None, 0, 4, training=True, has_head=False) is None
    assert exit_criterion_for("kl", None, 4, 4, training=False, has_head=True).needs_logits


def test_cache_of_another_model_or_batch_is_refused(model):
    other = tiny_model(n_core=3)
    cache = RecurrentCache(other.config)
    with pytest.raises(ValueError, match="built for"):
        model(prompt(), past_key_values=cache)
    cache = RecurrentCache(model.config)
    model(prompt(2), past_key_values=cache, num_steps=2)
    with pytest.raises(ValueError, match="batch size"):
        model(prompt(3), past_key_values=cache, num_steps=2)
    with pytest.raises(ValueError, match="core_slots"):
        RecurrentCache(model.config, core_slots=0)


def test_speculative_bad_input(model):
    with pytest.raises(ValueError, match="one sequence"):
        model.generate_speculative(prompt(2))
    with pytest.raises(ValueError, match="draft_tokens"):
        model.generate_speculative(prompt(), draft_tokens=0)
