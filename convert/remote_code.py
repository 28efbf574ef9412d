"""The model code a saved folder carries, so it loads with `trust_remote_code=True` where this package is absent.

The file list comes from the package itself: the modeling module and every sibling it imports (recursively, as
Transformers resolves them), plus the configuration module.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any, cast

from transformers.dynamic_module_utils import get_relative_import_files

from modeling_recurrent import RecurrentDepthConfig, RecurrentDepthForCausalLM

AUTO_CLASSES = (RecurrentDepthConfig, RecurrentDepthForCausalLM)


def remote_code_files() -> list[Path]:
    """Package source files a saved model needs, modeling file first."""
    files: list[Path] = []
    for cls in AUTO_CLASSES:
        source = sys.modules[cls.__module__].__file__
        assert source is not None  # the package's modules are loaded from source files
        module_file = Path(source)
        for path in (module_file, *map(Path, get_relative_import_files(str(module_file)))):
            if path not in files:
                files.append(path)
    return files


def auto_map() -> dict[str, str]:
    """`auto_map` entries of config.json pointing at the copied modules."""
    # register_for_auto_class (the package's __init__) sets _auto_class on both classes
    return {cast(str, cls._auto_class): f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}" for cls in AUTO_CLASSES}


def write_remote_code(folder: Path, config: Any = None) -> list[Path]:
    """Copy the code files into `folder`; add the auto_map to `config` (a config object or dict) when given."""
    written = []
    for path in remote_code_files():
        shutil.copyfile(path, folder / path.name)
        written.append(folder / path.name)
    if isinstance(config, dict):
        config["auto_map"] = {**config.get("auto_map", {}), **auto_map()}
    elif config is not None:
        config.auto_map = {**(getattr(config, "auto_map", None) or {}), **auto_map()}
    return written
