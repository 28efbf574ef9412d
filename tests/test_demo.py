"""`recurrent-depth demo` on the shipped chain model: end to end with a small --n, batching, and bad input."""

import json

import pytest

from modeling_recurrent.chain_task import sample_problems
from modeling_recurrent.cli import main
from modeling_recurrent.demo import DEFAULT_MODEL, answer, load


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "new" / "demo"
    assert main(["demo", "--n", "6", "--steps", "1,4", "--batch-size", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "in-dist" in printed and "MFLOP/tok" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["results"]) == {"in-distribution", "harder"}
    assert set(results["results"]["harder"]) == {"1", "4"}
    assert all(0 <= v["accuracy"] <= 1 for split in results["results"].values() for v in split.values())
    assert results["flops_per_token"]["1"] < results["flops_per_token"]["4"]
    assert (out / "accuracy_vs_steps.png").stat().st_size > 1000


def test_left_padded_batches_answer_as_single_prompts():
    tokenizer, model = load(str(DEFAULT_MODEL))
    model.config.init_scale = 0.0  # deterministic initial state, so only padding could change an answer
    prompts = [p.prompt for p in sample_problems("in-distribution", 8, seed=5)]
    assert len({len(p) for p in prompts}) > 1  # the batch really is padded
    assert answer(model, tokenizer, prompts, 4, batch_size=8) == answer(model, tokenizer, prompts, 4, batch_size=1)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0,4"], "--steps must be positive"),
        (["--steps", "x"], "--steps must be comma-separated integers"),
        (["--n", "0"], "--n must be >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_input_is_named(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as error:
        main(["demo", "--out", str(tmp_path / "o"), *argv])
    assert error.value.code == 2 and message in capsys.readouterr().err


def test_model_folder_without_tokenizer(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text((DEFAULT_MODEL / "config.json").read_text())
    with pytest.raises(SystemExit):
        main(["demo", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")])
    assert "no tokenizer files" in capsys.readouterr().err


def test_examples_show_what_depth_buys_first(capsys):
    from modeling_recurrent.demo import print_examples

    problems = sample_problems("in-distribution", 6, seed=3)
    deepest = max(range(6), key=lambda i: problems[i].hops)
    gained = min((i for i in range(6) if i != deepest), key=lambda i: problems[i].hops)
    low = ["x"] * 6
    high = [p.answer if problems[i].hops == problems[gained].hops else "x" for i, p in enumerate(problems)]
    print_examples(problems, {("in-distribution", 1): low, ("in-distribution", 8): high}, [1, 8], count=2)
    lines = capsys.readouterr().out.strip().splitlines()[1:]
    # A problem 8 steps answer and 1 step does not comes first, however shallow; then the deepest.
    assert [line.split()[0] for line in lines] == [problems[gained].prompt, problems[deepest].prompt]


def test_examples_skip_lucky_answers_at_hop_counts_the_model_does_not_solve(capsys):
    from modeling_recurrent.demo import print_examples

    solved = sample_problems("in-distribution", 2, seed=3, hops=1)
    unsolved = sample_problems("in-distribution", 3, seed=4, hops=5)
    problems = unsolved + solved
    # 8 steps answer both 1-hop problems and, by luck, the first of the three 5-hop ones (1/3 < 0.5)
    high = [unsolved[0].answer, "x", "x", solved[0].answer, solved[1].answer]
    print_examples(problems, {("in-distribution", 1): ["x"] * 5, ("in-distribution", 8): high}, [1, 8], count=3)
    lines = capsys.readouterr().out.strip().splitlines()[1:]
    assert [line.split()[0] for line in lines] == [solved[0].prompt, solved[1].prompt, unsolved[0].prompt]
