"""Variable-depth training: the loss falls, runs resume and data-parallel runs follow the same curve."""

import argparse
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from modeling_recurrent.chain_training import paced_labels
from modeling_recurrent.cli import main
from modeling_recurrent.train import Trainer
from modeling_recurrent.train_args import TrainArgs, add_arguments, args_from_namespace

TINY = [
    "--config",
    "tiny",
    "--set",
    "vocab_size=44",
    "--set",
    "hidden_size=32",
    "--set",
    "mean_recurrence=3",
    "--set",
    "mean_backprop_depth=2",
]


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def train_args(out, steps: int, *extra: str) -> list[str]:
    """`recurrent-depth train` arguments of a tiny chain run (later options override earlier ones)."""
    return [
        "train",
        "--data",
        "chain",
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--batch-size",
        "8",
        "--eval-every",
        "1000",
        "--save-every",
        "2",
        "--warmup",
        "1",
        "--lr",
        "3e-3",
        *TINY,
        *extra,
    ]


def train(out, *extra, steps=6):
    assert main(train_args(out, steps, *extra)) == 0


def tiny_trainer(tmp_path, options: str) -> Trainer:
    """The Trainer `recurrent-depth train` builds for a tiny chain run (batch 4, width 32) with these options."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--out", str(tmp_path), "--config", "tiny", "--batch-size", "4", "--set", "hidden_size=32"]
    return Trainer(args_from_namespace(parser.parse_args([*base, *shlex.split(options)])))


def test_a_few_steps_lower_the_loss(tmp_path):
    args = TrainArgs(
        out=str(tmp_path),
        config="tiny",
        steps=40,
        batch_size=16,
        lr=3e-3,
        warmup=2,
        eval_every=20,
        eval_samples=16,
        eval_steps=[1, 3],
        save_every=100,
        chain_curriculum=False,
        config_overrides={"mean_recurrence": 3, "mean_backprop_depth": 2},
    )
    trainer = Trainer(args)
    final = trainer.run()
    curve = [r["loss"] for r in trainer.history]
    assert sum(curve[-8:]) / 8 < sum(curve[:8]) / 8 - 0.3
    assert "acc@3" in trainer.history[19]["eval"]
    assert (final / "config.json").is_file() and (final / "tokenizer.json").is_file()


def test_resume_after_a_crash_continues_the_same_curve(tmp_path, monkeypatch):
    train(tmp_path / "straight", steps=6)
    original = Trainer.train_step

    def crash_in_step_six(self, batch):  # steps 1-5 logged, the last checkpoint at step 4: step 5 is redone
        if self.step == 5:
            raise KeyboardInterrupt("simulated crash")
        return original(self, batch)

    monkeypatch.setattr(Trainer, "train_step", crash_in_step_six)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "resumed", steps=6)
    monkeypatch.setattr(Trainer, "train_step", original)
    train(tmp_path / "resumed", steps=6)
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "straight"), rel=1e-5)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_text_data_with_loss_on_every_token(tmp_path):
    from modeling_recurrent.chain_task import build_tokenizer, sample_problems

    build_tokenizer().save_pretrained(tmp_path / "tok")
    (tmp_path / "data.jsonl").write_text(
        "\n".join(json.dumps({"text": p.prompt + p.answer}) for p in sample_problems("in-distribution", 60, 0))
    )
    train(
        tmp_path / "run",
        "--data",
        str(tmp_path / "data.jsonl"),
        "--tokenizer",
        str(tmp_path / "tok"),
        "--seq-len",
        "32",
        steps=3,
    )
    assert len(losses(tmp_path / "run")) == 3


def test_text_batches_supervise_every_token_of_distinct_blocks():
    from modeling_recurrent.train import text_batch

    blocks = torch.arange(40).view(5, 8)
    batch = text_batch(blocks, 3, seed=0, step=1)
    assert torch.equal(batch["labels"], batch["input_ids"]) and batch["attention_mask"].all()
    rows = {tuple(row.tolist()) for row in batch["input_ids"]}
    assert len(rows) == 3 and rows <= {tuple(row.tolist()) for row in blocks}
    assert torch.equal(text_batch(blocks, 3, seed=0, step=1)["input_ids"], batch["input_ids"])


def torchrun(out, steps: int, *extra: str, port: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        "-m",
        "modeling_recurrent.cli",
        *train_args(out, steps, "--eval-every", "3", "--eval-samples", "8", *extra),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def evaluations(out) -> list[dict]:
    return [r["eval"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "eval" in r]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sharding", "objective", "port"),
    [
        ([], [], 29533),
        (["--fsdp"], [], 29537),
        ([], ["--deep-supervision", "--chain-paced", "--chain-paced-offsets", "0.5"], 29535),
    ],
    ids=["ddp", "fsdp", "ddp-deep-supervision"],
)
def test_torchrun_two_processes_match_one(tmp_path, sharding, objective, port):
    # Both runs stop at step 3 and resume (same schedule): a sharded optimizer state must come back whole.
    for steps in (3, 5):
        train(tmp_path / "one", "--eval-every", "3", "--eval-samples", "8", *objective, steps=steps)
    torchrun(tmp_path / "two", 3, *sharding, *objective, port=port)
    torchrun(tmp_path / "two", 5, *sharding, *objective, port=port + 1)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    assert evaluations(tmp_path / "two") == evaluations(tmp_path / "one")
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if not p.name.startswith(".")) == [
        "checkpoint-last",
        "final",
        "log.jsonl",
    ]
    one, two = (AutoModelForCausalLM.from_pretrained(tmp_path / name / "final") for name in ("one", "two"))
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_bad_options(tmp_path):
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path), "--config", "tiny", "--eval-steps", "0,2"])
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path), "--config", "nope"])
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path), "--config", "tiny", "--data", str(tmp_path / "missing.jsonl")])
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path), "--config", "tiny", "--bogus"])
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path), "--config", "tiny", "--chain-literal-operands", "1.5"])


def test_bad_values_on_the_command_line_exit_with_the_message(tmp_path, capsys):
    for extra in (["--eval-every", "0"], ["--eval-steps", "1,x"], ["--lr", "-1"]):
        with pytest.raises(SystemExit):
            main(["train", "--out", str(tmp_path), "--config", "tiny", *extra])
        assert extra[0] in capsys.readouterr().err


def test_mean_recurrence_sets_the_training_depth_and_min_lr_ratio_the_final_rate(tmp_path, monkeypatch):
    import modeling_recurrent.train as train_module

    means = []
    original = train_module.sample_num_steps

    def recording(mean, *rest):
        means.append(mean)
        return original(mean, *rest)

    monkeypatch.setattr(train_module, "sample_num_steps", recording)
    trainer = Trainer(
        TrainArgs(
            out=str(tmp_path),
            config="tiny",
            steps=3,
            batch_size=2,
            warmup=0,
            lr=1e-3,
            min_lr_ratio=0.25,
            mean_recurrence=2,
            eval_every=100,
            save_every=100,
            config_overrides={"vocab_size": 44, "hidden_size": 32, "mean_backprop_depth": 1},
        )
    )
    trainer.run()
    assert means == [2, 2, 2]
    assert trainer.history[-1]["lr"] == pytest.approx(0.25e-3)


def test_history_table_lists_each_evaluation_with_the_loss_before_it():
    from modeling_recurrent.train import history_table

    history = [{"step": s, "loss": float(s)} for s in range(1, 5)]
    history[3]["eval"] = {"acc@1": {"accuracy": 0.5, "by_hops": {"1": 0.25, "0": 0.75}}}
    history[3]["curriculum_hops"] = 1
    lines = history_table(history, window=2).splitlines()
    assert lines[0] == "| step | hops | loss | acc@1 |"
    assert lines[2] == "| 4 | 1 | 3.500 | 0.50 (0:0.75 1:0.25) |"
    assert len(lines) == 3


def test_frontier_weight_draws_the_most_hops_more_often(tmp_path):
    from modeling_recurrent.chain_training import ChainBatches, ChainOptions

    def trainer(weight):
        t = Trainer(
            TrainArgs(
                out=str(tmp_path / str(weight)),
                config="tiny",
                batch_size=4,
                chain_frontier_weight=weight,
                config_overrides={"vocab_size": 44, "hidden_size": 32},
            )
        )
        t.curriculum_hops = 2
        return t

    uniform, weighted = trainer(1), trainer(3.0)
    expected = ChainBatches(uniform.tokenizer, 0, 4, (0, 2), ChainOptions(n_repeats=2)).batch(0)
    assert all(torch.equal(uniform.global_batch()[k], expected[k]) for k in expected)  # 1: the uniform stream
    weighted.global_batch()
    assert weighted._chain.hop_weights == [1.0, 1.0, 3.0]
    with pytest.raises(ValueError, match="--chain-frontier-weight"):
        TrainArgs(out="x", chain_frontier_weight=0)


def test_statement_values_option_reaches_the_data(tmp_path):
    from modeling_recurrent.chain_training import ChainBatches, ChainOptions

    trainer = tiny_trainer(tmp_path, "--chain-statement-values")
    expected = ChainBatches(trainer.tokenizer, 0, 4, (0, 1), ChainOptions(n_repeats=2, statement_values=True)).batch(0)
    assert all(torch.equal(trainer.global_batch()[k], expected[k]) for k in expected)


@pytest.mark.parametrize(("option", "field"), [("--chain-backward", "backward"), ("--chain-forward", "forward")])
def test_order_options_reach_the_data(tmp_path, option, field):
    from modeling_recurrent.chain_training import ChainBatches, ChainOptions

    trainer = tiny_trainer(tmp_path, f"{option} 0.5")
    expected = ChainBatches(trainer.tokenizer, 0, 4, (0, 1), ChainOptions(n_repeats=2, **{field: 0.5})).batch(0)
    assert all(torch.equal(trainer.global_batch()[k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match=option):
        TrainArgs(out="x", **{f"chain_{field}": 2})
    with pytest.raises(ValueError, match="--chain-backward \\+ --chain-forward must be <= 1"):
        TrainArgs(out="x", chain_backward=0.5, chain_forward=0.6)


def test_paced_option_labels_each_step_for_the_depth_it_drew(tmp_path):
    from modeling_recurrent.chain_training import ChainBatches, ChainOptions, paced_labels

    trainer = tiny_trainer(tmp_path, "--set mean_backprop_depth=1 --mean-recurrence 2 --chain-paced")
    expected = ChainBatches(trainer.tokenizer, 0, 4, (0, 1), ChainOptions(n_repeats=2, paced=True)).batch(0)
    batch = trainer.global_batch()
    assert all(torch.equal(batch[k], expected[k]) for k in expected) and "chase_labels" in batch
    seen = []
    forward = trainer.ddp

    def recording(**kwargs):
        seen.append((kwargs["labels"], sum(kwargs["num_steps"])))
        return forward(**kwargs)

    trainer.ddp = recording
    trainer.train_step(batch)
    labels, depth = seen[0]
    assert "chase_labels" in batch  # the caller's batch is left as it was
    assert torch.equal(labels, paced_labels(batch["labels"], batch["chase_labels"], depth))
    with pytest.raises(ValueError, match="--chain-paced-offsets.*--chain-paced"):
        TrainArgs(out="x", chain_paced_offsets=0.5)
    with pytest.raises(ValueError, match="--chain-paced-offsets"):
        TrainArgs(out="x", chain_paced=True, chain_paced_offsets=-1)


def test_deep_supervision_averages_the_paced_loss_of_every_step_with_gradient(tmp_path):
    trainer = tiny_trainer(
        tmp_path, "--set mean_backprop_depth=3 --chain-paced --chain-paced-offsets 0.5 --deep-supervision --warmup 0"
    )
    batch = trainer.global_batch()
    model = trainer.model
    chase, states = batch["chase_labels"], trainer._initial_states(batch)
    plain = {k: v for k, v in batch.items() if k != "chase_labels"}
    count = (batch["labels"][:, 1:] != -100).sum().float()
    for steps in ((0, 1), (0, 3), (2, 2)):  # every step under gradient, and two steps before it without
        loss = trainer.ddp(**plain, num_steps=steps, input_states=states, num_items_in_batch=count, chase_labels=chase)
        with torch.no_grad():
            expected = [
                model(
                    **dict(plain, labels=paced_labels(batch["labels"], chase, depth)),
                    num_steps=depth,
                    input_states=states,
                    num_items_in_batch=count,
                ).loss
                for depth in range(steps[0] + 1, sum(steps) + 1)
            ]
        torch.testing.assert_close(loss, torch.stack(expected).mean(), rtol=1e-5, atol=1e-6)
        assert loss.requires_grad
    assert len({round(float(x), 4) for x in expected}) > 1  # the steps' labels and losses differ
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train_step(batch)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    with pytest.raises(ValueError, match="--deep-supervision.*--fsdp"):
        TrainArgs(out="x", deep_supervision=True, fsdp=True)


def test_direct_readout_weight_adds_each_steps_loss_read_from_the_state_without_the_coda(tmp_path):
    options = "--set mean_backprop_depth=3 --chain-paced --deep-supervision --warmup 0 --direct-readout-weight 0.5"
    trainer = tiny_trainer(tmp_path, options)
    batch = trainer.global_batch()
    model, base = trainer.model, trainer.model.transformer
    inputs = dict(
        batch,
        input_states=trainer._initial_states(batch),
        num_items_in_batch=(batch["labels"][:, 1:] != -100).sum().float(),
    )
    loss = trainer.ddp(**inputs, num_steps=(0, 2))
    trainer.ddp.direct_weight = 0.0
    coda_only = trainer.ddp(**inputs, num_steps=(0, 2))
    with torch.no_grad():  # each step's direct readout, by hand: the state after r steps, ln_f, head
        xs, ctx = base.encode(batch["input_ids"], batch["attention_mask"])
        state, direct = inputs["input_states"], []
        for r in range(2):
            state = base.core_step(state, xs, ctx, r)
            labels = paced_labels(batch["labels"], batch["chase_labels"], r + 1)
            direct.append(
                model.loss_function(
                    logits=model.lm_head(base.ln_f(state)).float(),
                    labels=labels,
                    vocab_size=model.config.vocab_size,
                    num_items_in_batch=inputs["num_items_in_batch"],
                )
            )
    torch.testing.assert_close(loss, coda_only + 0.5 * torch.stack(direct).mean(), rtol=1e-5, atol=1e-6)
    assert loss.requires_grad and not torch.allclose(loss, coda_only)
    with pytest.raises(ValueError, match="--direct-readout-weight.*--deep-supervision"):
        TrainArgs(out="x", direct_readout_weight=0.5)
    with pytest.raises(ValueError, match="--direct-readout-weight"):
        TrainArgs(out="x", deep_supervision=True, direct_readout_weight=-1)


def test_carry_option_gives_each_step_the_input_of_its_column(tmp_path):
    trainer = tiny_trainer(
        tmp_path,
        "--set mean_backprop_depth=3 --chain-paced --deep-supervision --chain-queries 1 --chain-repeats 0 "
        "--chain-carry 1 --warmup 0",
    )
    batch = trainer.global_batch()
    assert batch["step_input_ids"].shape[:2] == batch["input_ids"].shape
    plain = {k: v for k, v in batch.items() if k not in ("chase_labels", "step_input_ids")}
    common = dict(
        plain,
        input_states=trainer._initial_states(batch),
        chase_labels=batch["chase_labels"],
        num_items_in_batch=(batch["labels"][:, 1:] != -100).sum().float(),
    )
    ids = batch["input_ids"]
    other = torch.where(ids > 2, torch.randint(3, 44, ids.shape), ids)
    first_only = torch.stack([ids, other], dim=-1)  # step 1 sees the text, every later step another one
    for steps, same in (((0, 1), True), ((1, 1), False), ((0, 3), False)):
        loss = trainer.ddp(**common, num_steps=steps)
        columns = trainer.ddp(**common, num_steps=steps, step_input_ids=first_only)
        assert torch.allclose(loss, columns) == same, steps
    unchanged = trainer.ddp(**common, num_steps=(1, 2), step_input_ids=ids[..., None].repeat(1, 1, 3))
    torch.testing.assert_close(unchanged, trainer.ddp(**common, num_steps=(1, 2)))
    assert unchanged.requires_grad
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train_step(batch)
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters(), strict=True))
    assert "step_input_ids" in batch  # the caller's batch is left as it was
    with pytest.raises(ValueError, match="--chain-carry needs --deep-supervision"):
        TrainArgs(out="x", chain_carry=0.5, chain_paced=True, chain_queries=1, chain_repeats=0)
    with pytest.raises(ValueError, match="--chain-carry needs --chain-paced, --chain-queries 1"):
        TrainArgs(out="x", chain_carry=0.5, chain_paced=True, deep_supervision=True)
    with pytest.raises(ValueError, match="--chain-carry"):
        TrainArgs(out="x", chain_carry=1.5)
