"""Built-in presets (``NAME.yaml``), shipped as package data and read with :mod:`importlib.resources`.

``certkd presets`` lists them with the first comment line of each; ``--preset NAME`` loads one
(:func:`load_preset`, also importable from :mod:`certkd.config`). A preset is a YAML mapping of :class:`certkd.config.TrainConfig`
keys; users' own files work the same way (``--preset path/to/mine.yaml``, or a folder of them in
``$CERTKD_CONFIG_DIR``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from certkd.errors import CertkdError
from certkd.options import did_you_mean


def config_dirs() -> List[Path]:
    """Folders of the user's own presets: ``$CERTKD_CONFIG_DIR`` (``os.pathsep``-separated), looked up
    before the built-in presets (:func:`builtin_presets`)."""
    raw = os.environ.get("CERTKD_CONFIG_DIR", "")
    return [Path(d) for d in raw.split(os.pathsep) if d]


def builtin_presets() -> Dict[str, Any]:
    """``{name: resource}`` of the presets shipped inside the package (``certkd/presets/*.yaml``),
    read with :mod:`importlib.resources`, so they are there in a wheel install as in a checkout."""
    from importlib import resources

    try:
        folder = resources.files("certkd.presets")
    except (ModuleNotFoundError, TypeError):  # a broken install: no built-in presets rather than a crash
        return {}
    return {entry.name[: -len(".yaml")]: entry for entry in folder.iterdir()
            if entry.name.endswith(".yaml") and entry.is_file()}


def list_presets() -> List[str]:
    """Names of the user's presets ($CERTKD_CONFIG_DIR) and the built-in ones, sorted."""
    names = set(builtin_presets())
    for d in config_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def preset_description(name: str) -> str:
    """The first sentence of a preset's leading comment block ('' when it has none)."""
    path = _find_user_preset(name)
    try:
        text = path.read_text(encoding="utf-8") if path is not None else builtin_presets()[name].read_text(
            encoding="utf-8")
    except (OSError, KeyError, UnicodeDecodeError):
        return ""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    block = " ".join(l for l in lines if l)
    m = re.search(r"[.!?](\s|$)", block)
    return block[: m.start() + 1] if m else block


def _find_user_preset(name: str) -> Optional[Path]:
    for d in config_dirs():
        candidate = d / f"{name}.yaml"
        if candidate.exists():
            return candidate
    return None


PRESET_MAX_BYTES = 1 << 20  # a preset is a few hundred bytes; never read an unbounded file (/dev/zero)
_PRESET_FIX = "pass a .yaml preset file or a preset name ('certkd presets' lists them)"


def _not_a_preset(path: Path) -> Optional[str]:
    """Why an existing ``path`` cannot be read as a preset file (None: it is a regular file)."""
    if path.is_dir():
        return "is a directory, not a YAML preset file"
    if not path.is_file():
        return "is not a regular file (a device, a pipe or a broken link), not a YAML preset file"
    return None


def read_yaml_mapping(path: Path) -> Dict[str, Any]:
    """A YAML mapping from a regular file of at most :data:`PRESET_MAX_BYTES`, or a one-line CertkdError."""
    path = Path(path)
    why = _not_a_preset(path)
    if why:
        raise CertkdError(f"preset {path} {why}; {_PRESET_FIX}")
    try:
        with open(path, "rb") as f:
            raw = f.read(PRESET_MAX_BYTES + 1)
    except OSError as e:
        raise CertkdError(f"cannot read preset {path} ({e.strerror}); make it readable or {_PRESET_FIX}") from None
    if len(raw) > PRESET_MAX_BYTES:
        raise CertkdError(f"preset {path} is larger than {PRESET_MAX_BYTES >> 20} MB, not a YAML preset file; "
                          f"{_PRESET_FIX}")
    return parse_yaml_mapping(raw, f"preset {path}")


def parse_yaml_mapping(raw: bytes, what: str) -> Dict[str, Any]:
    """The YAML mapping in ``raw`` (the bytes of ``what``, e.g. "preset mine.yaml"), or a one-line CertkdError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CertkdError(f"{what} is not a text file; {_PRESET_FIX}") from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:  # thousands of nested brackets: YAML's parser recurses
        raise CertkdError(f"{what} nests lists or mappings thousands of levels deep; fix the file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        name = what[len("preset "):] if what.startswith("preset ") else what
        raise CertkdError(f"invalid YAML in {name}{where}: {getattr(e, 'problem', e)}; fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CertkdError(f"{what} must be a YAML mapping of config keys to values (lines such as "
                          f"'method: cc-ibp'); fix the file or {_PRESET_FIX}")
    return data


def load_preset(name_or_path: str) -> Dict[str, Any]:
    """Preset values by name (``$CERTKD_CONFIG_DIR/NAME.yaml``, else the built-in ``certkd/presets/NAME.yaml``)
    or by path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and os.path.lexists(path):
        return read_yaml_mapping(path)
    candidate = _find_user_preset(name_or_path)
    if candidate is not None:
        return read_yaml_mapping(candidate)
    builtin = builtin_presets().get(name_or_path)
    if builtin is not None:
        return parse_yaml_mapping(builtin.read_bytes(), f"built-in preset {name_or_path}")
    if os.path.lexists(path):  # it exists, but is not a preset: say so rather than "does not exist"
        why = _not_a_preset(path) or "is not a YAML preset file (preset files end in .yaml or .yml)"
        raise CertkdError(f"preset {path} {why}; {_PRESET_FIX}")
    if path.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        raise CertkdError(f"preset file {path} does not exist; pass an existing YAML file or a preset name "
                          "('certkd presets' lists them)")
    presets = list_presets()
    listing = f"available: {', '.join(presets)}" if len(presets) <= 12 else \
        f"'certkd presets' lists all {len(presets)}"
    raise CertkdError(f"unknown preset '{name_or_path}'{did_you_mean(name_or_path, presets)}; "
                      f"{listing if presets else 'none found (is certkd installed completely?)'}")


__all__ = ["PRESET_MAX_BYTES", "builtin_presets", "config_dirs", "list_presets", "load_preset", "parse_yaml_mapping",
           "preset_description", "read_yaml_mapping"]
