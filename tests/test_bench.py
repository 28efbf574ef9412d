"""The benchmark command end to end in its smallest mode (no timing is asserted)."""

import json

import pytest
import torch

from modeling_recurrent import RecurrentDepthForCausalLM
from modeling_recurrent.chain_task import build_tokenizer
from modeling_recurrent.cli import main

from .conftest import tiny_config


@pytest.fixture(scope="module")
def chain_folder(tmp_path_factory):
    """A random model with the chain task's tokenizer: enough to run the bench's chain measurements."""
    tokenizer = build_tokenizer()
    folder = tmp_path_factory.mktemp("chain")
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    RecurrentDepthForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_quick_bench_writes_every_ratio(tmp_path, chain_folder):
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:  # one thread: tiny kernels on a busy machine are faster without OpenMP barriers
        assert main(["bench", "--quick", "--threads", "1", "--out", str(out), "--chain-model", str(chain_folder)]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    assert report["settings"]["presets"] == ["quick"] and report["settings"]["threads"] == 1
    metrics = {row["metric"] for row in report["rows"]}
    assert {
        "prefill",
        "decode",
        "generate",
        "train step",
        "kv bytes",
        "peak memory",
        "kv sharing 4 slots",
        "decode static",
        "static vs dynamic",
        "adaptive exit",
    } <= metrics
    for row in report["rows"]:
        assert row["ratio"] > 0 and row["ours"] > 0 and row["baseline"] > 0, row
        assert set(row) >= {"preset", "case", "unit", "target", "met", "meaning"}
    decode_cases = {row["case"] for row in report["rows"] if row["metric"] == "decode"}
    assert decode_cases == {"context 16, batch 1", "context 16, batch 2"}
    chain = report["chain"]
    assert set(chain["adaptive_exit"]) == {"fixed", "kl"}
    assert chain["adaptive_exit"]["fixed"]["mean_steps"] == chain["num_steps"]
    assert [r["core_slots"] for r in chain["kv_sharing"]] == [None, 1, 2, 4]
    assert all(r["cache_bytes"] > 0 and r["loss"] > 0 for r in chain["kv_sharing"])


def test_bench_skips_the_chain_part_without_a_model(tmp_path):
    from modeling_recurrent.bench import bench_chain

    rows = []
    assert "skipped" in bench_chain(tmp_path / "missing", 2, rows) and rows == []


def test_bench_refuses_unknown_presets(tmp_path):
    with pytest.raises(SystemExit):
        main(["bench", "--preset", "huge", "--out", str(tmp_path / "b.json")])


@pytest.mark.parametrize("option", ["--chain-problems", "--threads", "--repeats"])
def test_bad_counts_fail_before_any_measurement(tmp_path, capsys, option):
    with pytest.raises(SystemExit):
        main(["bench", "--preset", "tiny", option, "0", "--out", str(tmp_path / "b.json")])
    assert f"{option} must be >= 1" in capsys.readouterr().err
