"""The search space of ``certkd tune`` (docs/tune.md §2): a YAML mapping of config keys to ranges or choices.

.. code-block:: yaml

    lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # a float range on a log scale
    epochs: {low: 2, high: 6}                    # an int range (the key's type is int)
    alpha: {low: 0.1, high: 0.9, step: 0.2}      # a float range on a grid
    method: {choices: [cc-ibp, mtl-ibp]}         # choices, of any type the key takes
    model_kwargs: {choices: [{hidden: [32]}, {hidden: [64, 64]}]}

Any :class:`certkd.config.TrainConfig` key may appear; ranges only for int and float keys. Choices that
are lists or mappings are shown to Optuna as their flow-YAML text (Optuna's categorical values are
scalars) and turned back into values for the config. Every mistake is a one-line CertkdError.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union, get_args, get_origin, get_type_hints

import yaml

from certkd.config import PRESET_MAX_BYTES, TrainConfig, apply_overrides, parse_number, parse_yaml_mapping
from certkd.errors import CertkdError
from certkd.options import did_you_mean

_FIELDS = ("low", "high", "log", "step", "choices")
#: Keys a space may not search: the validation split is what every trial is measured on.
FIXED_KEYS = {"val_fraction": "the validation split is the data every trial is measured on; set it once with "
                              "--set val_fraction=..."}
_EXAMPLE = "e.g. 'lr: {low: 1.0e-4, high: 1.0e-2, log: true}' or 'method: {choices: [cc-ibp, mtl-ibp]}'"


@dataclass(frozen=True)
class Param:
    """One searched key: a ``float`` or ``int`` range (``low``..``high``, ``log`` scale or a ``step``)
    or ``categorical`` ``choices``."""

    key: str
    kind: str
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: Tuple[Any, ...] = ()

    def labels(self) -> Tuple[Any, ...]:
        """The choices as Optuna sees them: scalars as they are, lists and mappings as flow-YAML text."""
        return tuple(_label(c) for c in self.choices)

    def suggest(self, trial: Any) -> Any:
        """This key's value for an Optuna ``trial`` (recorded under the key's name)."""
        if self.kind == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log,
                                     step=int(self.step or 1))
        labels = self.labels()
        return self.choices[labels.index(trial.suggest_categorical(self.key, labels))]

    def value_of(self, recorded: Any) -> Any:
        """The config value of a value Optuna recorded for this key (a choice's label back to the choice)."""
        if self.kind != "categorical":
            return recorded
        return self.choices[self.labels().index(recorded)]

    def extremes(self) -> Tuple[Any, ...]:
        """The values that bound this key: both ends of a range, or every choice."""
        if self.kind == "categorical":
            return self.choices
        cast = int if self.kind == "int" else float
        return cast(self.low), cast(self.high)

    def to_dict(self) -> Dict[str, Any]:
        if self.kind == "categorical":
            return {"choices": list(self.choices)}
        d: Dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            d["log"] = True
        if self.step is not None:
            d["step"] = self.step
        return d


@dataclass(frozen=True)
class SearchSpace:
    """The searched keys, in the file's order."""

    params: Tuple[Param, ...]

    def suggest(self, trial: Any) -> Dict[str, Any]:
        """``{key: value}`` overrides of one trial."""
        return {p.key: p.suggest(trial) for p in self.params}

    def values_of(self, recorded: Mapping[str, Any]) -> Dict[str, Any]:
        """The overrides of a trial from Optuna's recorded ``params``."""
        by_key = {p.key: p for p in self.params}
        return {k: by_key[k].value_of(v) if k in by_key else v for k, v in recorded.items()}

    def to_dict(self) -> Dict[str, Any]:
        """The space as the YAML mapping it was parsed from (normalised)."""
        return {p.key: p.to_dict() for p in self.params}

    def check(self, base: TrainConfig) -> None:
        """Validate ``base`` with each end of every range and each choice: a bound no trial could train
        with (``alpha: {high: 2}``) fails now, in one line, not in a trial."""
        for p in self.params:
            for value in p.extremes():
                try:
                    apply_overrides(base, {p.key: value}).validate()
                except CertkdError as e:
                    raise CertkdError(f"search space: {p.key}={_label(value)} is not a valid config: {e}") from None


def _label(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10 ** 6).strip()


def _field_type(key: str) -> Any:
    hint = get_type_hints(TrainConfig)[key]
    if get_origin(hint) is Union:  # Optional[X]
        hint = next(a for a in get_args(hint) if a is not type(None))
    return hint


def _number(where: str, name: str, value: Any, integer: bool) -> float:
    if isinstance(value, bool) or value is None:
        raise CertkdError(f"{where}: {name} must be a number, got {value!r}")
    try:
        x = parse_number(value) if isinstance(value, str) else float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        raise CertkdError(f"{where}: {name} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise CertkdError(f"{where}: {name} must be finite, got {value!r}")
    if integer and not x.is_integer():
        raise CertkdError(f"{where}: {name} must be an integer (the key is an int), got {value!r}")
    return x


def _param(key: str, spec: Any, source: str) -> Param:
    where = f"search space {source}: '{key}'"
    if not isinstance(spec, dict):
        raise CertkdError(f"{where}: write a range {{low: A, high: B}} (optionally log: true or step: S) or "
                          f"{{choices: [...]}}, not {spec!r}")
    for name in spec:
        if name not in _FIELDS:
            raise CertkdError(f"{where}: unknown field '{name}'{did_you_mean(str(name), _FIELDS)}; the fields are "
                              f"{', '.join(_FIELDS)}")
    if "choices" in spec:
        if set(spec) != {"choices"}:
            raise CertkdError(f"{where}: give either choices or a range (low, high, log, step), not both")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise CertkdError(f"{where}: choices must be a non-empty list, got {choices!r}")
        labels = [_label(c) for c in choices]
        dup = next((c for i, c in enumerate(labels) if c in labels[:i]), None)
        if dup is not None:
            raise CertkdError(f"{where}: the choice {dup!r} is listed twice")
        for c in choices:
            apply_overrides(TrainConfig(), {key: c})  # a value of the wrong type fails here, in one line
        return Param(key, "categorical", choices=tuple(choices))
    ftype = _field_type(key)
    if ftype not in (int, float):
        raise CertkdError(f"{where}: a range needs an int or float key, and '{key}' is not one; list its values "
                          f"as {{choices: [...]}}")
    missing = [n for n in ("low", "high") if n not in spec]
    if missing:
        raise CertkdError(f"{where}: a range needs low and high ({' and '.join(missing)} missing)")
    integer = ftype is int
    low, high = (_number(where, n, spec[n], integer) for n in ("low", "high"))
    if not low < high:
        raise CertkdError(f"{where}: low ({spec['low']}) must be below high ({spec['high']})")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise CertkdError(f"{where}: log must be true or false, got {log!r}")
    if log and low <= 0:
        raise CertkdError(f"{where}: a log scale needs low > 0, got {spec['low']}")
    step = None
    if "step" in spec:
        if log:
            raise CertkdError(f"{where}: give log or step, not both (Optuna samples a log range without a grid)")
        step = _number(where, "step", spec["step"], integer)
        if not step > 0:
            raise CertkdError(f"{where}: step must be > 0, got {spec['step']}")
    return Param(key, "int" if integer else "float", low, high, log, step)


def parse_space(values: Any, source: str = "") -> SearchSpace:
    """A :class:`SearchSpace` from a YAML mapping (``source`` names the file in errors)."""
    if not isinstance(values, dict) or not values:
        raise CertkdError(f"search space {source}: expected a mapping of config keys to ranges or choices, "
                          f"{_EXAMPLE}")
    names = list(get_type_hints(TrainConfig))
    params = []
    for key, spec in values.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise CertkdError(f"search space {source}: unknown config key '{key}'{did_you_mean(name, names)}; "
                              "'certkd train --help' lists the keys")
        if name in FIXED_KEYS:
            raise CertkdError(f"search space {source}: '{key}' cannot be searched: {FIXED_KEYS[name]}")
        params.append(_param(name, spec, source))
    return SearchSpace(tuple(params))


def load_space(path: Union[str, Path]) -> SearchSpace:
    """Read a search-space YAML file (one-line errors for a missing or broken file)."""
    p = Path(path)
    if not p.is_file():
        raise CertkdError(f"search space {p} is not a file; pass --space FILE.yaml, a YAML mapping {_EXAMPLE}")
    try:
        with open(p, "rb") as f:
            raw = f.read(PRESET_MAX_BYTES + 1)
    except OSError as e:
        raise CertkdError(f"cannot read search space {p} ({e.strerror}); make it readable") from None
    if len(raw) > PRESET_MAX_BYTES:
        raise CertkdError(f"search space {p} is larger than {PRESET_MAX_BYTES >> 20} MB; pass a YAML file {_EXAMPLE}")
    return parse_space(parse_yaml_mapping(raw, f"search space {p}") or None, str(p))
