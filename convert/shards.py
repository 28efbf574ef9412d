"""Writing a conversion plan as (sharded) safetensors, streaming one tensor at a time.

Output shapes and dtypes come from running the plan on meta tensors, so every shard's header is written before its
data and each tensor goes to disk as soon as it is computed: peak memory is about the largest tensor (plus the
inputs of a stacked one), never a whole shard or checkpoint. Layout and names follow Transformers: one
`model.safetensors`, or `model-0000i-of-0000n.safetensors` shards with `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils.hub import convert_file_size_to_int

from .checkpoint import SAFETENSORS_DTYPES, SAFETENSORS_INDEX, meta_specs
from .keymap import Plan, like_getter, plan_specs, run_step

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
SINGLE_FILE = "model.safetensors"
HEADER_ALIGNMENT = 8


def output_specs(plan: Plan, source: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Meta tensors of the plan's outputs, floating ones cast to `dtype` when given."""
    specs = plan_specs(plan, meta_specs(source))
    if dtype is None:
        return specs
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in specs.items()}


def shard_keys(specs: Mapping[str, torch.Tensor], max_shard_size: int) -> list[list[str]]:
    """Keys grouped into shards of at most `max_shard_size` bytes (a larger single tensor gets its own shard)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, spec in specs.items():
        nbytes = spec.numel() * spec.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def parse_shard_size(size: int | str) -> int:
    """Bytes of a shard size such as 5GB, 500MB, 2GiB or a plain byte count; ValueError unless positive."""
    try:
        value = int(size) if str(size).isdigit() else convert_file_size_to_int(size)
    except (ValueError, TypeError, AttributeError):
        value = 0
    if isinstance(size, bool) or value <= 0:
        raise ValueError(f"max_shard_size must be a positive size such as 5GB, 500MB or 2GiB, got {size!r}")
    return value


def save_plan(
    plan: Plan,
    source: Mapping[str, torch.Tensor],
    folder: Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    progress: bool = True,
    specs: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Compute every output of `plan` from `source` and write it to `folder`; returns the output specs."""
    specs = dict(specs) if specs is not None else output_specs(plan, source, dtype)
    shards = shard_keys(specs, parse_shard_size(max_shard_size))
    names = shard_names(len(shards))
    total = sum(s.numel() * s.element_size() for s in specs.values())
    like = like_getter(source)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {folder.name}", disable=not progress) as bar:
        for name, keys in zip(names, shards, strict=True):
            with open(folder / name, "wb") as f:
                f.write(_header({k: specs[k] for k in keys}))
                for key in keys:
                    tensor = run_step(plan[key], source.__getitem__, like)
                    tensor = tensor.to(specs[key].dtype)
                    if tuple(tensor.shape) != tuple(specs[key].shape):
                        raise RuntimeError(f"{key}: computed shape {tuple(tensor.shape)} != planned {specs[key].shape}")
                    f.write(_tensor_bytes(tensor))
                    bar.update(tensor.numel() * tensor.element_size())
                    del tensor
    if len(names) > 1:
        weight_map = {key: name for name, keys in zip(names, shards, strict=True) for key in keys}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return specs


def _header(specs: Mapping[str, torch.Tensor]) -> bytes:
    """Safetensors header (length prefix + JSON, padded with spaces) for tensors stored in the given order."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, spec in specs.items():
        end = offset + spec.numel() * spec.element_size()
        entries[key] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, end]}
        offset = end
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(header)) + header


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a CPU tensor (no copy if it is already contiguous)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data.cast("B")
