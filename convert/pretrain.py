"""Checkpoints of the pretraining code (seal-rg/recurrent-pretraining) -> this package's format.

A training checkpoint is a torch pickle (`.pth`) holding, among optimizer and data-loader state, a `model` state
dict whose keys carry the prefixes of the wrappers around the model (`_orig_mod.` from torch.compile,
`_original_module.`, `_forward_module.`, `module.` ...). Under them the names are those of the published format,
so after the prefixes are stripped the huginn key table applies. The checkpoint holds no Transformers config:
pass one (a preset name such as "huginn-0125", a folder or a config.json, in either format).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from modeling_recurrent import RecurrentDepthConfig
from modeling_recurrent.configuration import PRESETS_DIR

from .checkpoint import CheckpointError, LazyStateDict, from_tensors, load_torch_file, meta_specs
from .huginn import EMBEDDING, huginn_config_to_ours, huginn_import_plan
from .keymap import OUR_HEAD, Plan, Step, apply_plan, check_shapes, expected_state
from .output import atomic_output, check_destination, write_config
from .shards import output_specs, save_plan

WRAPPER_PREFIXES = (
    "_orig_mod.",
    "_original_module.",
    "_forward_module.",
    "_fsdp_wrapped_module.",
    "_checkpoint_wrapped_module.",
    "module.",
)


def strip_wrappers(key: str) -> str:
    """`_orig_mod._original_module.transformer.wte.weight` -> `transformer.wte.weight`."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def model_names(specs: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """{model name: checkpoint key}; wrapper aliases of one tensor collapse, conflicting ones raise."""
    names: dict[str, str] = {}
    for key, spec in specs.items():
        name = strip_wrappers(key)
        if name in names:
            first = specs[names[name]]
            if first.shape != spec.shape or first.dtype != spec.dtype:
                raise ValueError(f"checkpoint keys {names[name]!r} and {key!r} both name {name!r} but differ")
            continue
        names[name] = key
    return names


def pretrain_plan(specs: Mapping[str, torch.Tensor], config: RecurrentDepthConfig) -> Plan:
    """Import plan over stripped names; an untied head stored transposed (the fused-loss head) is transposed back."""
    plan = huginn_import_plan(specs.keys(), config)
    head = specs.get(OUR_HEAD)
    expected = (config.vocab_size, config.hidden_size)
    if OUR_HEAD in plan and head is not None and tuple(head.shape) == expected[::-1] != expected:
        plan[OUR_HEAD] = Step((OUR_HEAD,), lambda t: t.t().contiguous())
    return plan


def pretrain_to_ours(state_dict: Mapping[str, torch.Tensor], config: RecurrentDepthConfig) -> dict[str, torch.Tensor]:
    """Pretraining `model` state dict (with wrapper prefixes) -> this package's state dict."""
    names = model_names(meta_specs(state_dict))
    renamed = {name: state_dict[key] for name, key in names.items()}
    out = apply_plan(pretrain_plan(meta_specs(renamed), config), renamed)
    check_shapes("pretraining checkpoint -> recurrent_depth", out, expected_state(config))
    return out


def load_config(spec: str | Path | RecurrentDepthConfig) -> RecurrentDepthConfig:
    """A config from a preset name, a model folder or a config.json (this package's or the published format)."""
    if isinstance(spec, RecurrentDepthConfig):
        return spec
    path = Path(spec)
    if not path.exists() and (PRESETS_DIR / str(spec) / "config.json").is_file():
        path = PRESETS_DIR / str(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        presets = sorted(p.name for p in PRESETS_DIR.iterdir() if (p / "config.json").is_file())
        raise ValueError(f"config {spec!r} is neither a config file, a model folder nor a preset ({presets})")
    raw = json.loads(path.read_text())
    if raw.get("model_type") == "huginn_raven":
        return huginn_config_to_ours(raw)
    return RecurrentDepthConfig.from_dict(raw)


def open_pretrain_checkpoint(path: str | Path, allow_pickle: bool = False) -> LazyStateDict:
    """The `model` state dict of a training checkpoint, memory-mapped, keys stripped of wrapper prefixes."""
    path = Path(path)
    checkpoint = load_torch_file(path, allow_pickle)
    model = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(model, dict):
        raise CheckpointError(f"{path}: no 'model' state dict in the checkpoint (keys: {list(checkpoint)[:10]})")
    tensors = from_tensors(model, path)
    return tensors.renamed(model_names(tensors.specs()))


def convert_pretrain(
    src: str | Path,
    dst: str | Path,
    *,
    config: str | Path | RecurrentDepthConfig = "huginn-0125",
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
    allow_pickle: bool = False,
) -> Path:
    """Convert a pretraining `.pth` checkpoint to a model folder of this package's format."""
    src, dst = Path(src), Path(dst)
    check_destination(src, dst, overwrite)
    config = load_config(config)
    source = open_pretrain_checkpoint(src, allow_pickle)
    plan = pretrain_plan(source.specs(), config)
    specs = output_specs(plan, source, dtype)
    check_shapes(str(src), specs, expected_state(config))
    with atomic_output(dst, overwrite) as tmp:
        save_plan(plan, source, tmp, specs=specs, max_shard_size=max_shard_size, progress=progress)
        write_config(config, tmp, specs[EMBEDDING].dtype)
    return dst
