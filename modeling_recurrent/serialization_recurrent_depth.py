"""Strict loading and atomic saving of checkpoint folders: the PreTrainedModel base of the recurrent-depth models.

This file travels as remote code with every saved model, next to modeling_recurrent_depth.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

from safetensors import SafetensorError, safe_open
from transformers import PreTrainedModel


class StrictCheckpointPreTrainedModel(PreTrainedModel):
    """A PreTrainedModel whose `from_pretrained` refuses weights that do not match the config and whose
    `save_pretrained` never leaves a half-written folder."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Transformers' from_pretrained, strict about the files: a truncated or corrupt file raises an OSError naming
        it, and weights that do not fit the config (missing, unexpected or differently shaped tensors) raise a
        ValueError naming them instead of leaving random weights. `ignore_mismatched_sizes=True` is as lenient as
        Transformers."""
        if kwargs.pop("ignore_mismatched_sizes", False):
            return super().from_pretrained(pretrained_model_name_or_path, *args, ignore_mismatched_sizes=True, **kwargs)
        with_info = kwargs.pop("output_loading_info", False)
        source = str(pretrained_model_name_or_path)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, ignore_mismatched_sizes=True, output_loading_info=True, **kwargs
            )
        except (SafetensorError, ValueError) as error:  # json's JSONDecodeError is a ValueError
            bad = unreadable_files(source)
            if not bad:
                raise
            raise OSError(f"cannot load {source}: truncated or corrupt file {'; '.join(bad)}") from error
        problems = [
            f"{k} has shape {tuple(a)} in the checkpoint, {tuple(b)} in the model"
            for k, a, b in sorted(info["mismatched_keys"])
        ]
        problems += [f"{key} is missing" for key in sorted(info["missing_keys"])]
        problems += [f"{key} is unexpected" for key in sorted(info["unexpected_keys"]) if not key.startswith("lm_head")]
        if problems:
            folder = Path(source)
            weights = next(
                (folder / n for n in ("model.safetensors", "model.safetensors.index.json") if (folder / n).is_file()),
                folder,
            )
            raise ValueError(
                f"the weights in {weights} do not match {folder / 'config.json'} ({len(problems)} tensors): "
                + "; ".join(problems[:6])
                + ("; ..." if len(problems) > 6 else "")
            )
        return (model, info) if with_info else model

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """Transformers' save_pretrained, made atomic: it writes into a temporary sibling folder renamed into place, so
        a failed save leaves no half-written checkpoint and an existing folder unchanged. Files of an existing folder
        that the save does not write (e.g. a tokenizer) are kept, stale weight files are not. Other ranks, push_to_hub,
        distributed checkpoints, symlinked folders and the working directory save in place as in Transformers."""
        target = Path(os.path.abspath(save_directory))
        main = args[0] if args else kwargs.get("is_main_process", True)
        push = args[2] if len(args) > 2 else kwargs.get("push_to_hub", False)
        in_place = push or kwargs.get("distributed_checkpoint") or not self.should_save_on_this_rank(main)
        if in_place or target.is_file() or target.is_symlink() or Path.cwd().is_relative_to(target):
            return super().save_pretrained(save_directory, *args, **kwargs)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp"  # not mkdtemp: keep the umask's mode
        replaced = staging.with_suffix(".old")
        try:
            staging.mkdir()
            super().save_pretrained(staging, *args, **kwargs)
            if target.is_dir():
                for entry in target.iterdir():
                    if not (staging / entry.name).exists() and not _WEIGHT_FILE.fullmatch(entry.name):
                        _link_or_copy(entry, staging / entry.name)
                target.rename(replaced)
            staging.rename(target)
        except BaseException:
            if replaced.exists() and not target.exists():
                replaced.rename(target)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(replaced, ignore_errors=True)


_WEIGHT_FILE = re.compile(r"(pytorch_)?model([.-].*)?\.(safetensors|bin)(\.index\.json)?")


def _link_or_copy(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Hard-link a file or a folder tree (copy where links are impossible); symlinks stay symlinks."""
    source = Path(source)
    if source.is_symlink():
        os.symlink(os.readlink(source), destination)
    elif source.is_dir():
        shutil.copytree(source, destination, symlinks=True, copy_function=_link_or_copy)
    else:
        try:
            os.link(source, destination)
        except OSError:
            shutil.copy2(source, destination)


def unreadable_files(folder: str | os.PathLike) -> list[str]:
    """Files of a local checkpoint folder that do not parse (JSON files, safetensors headers), with the reason."""
    bad = []
    for path in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
        try:
            if path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix == ".safetensors":
                with safe_open(path, "pt"):
                    pass
        except (ValueError, OSError, SafetensorError) as error:  # JSONDecodeError, UnicodeDecodeError: ValueErrors
            bad.append(f"{path} ({error})")
    return bad
