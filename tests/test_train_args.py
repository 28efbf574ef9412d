"""TrainArgs and the `recurrent-depth train` options: bad values are refused naming the option, `--set` parses JSON."""

import argparse

import pytest

from modeling_recurrent.train_args import TrainArgs, add_arguments, args_from_namespace


@pytest.mark.parametrize(
    ("field", "value", "option"),
    [
        ("eval_every", 0, "--eval-every"),
        ("save_every", 0, "--save-every"),
        ("chain_queries", 0, "--chain-queries"),
        ("warmup", -1, "--warmup"),
        ("steps", 2.5, "--steps"),
        ("lr", 0.0, "--lr"),
        ("grad_clip", -1.0, "--grad-clip"),
        ("weight_decay", -0.1, "--weight-decay"),
        ("min_lr_ratio", 1.5, "--min-lr-ratio"),
        ("chain_advance_at", -0.1, "--chain-advance-at"),
        ("mean_recurrence", 0, "--mean-recurrence"),
        ("eval_steps", [], "--eval-steps"),
        ("eval_steps", [4, 0], "--eval-steps"),
    ],
)
def test_bad_values_are_rejected_naming_the_option(field, value, option):
    with pytest.raises(ValueError, match=option):
        TrainArgs(out="x", **{field: value})


def test_set_reads_json_values_and_keeps_other_text_as_a_string():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    values = ["hidden_size=32", "tie_word_embeddings=false", "dtype=float16", "name=-x", "rope_scaling=null"]
    ns = parser.parse_args(["--out", "x", *[arg for value in values for arg in ("--set", value)]])
    assert args_from_namespace(ns).config_overrides == {
        "hidden_size": 32,
        "tie_word_embeddings": False,
        "dtype": "float16",
        "name": "-x",
        "rope_scaling": None,
    }
    with pytest.raises(ValueError, match="--set expects FIELD=VALUE"):
        args_from_namespace(parser.parse_args(["--out", "x", "--set", "hidden_size"]))


def test_every_option_has_help():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert [a.option_strings for a in parser._actions if not a.help] == []
