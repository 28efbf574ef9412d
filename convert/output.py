"""Output folders: written atomically, with this package's config and code, and the source's side files.

`atomic_output` hands out a temporary sibling folder and renames it to the destination only when everything in it
was written; on any error it is removed, so the destination is either absent, untouched, or complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from modeling_recurrent import RecurrentDepthConfig, RecurrentDepthForCausalLM

from .remote_code import write_remote_code

# Files beside the weights that describe how to use them: tokenizer, chat template, generation defaults.
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
SIDE_FOLDERS = ("additional_chat_templates",)


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse an existing destination (unless `overwrite`) and a destination that is, or holds, the source."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    if dst == src or src.is_relative_to(dst):
        raise ValueError(f"destination {dst} would replace the source {src}; choose another folder")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"destination {dst} exists; pass overwrite=True (--overwrite) to replace it")


@contextmanager
def atomic_output(dst: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces `dst` when the block succeeds and is deleted when it fails."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"destination {dst} exists; pass overwrite=True (--overwrite) to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        old = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.old")
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        tmp.rename(dst)


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer files, chat templates and generation_config.json found in `src`; returns their names."""
    copied: list[str] = []
    if not src.is_dir():
        return copied
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    for name in SIDE_FOLDERS:
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name)
            copied.append(name)
    return copied


def write_config(config: RecurrentDepthConfig, folder: Path, dtype: torch.dtype) -> None:
    """config.json of this package's format with its auto_map, and the code files it points to."""
    config.architectures = [RecurrentDepthForCausalLM.__name__]
    config.dtype = dtype
    write_remote_code(folder, config)
    config.save_pretrained(folder)
