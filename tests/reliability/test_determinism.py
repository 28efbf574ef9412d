"""Determinism beyond what tests/test_generation_recurrent_depth.py and tests/test_modeling_recurrent_depth.py show
(seeded sampling, seeded state init, padded batch vs alone, cache vs no cache, each on its own): the combinations,
adaptive exit with a random state, and identical results in a fresh interpreter."""

import subprocess
import sys
import textwrap

import pytest
import torch

from ..conftest import ROOT, tiny_model

PROMPTS = [[5, 9, 3], [7, 1, 4, 4, 2, 8, 6, 3, 2], [11, 12], [3, 3, 3, 3, 3, 3]]


def left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :], mask[row, width - len(p) :] = torch.tensor(p), 1
    return ids, mask


def test_zero_state_greedy_is_identical_alone_batched_cached_and_uncached():
    model = tiny_model(mean_recurrence=4)
    ids, mask = left_padded(PROMPTS)
    kwargs = dict(init_scale=0.0, max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, attention_mask=mask, **kwargs)
    uncached = model.generate(ids, attention_mask=mask, use_cache=False, **kwargs)
    assert torch.equal(model.generate(ids, attention_mask=mask, **kwargs), cached)  # and across runs
    width = ids.shape[1]
    for row, p in enumerate(PROMPTS):
        alone = model.generate(torch.tensor([p]), **kwargs)[0, len(p) :]
        assert torch.equal(cached[row, width:], alone)
        assert torch.equal(uncached[row, width:], alone)


def test_zero_state_logits_agree_across_batch_and_cache():
    """Not only the argmax: the next-token logits of a row alone and in a padded batch agree to float32 precision."""
    model = tiny_model()
    ids, mask = left_padded(PROMPTS)
    out = model.generate(
        ids, attention_mask=mask, num_steps=5, init_scale=0.0, max_new_tokens=4, do_sample=False, pad_token_id=0,
        return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    for row, p in enumerate(PROMPTS):
        alone = model.generate(
            torch.tensor([p]), num_steps=5, init_scale=0.0, max_new_tokens=4, do_sample=False, use_cache=False,
            return_dict_in_generate=True, output_logits=True,
        )  # fmt: skip
        for step in range(4):
            assert (out.logits[step][row] - alone.logits[step][0]).abs().max() < 1e-5


def test_seeded_adaptive_exit_with_random_state_reproduces():
    model = tiny_model(mean_recurrence=12)
    ids, mask = left_padded(PROMPTS)
    kwargs = dict(
        attention_mask=mask, init_scale=1.0, max_new_tokens=4, do_sample=True, temperature=0.9, pad_token_id=0,
        exit_criterion="latent-diff", exit_threshold=0.05, return_dict_in_generate=True,
    )  # fmt: skip
    results = []
    for _ in range(2):
        torch.manual_seed(123)
        results.append(model.generate(ids, **kwargs))
    assert torch.equal(results[0].sequences, results[1].sequences)
    assert torch.equal(results[0].num_steps_used, results[1].num_steps_used)
    torch.manual_seed(124)
    other = model.generate(ids, **kwargs)
    assert not torch.equal(other.sequences, results[0].sequences)


@pytest.mark.slow  # a fresh interpreter importing torch and transformers takes several seconds here
def test_results_are_identical_in_a_fresh_interpreter(tmp_path):
    """Greedy (zero state) and seeded sampling (random state) give the same tokens in another process."""
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, sys.argv[1])
        from tests.conftest import tiny_model
        model = tiny_model()
        x = torch.tensor([[5, 9, 3, 7, 1], [2, 8, 6, 3, 2]])
        greedy = model.generate(x, num_steps=6, init_scale=0.0, max_new_tokens=8, do_sample=False)
        torch.manual_seed(7)
        sampled = model.generate(x, num_steps=6, max_new_tokens=8, do_sample=True, top_k=20)
        torch.save({"greedy": greedy, "sampled": sampled}, sys.argv[2])
    """)
    outputs = []
    for run in range(2):
        path = tmp_path / f"run{run}.pt"
        result = subprocess.run(
            [sys.executable, "-c", script, str(ROOT), str(path)], capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-2000:]
        outputs.append(torch.load(path))
    assert torch.equal(outputs[0]["greedy"], outputs[1]["greedy"])
    assert torch.equal(outputs[0]["sampled"], outputs[1]["sampled"])
    # and this process agrees with both
    model = tiny_model()
    x = torch.tensor([[5, 9, 3, 7, 1], [2, 8, 6, 3, 2]])
    assert torch.equal(model.generate(x, num_steps=6, init_scale=0.0, max_new_tokens=8, do_sample=False),
                       outputs[0]["greedy"])  # fmt: skip
    torch.manual_seed(7)
    assert torch.equal(model.generate(x, num_steps=6, max_new_tokens=8, do_sample=True, top_k=20),
                       outputs[0]["sampled"])  # fmt: skip
