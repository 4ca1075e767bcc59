"""Saving and loading the glimpse modules apart from the base checkpoint.

Owns the on-disk form of the new modules: `glimpse_modules.safetensors` (weights only) and
`glimpse_modules.json` (the `ModulesSpec` and a format version), written atomically into a
folder. Loading uses safetensors only (no pickle). Must not read or write the base model's files:
a base checkpoint and its modules travel and version separately.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from glimpseprune.modules import GlimpseModules, ModulesSpec

WEIGHTS_FILE = "glimpse_modules.safetensors"
CONFIG_FILE = "glimpse_modules.json"
FORMAT_VERSION = 1


def save_modules(modules: GlimpseModules, out_dir: str | Path) -> Path:
    """Writes the modules' weights and spec to `out_dir` (replaced atomically if it exists).

    Returns:
        The folder.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    state = {name: tensor.detach().contiguous().cpu()
             for name, tensor in modules.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
    config = {"format_version": FORMAT_VERSION, "spec": modules.spec.to_dict(),
              "dtype": str(next(iter(state.values())).dtype).removeprefix("torch.")}
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return out_dir


def load_modules(path: str | Path, expect: ModulesSpec | None = None) -> GlimpseModules:
    """Rebuilds modules from a folder written by `save_modules`.

    Args:
        path: the folder.
        expect: if given, the spec the caller's base model needs; any difference is an error.

    Raises:
        FileNotFoundError: the folder lacks either file.
        ValueError: an unknown format version, a spec mismatch, or missing/extra weights.
    """
    path = Path(path)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} has no {name}: not a glimpse modules folder")
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path / CONFIG_FILE}: format_version {config.get('format_version')} "
                         f"is not {FORMAT_VERSION}")
    spec = ModulesSpec(**config["spec"])
    if expect is not None and spec != expect:
        diff = {k: (v, getattr(expect, k)) for k, v in spec.to_dict().items()
                if getattr(expect, k) != v}
        raise ValueError(f"glimpse modules in {path} do not fit this model: (saved, needed) {diff}")
    modules = GlimpseModules(spec)
    state = load_file(str(path / WEIGHTS_FILE))
    missing, unexpected = modules.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path / WEIGHTS_FILE}: missing {missing}, unexpected {unexpected}")
    return modules.to(next(iter(state.values())).dtype)
