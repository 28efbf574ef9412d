"""The streaming safetensors writer: valid files for every dtype, shard layout, bounded memory."""

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling_recurrent.convert.checkpoint import open_checkpoint
from modeling_recurrent.convert.keymap import Step, identity
from modeling_recurrent.convert.shards import save_plan, shard_keys


def test_written_files_read_back_exactly(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5),
        "bf16": torch.randn(7).to(torch.bfloat16),
        "f16": torch.randn(2, 2, 2).half(),
        "i64": torch.arange(5),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(4, 6).t(),
    }
    plan = {k: Step((k,), identity) for k in tensors}
    save_plan(plan, tensors, tmp_path, progress=False)
    back = load_file(tmp_path / "model.safetensors")
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in tensors.items())


def test_shards_and_index(tmp_path):
    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(10)}  # 1 KiB each
    save_file(tensors, tmp_path / "in.safetensors")
    source = open_checkpoint(tmp_path / "in.safetensors")
    (tmp_path / "out").mkdir()
    save_plan({k: Step((k,), identity) for k in tensors}, source, tmp_path / "out", max_shard_size=3000, progress=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 10 * 1024
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    back = open_checkpoint(tmp_path / "out")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_shard_grouping_keeps_oversized_tensors_alone():
    specs = {k: torch.empty(n, device="meta") for k, n in [("a", 10), ("b", 100), ("c", 10), ("d", 10)]}
    assert shard_keys(specs, max_shard_size=100) == [["a"], ["b"], ["c", "d"]]


def _anonymous_memory() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RssAnon from Linux /proc")
def test_peak_memory_is_about_one_tensor(tmp_path):
    """Computing and writing 6 x 40 MB tensors (240 MB) in 130 MB shards keeps resident anonymous memory at about one
    tensor. Inputs are memory-mapped, outputs are above glibc's largest mmap threshold (32 MB), so freed memory goes
    back to the system at once and the measurement is exact."""
    mb = 2**20
    for i in range(6):
        save_file({f"t{i}": torch.full((10 * mb,), float(i))}, tmp_path / f"in{i}.safetensors")
    source = open_checkpoint(tmp_path)
    plan = {k: Step((k,), lambda t: t * 2) for k in source}
    (tmp_path / "out").mkdir()
    base, peak, done = _anonymous_memory(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _anonymous_memory())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        save_plan(plan, source, tmp_path / "out", max_shard_size=130 * mb, progress=False)
    finally:
        done.set()
        sampler.join()
    grown = (peak[0] - base) / mb
    assert 0 < grown < 90, f"resident memory grew by {grown:.0f} MB while converting 240 MB"
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) == 2


@pytest.mark.parametrize(
    ("size", "expected"), [("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("500MB", 5 * 10**8), ("1000", 1000), (1000, 1000)]
)
def test_shard_sizes_parse(size, expected):
    from modeling_recurrent.convert.shards import parse_shard_size

    assert parse_shard_size(size) == expected


@pytest.mark.parametrize("size", ["0GB", "0.5GB", "big", "", 0, -5, True])
def test_bad_shard_sizes_are_rejected(size):
    from modeling_recurrent.convert.shards import parse_shard_size

    with pytest.raises(ValueError, match="max_shard_size"):
        parse_shard_size(size)
