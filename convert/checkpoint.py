"""Reading checkpoints one tensor at a time.

`open_checkpoint` gives a `LazyStateDict` over a safetensors file, a (sharded) safetensors folder, or a torch pickle
(`.bin` / `.pth`, memory-mapped). A tensor is read only when it is looked up, and shapes and dtypes are known
without reading any data (`spec`), so a conversion holds about one tensor at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILES = ("pytorch_model.bin",)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read; the message names the file."""


class LazyStateDict(Mapping[str, torch.Tensor]):
    """A read-only state dict whose tensors are loaded on lookup; `spec(key)` is a meta tensor of its shape/dtype."""

    def __init__(self, loaders: Mapping[str, Callable[[], torch.Tensor]], specs: Mapping[str, torch.Tensor]):
        self._loaders, self._specs = dict(loaders), dict(specs)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._loaders[key]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)

    def spec(self, key: str) -> torch.Tensor:
        return self._specs[key]

    def specs(self) -> dict[str, torch.Tensor]:
        return dict(self._specs)

    def renamed(self, names: Mapping[str, str]) -> LazyStateDict:
        """A view with keys `new` for `names = {new: old}` (no tensor is read)."""
        return LazyStateDict(
            {n: self._loaders[o] for n, o in names.items()}, {n: self._specs[o] for n, o in names.items()}
        )


def meta_specs(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta tensors with the shapes and dtypes of `state_dict` (lazy or not), reading no data."""
    if isinstance(state_dict, LazyStateDict):
        return state_dict.specs()
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state_dict.items()}


def open_safetensors(files: list[Path]) -> LazyStateDict:
    """Tensors of one or several safetensors files; a file that is not valid safetensors raises CheckpointError."""
    loaders: dict[str, Callable[[], torch.Tensor]] = {}
    specs: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            handle = safe_open(str(path), framework="pt")
            keys = list(handle.keys())
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from error
        for key in keys:
            if key in loaders:
                raise CheckpointError(f"{path}: tensor {key!r} is also stored in another file of the checkpoint")
            tensor_slice = handle.get_slice(key)
            dtype = SAFETENSORS_DTYPES.get(tensor_slice.get_dtype())
            if dtype is None:
                raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {tensor_slice.get_dtype()}")
            specs[key] = torch.empty(tensor_slice.get_shape(), dtype=dtype, device="meta")
            loaders[key] = _safetensors_loader(handle, path, key)
    return LazyStateDict(loaders, specs)


def _safetensors_loader(handle, path: Path, key: str) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        try:
            return handle.get_tensor(key)
        except SafetensorError as error:
            raise CheckpointError(f"{path}: cannot read tensor {key!r} ({error})") from error

    return load


def _constant_loader(tensor: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: tensor


def load_torch_file(path: Path, allow_pickle: bool = False) -> dict:
    """`torch.load` memory-mapped on CPU; arbitrary pickles only with `allow_pickle` (trusted files)."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=not allow_pickle)
    except Exception as error:  # torch raises several unpickling and format errors
        hint = "" if allow_pickle else " (if the file is trusted and holds more than tensors, allow pickle)"
        raise CheckpointError(f"{path}: cannot load torch checkpoint: {error}{hint}") from error


def from_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> LazyStateDict:
    """A LazyStateDict over already (memory-mapped) loaded tensors; non-tensor values raise CheckpointError."""
    bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {', '.join(map(str, bad))}")
    return LazyStateDict({k: _constant_loader(v) for k, v in tensors.items()}, meta_specs(tensors))


def checkpoint_files(folder: Path) -> list[Path]:
    """Weight files of a model folder: the safetensors index's shards, else `*.safetensors`, else a torch file."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"{index}: not a valid safetensors index ({error})") from error
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index}: lists shards that do not exist: {', '.join(absent)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    files = [folder / name for name in TORCH_FILES if (folder / name).is_file()]
    if not files:
        raise CheckpointError(f"{folder}: no weights found (*.safetensors, {SAFETENSORS_INDEX} or pytorch_model.bin)")
    return files


def open_checkpoint(path: str | Path) -> LazyStateDict:
    """Lazy state dict of a weight file or model folder (safetensors preferred, torch pickles memory-mapped)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    files = checkpoint_files(path) if path.is_dir() else [path]
    if all(f.suffix == ".safetensors" for f in files):
        return open_safetensors(files)
    if len(files) != 1:
        raise CheckpointError(f"{path}: cannot mix safetensors and torch weight files")
    return from_tensors(load_torch_file(files[0]), files[0])
