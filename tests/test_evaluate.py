"""lm-eval integration: the shipped chain tasks, `lm_eval --model hf` across num_steps and batch sizes, the sweep."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCardData

from modeling_recurrent import cli
from modeling_recurrent.chain_task import build_tokenizer
from modeling_recurrent.convert import lm_eval_to_eval_results, upload_files
from modeling_recurrent.evaluate import (
    CHAIN_TASK_DATA,
    CHAIN_TASK_DIR,
    TASK_PATH,
    StepTally,
    add_arguments,
    check_args,
    write_chain_task_data,
)
from tests.conftest import tiny_model

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TASKS = ("chain_mc", "chain_gen", "chain_mc_harder", "chain_gen_harder")


def chain_model(seed: int = 0):
    """A tiny random model over the chain tokenizer's ids."""
    tokenizer = build_tokenizer()
    model = tiny_model(seed, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    return model, tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("chain-model")
    model, tokenizer = chain_model()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_shipped_task_data_is_up_to_date(tmp_path):
    written = write_chain_task_data(tmp_path)
    assert [p.name for p in written] == [f"{name}.jsonl" for name in CHAIN_TASK_DATA]
    for path in written:
        shipped = CHAIN_TASK_DIR / path.name
        assert shipped.read_bytes() == path.read_bytes(), f"{shipped} is stale: rerun write_chain_task_data()"
    size = sum(p.stat().st_size for p in TASK_PATH.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert size < 200_000


def test_task_data_is_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("chain_utils", CHAIN_TASK_DIR / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    for loader, (split, n, _) in (
        (utils.in_distribution, CHAIN_TASK_DATA["in_distribution"]),
        (utils.harder, CHAIN_TASK_DATA["harder"]),
    ):
        rows = loader(pretrained="ignored")["test"]
        assert len(rows) == n
        assert all(row["prompt"].endswith("=") and row["answer"] == str(row["label"]) for row in rows)
        assert {row["hops"] for row in rows} <= set(range(11)), split


def test_lm_eval_reads_the_shipped_tasks(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)
    tasks = TaskManager(include_path=str(TASK_PATH), include_defaults=False).load(list(TASKS))["tasks"]
    assert sorted(tasks) == sorted(TASKS)
    mc, gen = tasks["chain_mc"], tasks["chain_gen"]
    doc = next(iter(mc.test_docs()))
    assert mc.OUTPUT_TYPE == "multiple_choice" and gen.OUTPUT_TYPE == "generate_until"
    assert mc.doc_to_choice(doc) == [str(d) for d in range(10)] and mc.doc_to_target(doc) == doc["label"]
    assert mc.config.target_delimiter == "" and gen.doc_to_text(doc) == doc["prompt"]
    harder = next(iter(tasks["chain_mc_harder"].test_docs()))
    assert harder["hops"] >= 7 and doc["hops"] <= 6


def test_print_task_path(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["eval", "--print-task-path"]) == 0
    printed = Path(capsys.readouterr().out.strip())
    assert printed == TASK_PATH and (printed / "chain" / "chain_mc.yaml").is_file()


@pytest.mark.parametrize(
    ("argv", "error", "message"),
    [
        (["--num-steps", "0"], ValueError, "positive"),
        (["--num-steps", "4,-1"], ValueError, "positive"),
        (["--num-steps", "four"], ValueError, "integers"),
        (["--exit-criterion", "nope"], ValueError, "must be one of"),
        (["--exit-threshold", "0.1"], ValueError, "need an --exit-criterion"),
        (["--init-scale", "-1"], ValueError, "init-scale"),
        (["--batch-size", "0"], ValueError, "batch-size"),
        (["--model", "/does/not/exist"], FileNotFoundError, "not a model folder"),
        (["--tasks", " , "], ValueError, "at least one"),
        (["--exit-criterion", "argmax-stability", "--exit-threshold", "2.5"], ValueError, "exit-threshold.*int"),
        (["--exit-criterion", "kl", "--exit-threshold", "-1"], ValueError, "exit-threshold.*>= 0"),
        (["--exit-criterion", "kl", "--min-steps", "-1"], ValueError, "min-steps"),
        (["--exit-criterion", "kl", "--num-steps", "4,16", "--min-steps", "5"], ValueError, "min-steps.*4"),
    ],
)
def test_bad_input(model_dir, argv, error, message):
    with pytest.raises(error, match=message):
        check_args(parse(["--model", str(model_dir), *argv]))


def test_argmax_stability_takes_an_integer_threshold(model_dir):
    args = parse(["--model", str(model_dir), "--exit-criterion", "argmax-stability", "--exit-threshold", "3"])
    check_args(args)
    assert args.exit_threshold == 3 and isinstance(args.exit_threshold, int)


def test_cli_reports_bad_input(model_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--model", str(model_dir), "--num-steps", "0"])
    assert exit_info.value.code == 2 and "--num-steps must be positive" in capsys.readouterr().err


def test_step_tally_reads_steps_used():
    model, tokenizer = chain_model()
    tally = StepTally()
    model.register_forward_hook(tally.record, with_kwargs=True)
    prompts = ["a=1;?a=", "b=2;c=b+1;?c=", "q=3;?q=", "x=2;y=x+4;z=y-1;?z="]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = model(**enc, num_steps=6, init_scale=0.0, exit_criterion="latent-diff", exit_threshold=0.6)
    lengths = enc.attention_mask.sum(1).float()
    assert len(set(out.steps_used.tolist())) > 1  # rows exit at different steps
    summary = tally.summary()
    assert summary["avg_steps_per_token"] == pytest.approx(float((lengths * out.steps_used).sum() / lengths.sum()))
    assert summary["avg_context"] == pytest.approx(float((lengths * (lengths + 1) / 2).sum() / lengths.sum()))


def lm_eval_cli(model_dir: Path, out: Path, model_args: str, batch_size: int) -> dict:
    """Run the lm_eval CLI on both chain task types; metrics and per-sample responses."""
    cmd = [
        sys.executable, "-m", "lm_eval", "run", "--model", "hf",
        "--model_args", f"pretrained={model_dir},trust_remote_code=True,{model_args}",
        "--tasks", "chain_mc,chain_gen", "--include_path", str(TASK_PATH), "--limit", "12",
        "--batch_size", str(batch_size), "--device", "cpu", "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=out.parent, env={**os.environ, **OFFLINE}, capture_output=True)
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    samples = {
        task: [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]
        for task in ("chain_mc", "chain_gen")
    }
    return {
        "metrics": {t: results[t][k] for t, k in (("chain_mc", "acc,none"), ("chain_gen", "exact_match,first-char"))},
        "loglikelihoods": torch.tensor([[float(r[0][0]) for r in s["resps"]] for s in samples["chain_mc"]]),
        "generations": [s["resps"][0][0] for s in samples["chain_gen"]],
    }


@pytest.mark.slow
def test_lm_eval_cli_num_steps_and_batch_size(model_dir, tmp_path):
    one = lm_eval_cli(model_dir, tmp_path / "r1", "num_steps=1,init_scale=0", batch_size=1)
    six = lm_eval_cli(model_dir, tmp_path / "r6", "num_steps=6,init_scale=0", batch_size=1)
    # The published spelling, batched: right-padded loglikelihood batches and left-padded generate_until batches.
    six_b8 = lm_eval_cli(model_dir, tmp_path / "r6b8", "mean_recurrence=6,init_scale=0.0", batch_size=8)

    assert not torch.allclose(one["loglikelihoods"], six["loglikelihoods"], atol=1e-3)
    assert one["generations"] != six["generations"]
    assert six_b8["metrics"] == six["metrics"]
    torch.testing.assert_close(six_b8["loglikelihoods"], six["loglikelihoods"], atol=1e-4, rtol=1e-4)
    assert six_b8["generations"] == six["generations"]


@pytest.mark.slow
def test_sweep_writes_json_plot_and_card_entries(model_dir, tmp_path, capsys):
    common = ["eval", "--model", str(model_dir), "--tasks", "chain_mc,chain_gen", "--limit", "4"]
    common += ["--init-scale", "0", "--batch-size", "4", "--device", "cpu"]
    assert cli.main([*common, "--num-steps", "1,3", "--out", str(tmp_path / "fixed")]) == 0
    assert cli.main([*common, "--num-steps", "6", "--exit-criterion", "latent-diff", "--exit-threshold", "0.6",
                     "--out", str(tmp_path / "exit")]) == 0  # fmt: skip
    assert "num_steps=3" in capsys.readouterr().out

    fixed = json.loads((tmp_path / "fixed" / "results.json").read_text())
    assert (tmp_path / "fixed" / "metric_vs_compute.png").stat().st_size > 1000
    assert [s["num_steps"] for s in fixed["settings"]] == [1, 3]
    assert [s["avg_steps_per_token"] for s in fixed["settings"]] == [1.0, 3.0]
    assert fixed["settings"][0]["flops_per_token"] < fixed["settings"][1]["flops_per_token"]
    assert set(fixed["settings"][0]["results"]) == {"chain_mc", "chain_gen"}
    (adaptive,) = json.loads((tmp_path / "exit" / "results.json").read_text())["settings"]
    assert adaptive["exit_criterion"] == "latent-diff" and 1 <= adaptive["avg_steps_per_token"] < 6

    entries = lm_eval_to_eval_results(tmp_path / "fixed" / "results.json")
    assert len(entries) == 4  # 2 settings x 2 tasks, one metric each
    assert {e.metric_name for e in entries} >= {"acc, num_steps=1", "exact_match (first-char), num_steps=3"}
    assert all(e.metric_args["num_steps"] in (1, 3) and e.source_name == "lm-evaluation-harness" for e in entries)
    assert "model-index" in ModelCardData(model_name="chain-tiny", eval_results=entries).to_dict()
    # the upload command takes the sweep's JSON for the card
    card = upload_files(model_dir, "me/chain", eval_results=tmp_path / "fixed" / "results.json")["README.md"]
    assert "acc, num_steps=3" in card.decode() and "model-index" in card.decode()


@pytest.mark.parametrize("data", [{"results": []}, {"settings": []}, {"settings": [{"label": "x"}]}, {"other": 1}])
def test_card_entries_reject_other_json(tmp_path, data):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="results"):
        lm_eval_to_eval_results(path)
