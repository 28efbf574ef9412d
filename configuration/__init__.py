"""Named configuration presets, each a folder loadable with `AutoConfig.from_pretrained`."""

from pathlib import Path

PRESETS_DIR = Path(__file__).resolve().parent


def preset_path(name: str) -> Path:
    """Folder of the preset `name` (e.g. "tiny", "huginn-0125"); ValueError listing the presets if unknown."""
    path = PRESETS_DIR / name
    if not (path / "config.json").is_file():
        available = sorted(p.name for p in PRESETS_DIR.iterdir() if (p / "config.json").is_file())
        raise ValueError(f"unknown preset {name!r}; available: {available}")
    return path
