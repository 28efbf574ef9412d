"""`convert` and `upload` subcommands: parsing, help with examples, and running through `func`."""

import argparse
import json

import pytest

from modeling_recurrent.convert.cli import add_convert_parser, add_upload_parser

from ..conftest import tiny_model
from .conftest import PUBLISHED, save_source


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="recurrent-depth")
    subparsers = main.add_subparsers(dest="command", required=True)
    add_convert_parser(subparsers)
    add_upload_parser(subparsers)
    return main


@pytest.mark.parametrize(
    ("argv", "example"),
    [
        (["convert", "--help"], "--prelude 0-3 --core 10-17 --coda 18-21"),
        (["convert", "llama", "--help"], "--prelude 0-3 --core 10-17 --coda 18-21"),
        (["upload", "--help"], "--dry-run --eval-results results.json"),
    ],
)
def test_help_shows_examples(capsys, argv, example):
    with pytest.raises(SystemExit):
        parser().parse_args(argv)
    assert example in capsys.readouterr().out


def test_convert_huginn_both_ways(tmp_path, capsys):
    args = parser().parse_args(["convert", "huginn", str(PUBLISHED), str(tmp_path / "ours"), "--no-progress"])
    args.func(args)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "recurrent_depth"
    argv = ["convert", "huginn", str(tmp_path / "ours"), str(tmp_path / "pub"), "--to", "published", "--no-progress"]
    args = parser().parse_args(argv + ["--dtype", "bfloat16", "--max-shard-size", "200KB"])
    args.func(args)
    config = json.loads((tmp_path / "pub" / "config.json").read_text())
    assert config["model_type"] == "huginn_raven" and config["torch_dtype"] == "bfloat16"
    assert (tmp_path / "pub" / "model.safetensors.index.json").is_file()
    with pytest.raises(FileExistsError):
        args.func(args)
    args.overwrite = True
    args.func(args)
    assert str(tmp_path / "pub") in capsys.readouterr().out


def test_convert_llama_ranges(tmp_path):
    save_source("llama", tmp_path / "src")
    argv = ["convert", "llama", str(tmp_path / "src"), str(tmp_path / "rd"), "--prelude", "0", "--core", "1-2"]
    args = parser().parse_args([*argv, "--coda", "3", "--adapter-init", "random", "--mean-recurrence", "4"])
    args.func(args)
    config = json.loads((tmp_path / "rd" / "config.json").read_text())
    assert (config["n_prelude"], config["n_core"], config["n_coda"], config["mean_recurrence"]) == (1, 2, 1, 4)


def test_convert_pretrain(tmp_path):
    from .test_pretrain import training_checkpoint

    model = tiny_model()
    model.save_pretrained(tmp_path / "cfg")
    pth = training_checkpoint(model, tmp_path / "c.pth")
    args = parser().parse_args(
        ["convert", "pretrain", str(pth), str(tmp_path / "out"), "--config", str(tmp_path / "cfg")]
    )
    args.func(args)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_upload_dry_run(tmp_path):
    tiny_model().save_pretrained(tmp_path / "model")
    args = parser().parse_args(
        ["upload", str(tmp_path / "model"), "me/tiny", "--dry-run", "--output", str(tmp_path / "x")]
    )
    args.func(args)
    assert (tmp_path / "x" / "README.md").is_file() and (tmp_path / "x" / "modeling_recurrent_depth.py").is_file()


def test_bad_shard_size_fails_before_reading_the_source(tmp_path):
    args = parser().parse_args(
        ["convert", "huginn", str(tmp_path / "missing"), str(tmp_path / "out"), "--max-shard-size", "0.5GB"]
    )
    with pytest.raises(ValueError, match="--max-shard-size"):
        args.func(args)
