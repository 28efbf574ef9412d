"""Linear probes on the answering position's state: walk labels, the states probed, the probe, the trace option."""

import json

import pytest
import torch

from modeling_recurrent.chain_task import VARIABLES, Problem, build_tokenizer, sample_problems
from modeling_recurrent.cli import main
from modeling_recurrent.trace import record_trajectory
from modeling_recurrent.walk_probe import (
    DONE,
    answer_states,
    fit_probe,
    label_tensors,
    majority_rate,
    walk_labels,
    walk_probe,
)

from .conftest import tiny_model


def problem(statements: tuple[str, ...], values: dict[str, int], target: str) -> Problem:
    prompt = ";".join(statements) + f";?{target}="
    return Problem(prompt, str(values[target]), 0, statements, values, target, ())


def test_walk_labels_follow_the_chain_then_say_done_with_the_answer():
    one_hop = walk_labels(problem(("g=d-8", "d=0"), {"g": 2, "d": 0}, "g"), 3)
    assert one_hop.walking == (True, False, False)
    assert one_hop.pointer == (VARIABLES.index("d"), DONE, DONE)
    assert one_hop.offset == (2, 2, 2)  # g - d = 2, then the answer g = 2
    # c = b + 3, b = a - 4, a = 7: b = 3, c = 6; written in an order no statement position can resolve
    two_hops = walk_labels(problem(("c=b+3", "b=a-4", "a=7"), {"c": 6, "b": 3, "a": 7}, "c"), 4)
    assert two_hops.walking == (True, True, False, False)
    assert two_hops.pointer == (VARIABLES.index("b"), VARIABLES.index("a"), DONE, DONE)
    assert two_hops.offset == (3, 9, 6, 6)  # 6 - 3, (6 - 7) mod 10, then the answer
    literal = walk_labels(problem(("x=5",), {"x": 5}, "x"), 1)
    assert literal == type(literal)((False,), (DONE,), (5,))
    tensors = label_tensors([one_hop, walk_labels(problem(("x=5",), {"x": 5}, "x"), 3)])
    assert tensors["walking"].tolist() == [[True, False, False], [False, False, False]]
    assert tensors["offset"].tolist() == [[2, 2, 2], [5, 5, 5]]


@pytest.mark.parametrize("steps", [0, -1, True, 2.0])
def test_walk_labels_reject_bad_step_counts(steps):
    with pytest.raises(ValueError, match="num_steps must be an int >= 1"):
        walk_labels(problem(("x=5",), {"x": 5}, "x"), steps)


def test_answer_states_are_the_forward_passes_at_each_prompts_last_character():
    model, tokenizer = tiny_model(vocab_size=44), build_tokenizer()
    prompts = [p.prompt for p in sample_problems("in-distribution", 5, seed=3)]
    assert len({len(p) for p in prompts}) > 1  # padding is exercised
    batched = answer_states(model, tokenizer, prompts, 4, batch_size=3)
    assert batched.shape == (4, 5, 32)
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        traj = record_trajectory(model, ids, 4, init_scale=0.0)
        torch.testing.assert_close(batched[:, i], traj.states[1:, -1], rtol=1e-4, atol=1e-5)


def test_fit_probe_reads_a_linear_code_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (600,), generator=generator)
    codes = torch.randn(10, 24, generator=generator)
    features = 3 * codes[labels] + torch.randn(600, 24, generator=generator)
    assert fit_probe(features[:400], labels[:400], features[400:], labels[400:], 10) > 0.95
    noise = torch.randint(0, 10, (600,), generator=generator)
    assert fit_probe(features[:400], noise[:400], features[400:], noise[400:], 10) < 0.3
    assert majority_rate(torch.tensor([1, 1, 2]), torch.tensor([1, 2, 2, 2])) == 0.25
    with pytest.raises(ValueError, match="at least one training and one test row"):
        fit_probe(features[:0], labels[:0], features, labels, 10)


def test_walk_probe_reports_every_step_over_walking_and_finished_rows():
    model, tokenizer = tiny_model(vocab_size=44), build_tokenizer()
    report = walk_probe(model, tokenizer, num_steps=8, n_fit=40, n_test=20, seed=5)
    assert [row["step"] for row in report] == list(range(1, 9))
    for row in report:
        assert row["pointer"]["fit"] == row["offset"]["fit"]
        assert row["pointer"]["fit"] + row["answer"]["fit"] == 40
        assert row["pointer"]["test"] + row["answer"]["test"] == 20
        for name in ("pointer", "offset", "answer"):
            entry = row[name]
            assert (entry["accuracy"] is None) == (entry["fit"] == 0 or entry["test"] == 0)
    assert report[-1]["pointer"]["fit"] == 0  # 6 hops at most: every walk is over after 7 steps
    assert report[-1]["answer"]["accuracy"] is not None
    with pytest.raises(ValueError, match="n_fit must be an int >= 1"):
        walk_probe(model, tokenizer, n_fit=0)


def test_trace_walk_probe_writes_its_report(chain_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    options = ["--n-fit", "30", "--n-test", "10", "--num-steps", "3", "--out", str(out)]
    assert main(["trace", "--walk-probe", "--model", str(chain_model_dir), *options]) == 0
    report = json.loads((out / "walk_probe.json").read_text())
    assert (report["num_steps"], report["n_fit"], report["n_test"], report["init_scale"]) == (3, 30, 10, 0.0)
    assert len(report["steps"]) == 3
    assert "pointer" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--walk-probe", "--prompt", "a=3;?a="], "not allowed with argument"),
        ([], "one of the arguments --prompt --walk-probe is required"),
        (["--walk-probe", "--num-steps", "0"], "--num-steps must be >= 1"),
        (["--walk-probe", "--n-test", "0"], "n_test must be an int >= 1"),
        (["--walk-probe", "--every", "2"], "--walk-probe has neither"),
        (["--walk-probe", "--tokens", "1"], "--walk-probe has neither"),
        (["--prompt", "a=3;?a=", "--num-steps", "3"], "--n-fit and --n-test are options of --walk-probe"),
    ],
)
def test_trace_walk_probe_errors(chain_model_dir, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as error:
        main(["trace", "--model", str(chain_model_dir), "--out", str(tmp_path / "o"), "--n-fit", "5", *args])
    assert error.value.code == 2
    assert message in capsys.readouterr().err
