"""Output folders: refuse an existing destination, replace it only with --overwrite, leave nothing half-written."""

import shutil

import pytest
import torch

from modeling_recurrent.convert import CheckpointError, convert_huginn
from modeling_recurrent.convert.keymap import Step
from modeling_recurrent.convert.output import atomic_output
from modeling_recurrent.convert.shards import save_plan

from .conftest import PUBLISHED, leftovers


def test_existing_destination_is_refused_unless_overwrite(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_huginn(PUBLISHED, dst, progress=False)
    assert (dst / "keep.txt").read_text() == "mine"
    convert_huginn(PUBLISHED, dst, overwrite=True, progress=False)
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_destination_inside_source_is_refused(tmp_path):
    shutil.copytree(PUBLISHED, tmp_path / "src")
    with pytest.raises(ValueError, match="replace the source"):
        convert_huginn(tmp_path / "src", tmp_path / "src", overwrite=True, progress=False)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_names_the_file(tmp_path, damage):
    src = tmp_path / "src"
    shutil.copytree(PUBLISHED, src)
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x10\x00" + data[2:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        convert_huginn(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_missing_shard_of_an_index(tmp_path):
    out = convert_huginn(PUBLISHED, tmp_path / "sharded", max_shard_size="200KB", progress=False)
    next(out.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="model-00002"):
        convert_huginn(out, tmp_path / "back", to="published", progress=False)


def failing_plan():
    def explode(tensor):
        raise RuntimeError("disk full")

    return {"a": Step(("x",), torch.clone), "b": Step(("x",), explode)}


def test_failure_while_writing_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="disk full"), atomic_output(tmp_path / "out") as tmp:
        save_plan(failing_plan(), {"x": torch.ones(4)}, tmp, max_shard_size=8, progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_failed_overwrite_keeps_the_old_destination(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_output(tmp_path / "out", overwrite=True) as tmp:
        save_plan(failing_plan(), {"x": torch.ones(4)}, tmp, progress=False)
    assert (tmp_path / "out" / "old.txt").read_text() == "old" and leftovers(tmp_path) == []
