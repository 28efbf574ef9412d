import sys
from pathlib import Path

import pytest

import modeling_recurrent
from modeling_recurrent.cli import build_parser, extra_for, main, parse_integers

SHIPPED = Path(modeling_recurrent.__file__).parent / "checkpoints" / "chain-tiny"


def test_every_command_is_listed():
    help_text = build_parser().format_help()
    assert all(name in help_text for name in ("demo", "train", "convert", "upload", "eval", "trace", "bench"))


def test_a_missing_optional_dependency_names_the_extra_to_install(tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.jsonl").write_text('{"text": "hello"}\n')
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "train",
                "--out",
                str(tmp_path / "run"),
                "--config",
                "tiny",
                "--steps",
                "1",
                "--data",
                str(tmp_path / "notes.jsonl"),
                "--tokenizer",
                str(SHIPPED),
            ]
        )
    assert exit_info.value.code == 2
    assert 'pip install "modeling-recurrent[train]"' in capsys.readouterr().err


def test_the_extra_follows_the_missing_module():
    assert extra_for(ModuleNotFoundError("no lm_eval", name="lm_eval.api")) == "eval"
    assert extra_for(ModuleNotFoundError("no peft", name="peft")) == "train"
    assert extra_for(ModuleNotFoundError("no foo", name="foo")) is None


def test_a_command_without_its_extra_takes_any_options_and_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.delitem(sys.modules, "modeling_recurrent.evaluate", raising=False)
    assert main(["eval", "--print-task-path"]) == 2
    assert 'pip install "modeling-recurrent[eval]"' in capsys.readouterr().err


def test_parse_integers_reads_a_comma_separated_list():
    assert parse_integers("1, 4,16,", "--steps") == [1, 4, 16]
    assert parse_integers("0,-1", "--tokens", positive=False) == [0, -1]


@pytest.mark.parametrize(
    ("text", "positive", "message"),
    [
        ("1,x", True, "--steps must be comma-separated integers, got '1,x'"),
        (" , ", True, "--steps names no integer"),
        ("4,0", True, "--steps must be positive integers, got '4,0'"),
    ],
)
def test_parse_integers_names_the_option_and_the_bad_text(text, positive, message):
    with pytest.raises(ValueError, match=message):
        parse_integers(text, "--steps", positive)
