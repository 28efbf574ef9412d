"""Upload a converted model folder to the Hugging Face Hub.

`upload_files` decides what the repository receives: every file of the folder except code and README, the
package's current model code (so the repository loads with `trust_remote_code=True` alone), config.json with its
auto_map, and the rendered model card. `--dry-run` writes exactly these files to a folder; otherwise they go to
the Hub in one commit.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi

from modeling_recurrent import RecurrentDepthConfig

from .card import render_model_card
from .checkpoint import checkpoint_files
from .output import atomic_output
from .remote_code import auto_map, remote_code_files

SKIPPED_SUFFIXES = (".py", ".pyc")
CARD = "README.md"
CONFIG = "config.json"


def upload_files(
    folder: str | Path,
    repo_id: str,
    *,
    eval_results: str | Path | Mapping[str, Any] | None = None,
    base_model: str | None = None,
    license: str | None = "apache-2.0",
    tags: Sequence[str] = (),
) -> dict[str, Path | bytes]:
    """{path in repo: file to copy or rendered bytes} for a model folder of this package's format."""
    folder = Path(folder)
    config_path = folder / CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no {CONFIG}; is this a model folder?")
    config = json.loads(config_path.read_text())
    if config.get("model_type") != RecurrentDepthConfig.model_type:
        raise ValueError(
            f"{folder}: model_type is {config.get('model_type')!r}; convert it to 'recurrent_depth' first "
            "(recurrent-depth convert ...)"
        )
    checkpoint_files(folder)  # raises if the folder holds no weights
    files: dict[str, Path | bytes] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
            continue
        if path.suffix in SKIPPED_SUFFIXES or rel.as_posix() in (CARD, CONFIG):
            continue
        files[rel.as_posix()] = path
    for code in remote_code_files():
        files[code.name] = code.read_bytes()
    config["auto_map"] = {**config.get("auto_map", {}), **auto_map()}
    files[CONFIG] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    card = render_model_card(
        config, repo_id, eval_results=eval_results, base_model=base_model, license=license, tags=tags
    )
    files[CARD] = str(card).encode()
    return dict(sorted(files.items()))


def write_files(files: Mapping[str, Path | bytes], dst: str | Path, overwrite: bool = False) -> Path:
    """Materialise `upload_files` output as a folder (hard links for large files where possible)."""
    with atomic_output(dst, overwrite) as tmp:
        for name, content in files.items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
                continue
            try:
                os.link(content, target)
            except OSError:
                shutil.copyfile(content, target)
    return Path(dst)


def upload(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    output: str | Path | None = None,
    overwrite: bool = False,
    eval_results: str | Path | Mapping[str, Any] | None = None,
    base_model: str | None = None,
    license: str | None = "apache-2.0",
    tags: Sequence[str] = (),
    commit_message: str = "Upload recurrent-depth model",
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> Path | CommitInfo:
    """Upload a model folder to `repo_id` (created if needed) in one commit; with `dry_run`, write the folder
    that would be uploaded to `output` (default: `<folder>-upload` beside it) and return its path."""
    folder = Path(folder)
    files = upload_files(folder, repo_id, eval_results=eval_results, base_model=base_model, license=license, tags=tags)
    if dry_run:
        return write_files(files, output or folder.with_name(f"{folder.name}-upload"), overwrite)
    api = HfApi(token=token, endpoint=endpoint)
    api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=content if isinstance(content, bytes) else str(content))
        for name, content in files.items()
    ]
    return api.create_commit(repo_id, operations, commit_message=commit_message, repo_type="model", revision=revision)
