"""Typed configuration, YAML presets and overrides.

Resolution order: :class:`TrainConfig` defaults (docs/method.md §3.2, §11: the paper's settings) ←
preset YAML (``certkd/presets/NAME.yaml``, package data) ← explicit overrides (CLI flags, ``--set key=value``).
The resolved config is written next to every run's outputs.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

from certkd.choices import eps_error
from certkd.errors import CertkdError
from certkd.methods import method_class, method_names
from certkd.options import OPTIONS, check_choice, did_you_mean
from certkd.presets import (PRESET_MAX_BYTES, builtin_presets, config_dirs, list_presets,  # noqa: F401 (re-exported)
                            load_preset, parse_yaml_mapping, preset_description, read_yaml_mapping)

# Derived from the registry of training methods (certkd.methods), in listing order.
CERTIFIED_METHODS = method_names("certified")
DISTILLATION_METHODS = method_names("distillation")
EMPIRICAL_METHODS = method_names("empirical")
METHODS = EMPIRICAL_METHODS + CERTIFIED_METHODS + DISTILLATION_METHODS
#: Seeds are integers in [0, MAX_SEED): what numpy's seeding accepts, and far inside torch.manual_seed's
#: range even as the per-epoch seed ``seed * 1000 + epoch`` of the batch order.
MAX_SEED = 2 ** 32


@dataclass
class TrainConfig:
    """One training run (teacher or student). Defaults follow docs/method.md §3.2, §5.6 and the MNIST row of §11."""

    # data
    dataset: str = "digits"
    data_dir: Optional[str] = None
    batch_size: int = 256
    augment: bool = True
    train_limit: Optional[int] = None   # train on N points: a fixed-seed (0) random subset, same for every run
    val_fraction: float = 0.0       # hold out the last fraction of the training set for validation (method.md §9)
    # model
    model: str = "cnn7"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    ibp_init: bool = True
    # objective
    method: str = "cc-ibp"
    alpha: float = 0.5              # over-approximation coefficient (ccibp/mtlibp/expibp/sabr λ)
    l1: float = 1e-5                # repo default of l1_coeff
    reg_lambda: float = 0.5         # warm-up regularisers λ (0 disables)
    reg_tol: float = 0.5            # τ
    trades_beta: float = 6.0
    crown_ibp_beta_start: float = 1.0   # CROWN-IBP bound weight at ε = 0 (docs/method.md §5.8)
    crown_ibp_beta_end: float = 0.0     # ... once ε reaches its target
    taps_head_relus: int = 1            # TAPS/STAPS split: top-level ReLU blocks in the classifier (§5.9)
    taps_steps: int = 8                 # latent PGD steps per class
    taps_step_size: float = 0.4         # latent PGD step, relative to the latent box half-width
    taps_link_slack: float = 0.5        # gradient connector slack c
    taps_grad_scale: float = 5.0        # gradient expanding factor w of the TAPS loss
    # distillation (docs/method.md §7)
    teacher: Optional[str] = None
    beta: float = 1.0
    dist_combination: str = "box"
    dist_distance: str = "l2sq"
    dist_reduction: str = "sum"
    dist_warmup: bool = True
    dist_target: str = "teacher"    # teacher: the teacher's clean features; zero: distil towards 0 (no teacher)
    feature_adapter: str = "none"   # linear: learned map student → teacher features, on the student's side
    kd_temperature: float = 4.0
    # ε schedule (docs/method.md §2.4, §3.1)
    eps: float = 0.1
    eps_start: int = 1              # S: first epoch of the ramp
    eps_length: int = 20            # N: ramp length in epochs
    train_eps_mul: float = 1.0
    attack_eps_factor: float = 1.0
    # training attack
    attack_steps: int = 1
    attack_step_size: float = 10.0
    attack_restarts: int = 1
    # optimisation
    epochs: int = 70
    optimizer: str = "adam"
    lr: float = 5e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_milestones: List[int] = field(default_factory=lambda: [50, 60])
    lr_gamma: float = 0.2
    grad_clip: float = 10.0
    # evaluation during training
    test_interval: int = 10
    test_attack_steps: int = 40
    test_attack_step_size: float = 0.1
    eval_limit: Optional[int] = None
    eval_batch_size: int = 256
    # runtime
    seed: int = 100
    device: str = "auto"
    allow_tf32: bool = False        # TF32 matmuls/convs in training (never in evaluation/verification)
    amp: bool = False               # bfloat16 autocast: the whole step of empirical methods, the attack only of certified ones
    compile: bool = False           # torch.compile of the model's forward (attack, clean forward); not bit-identical

    def validate(self) -> "TrainConfig":
        """Raise :class:`CertkdError` with a one-line message on the first invalid value.

        The keys with allowed values (method, dataset, model, ...) are checked against the option
        table (:mod:`certkd.options`); a model against the live model registry.
        """
        from certkd.models import model_kwargs_problem  # loads the model registry that check_choice reads

        for opt in OPTIONS:
            if opt.choices is not None:
                check_choice(opt.key, getattr(self, opt.key))
        if not (0.0 < self.eps <= 1.0):
            raise CertkdError(eps_error(self.eps))
        if not (0.0 <= self.alpha <= 1.0):
            raise CertkdError(f"alpha must be in [0, 1], got {self.alpha}; pass e.g. --alpha 0.5 (0: adversarial loss, 1: IBP)")
        if not self.beta >= 0:
            raise CertkdError(f"beta must be >= 0, got {self.beta}; pass e.g. --beta 0.01 (0 turns distillation off)")
        for name in ("batch_size", "epochs", "test_interval", "eval_batch_size", "attack_restarts"):
            if getattr(self, name) < 1:
                raise CertkdError(f"{name} must be >= 1, got {getattr(self, name)}; pass a positive integer")
        for name in ("l1", "reg_lambda", "train_eps_mul", "attack_eps_factor", "grad_clip", "weight_decay",
                     "trades_beta"):
            if not getattr(self, name) >= 0:  # also rejects NaN
                raise CertkdError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise CertkdError(f"lr must be > 0, got {self.lr}")
        if not (isinstance(self.seed, int) and 0 <= self.seed < MAX_SEED):
            raise CertkdError(f"seed must be an integer in [0, 2**32), got {self.seed}; pass e.g. --seed 0 "
                              "(torch and numpy both accept that range)")
        self._check_crown_ibp_taps()
        if self.eps_start < 1 or self.eps_length < 0:
            raise CertkdError("eps_start must be >= 1 and eps_length >= 0 (epochs)")
        if self.attack_steps < 0:
            raise CertkdError(f"attack_steps must be >= 0, got {self.attack_steps}")
        if self.dist_target == "zero" and self.feature_adapter != "none":
            raise CertkdError("dist_target zero with a feature adapter is trivial (the adapter maps everything to 0); "
                              "use --feature-adapter none")
        if self.method in DISTILLATION_METHODS:
            self._check_distillation()
        if self.eval_limit is not None and self.eval_limit < 1:
            raise CertkdError(f"eval_limit must be >= 1, got {self.eval_limit}; pass a positive number of points or leave it unset for all")
        if not (0.0 <= self.val_fraction < 1.0):
            raise CertkdError(f"val_fraction must be in [0, 1), got {self.val_fraction}; pass e.g. --set val_fraction=0.2 "
                              "(the last 20% of the training set validates, 0: no validation split)")
        if self.train_limit is not None and self.train_limit < 1:
            raise CertkdError(f"train_limit must be >= 1, got {self.train_limit}; pass a positive number of points or leave it unset for all")
        bad = model_kwargs_problem(self.model, self.model_kwargs)
        if bad:
            raise CertkdError(f"{bad[0]}; {bad[1]}")
        return self

    def _check_crown_ibp_taps(self) -> None:
        """The CROWN-IBP and TAPS keys (docs/method.md §5.8, §5.9), one line each."""
        for name in ("crown_ibp_beta_start", "crown_ibp_beta_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise CertkdError(f"{name} must be in [0, 1], got {getattr(self, name)}; it weighs the CROWN-IBP "
                                  "bound against the IBP bound, e.g. --set crown_ibp_beta_end=0")
        for name in ("taps_head_relus", "taps_steps"):
            if getattr(self, name) < 1:
                raise CertkdError(f"{name} must be >= 1, got {getattr(self, name)}; pass a positive integer")
        if not (0 < self.taps_step_size < math.inf and 0 < self.taps_grad_scale < math.inf):
            raise CertkdError(f"taps_step_size and taps_grad_scale must be finite and > 0, got "
                              f"{self.taps_step_size} and {self.taps_grad_scale}; e.g. --set taps_step_size=0.4 "
                              "--set taps_grad_scale=5")
        if not 0.0 < self.taps_link_slack <= 1.0:
            raise CertkdError(f"taps_link_slack must be in (0, 1], got {self.taps_link_slack}; e.g. "
                              "--set taps_link_slack=0.5")

    def _check_distillation(self) -> None:
        """The distillation settings that do not go together (docs/method.md §7.4, §7.9-§7.11), one line each."""
        target, dist = self.dist_target, self.dist_distance
        if not method_class(self.method).needs_teacher:  # cc-ibp-width: a penalty on the student's own box
            if self.teacher:
                raise CertkdError(f"method '{self.method}' penalises the student's feature box and uses no teacher; "
                                  "drop --teacher (or use cc-dist to distil one)")
            if target != "teacher":
                raise CertkdError(f"method '{self.method}' has no distillation target; drop --dist-target {target}")
            if dist in ("cosine", "standardized"):
                raise CertkdError(f"method '{self.method}' measures its box with l2sq, l1 or l2, not {dist}; "
                                  "pass --dist-distance l1 (summed widths) or l2sq")
            return
        if target != "teacher" and self.method == "cc-ibp-kd":
            raise CertkdError(f"dist_target {target} is for feature distillation; cc-ibp-kd distils a teacher's "
                              "logits: use another distillation method or dist_target teacher")
        if target == "teacher" and not self.teacher:
            raise CertkdError(f"method '{self.method}' distils a teacher: pass --teacher RUN_DIR "
                              "(train one with 'certkd teacher'), or --dist-target zero for the no-teacher control")
        if target == "class-mean" and not self.teacher:
            raise CertkdError("dist_target class-mean targets a teacher's mean feature of each class: pass "
                              "--teacher RUN_DIR (train one with 'certkd teacher')")
        if self.method == "cc-ibp-kd":
            return
        if dist == "standardized" and target == "zero":
            raise CertkdError("dist_distance standardized divides by the teacher's feature std and needs a teacher; "
                              "use dist_target teacher or class-mean, or another distance")
        if dist == "cosine":
            if target == "zero":
                raise CertkdError("the cosine distance to 0 is constant (1) and teaches nothing; use dist_target "
                                  "teacher or class-mean, or another distance with dist_target zero")
            if self.dist_reduction != "sum":
                raise CertkdError("the cosine distance is one number per sample, reduced over no feature: use "
                                  "dist_reduction sum (the default)")
            if self.dist_combination != "box":
                raise CertkdError(f"the cosine distance has no '{self.dist_combination}' combination (no worst-case "
                                  "point per feature): use --dist-combination box (the default)")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        return apply_overrides(cls(), values)


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, with a one-line error."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        hint = [a for a in args if a is not type(None)][0]
        origin, args = get_origin(hint), get_args(hint)
    try:
        if hint is bool:
            if isinstance(value, str):
                low = value.lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return low in ("true", "1", "yes")
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if hint is float:
            return parse_number(value) if isinstance(value, str) else float(value)
        if hint is str:
            return str(value)
        if origin in (list, List):
            if isinstance(value, str):
                value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
            return [_coerce(name, args[0], v) for v in value]
        if origin in (dict, Dict):
            if isinstance(value, str):
                try:
                    value = yaml.safe_load(value) or {}
                except (yaml.YAMLError, RecursionError):
                    raise ValueError from None
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (TypeError, ValueError, ZeroDivisionError):
        raise CertkdError(f"invalid value {value!r} for '{name}': expected {getattr(hint, '__name__', hint)}") from None
    return value


def parse_number(text: Union[str, float, int]) -> float:
    """A float from ``0.1``, ``1e-3`` or a fraction ``2/255`` (the usual way to write image radii).

    Raises:
        ValueError: for anything else (callers turn it into a one-line error).
    """
    if not isinstance(text, str):
        return float(text)
    s = text.strip()
    if s.count("/") == 1:
        num, den = (part.strip() for part in s.split("/"))
        value = float(num) / float(den)  # ZeroDivisionError is a ValueError to the caller
    else:
        value = float(s)
    return value


def _yaml_problem(e: yaml.YAMLError) -> str:
    return str(getattr(e, "problem", None) or e).strip().splitlines()[0]


#: Deepest nesting of lists/mappings a ``--set`` value may have: config values are at most two levels
#: deep (``model_kwargs={hidden: [32, 32]}``); thousands of levels crash YAML's recursive parser.
MAX_SET_DEPTH = 16


def _depth(value: Any) -> int:
    """Nesting depth of lists/mappings in ``value`` (0 for a scalar), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, tuple, dict)):
            deepest = max(deepest, d + 1)
            if d + 1 <= MAX_SET_DEPTH:  # deeper than the limit is already refused: stop walking
                stack.extend((x, d + 1) for x in (list(v.keys()) + list(v.values()) if isinstance(v, dict) else v))
    return deepest


def parse_set_value(key: str, raw: str) -> Any:
    """The YAML value of ``--set KEY=RAW`` (None for an empty RAW), or a one-line CertkdError
    (invalid YAML, or lists/mappings nested more than :data:`MAX_SET_DEPTH` levels)."""
    if not raw.strip():
        return None
    shown = raw if len(raw) <= 40 else raw[:40] + "…"
    too_deep = CertkdError(f"--set {key}={shown}: nested more than {MAX_SET_DEPTH} levels deep; write a flat value, "
                           "e.g. --set 'model_kwargs={hidden: [32, 32]}'")
    try:
        value = yaml.safe_load(raw)
    except RecursionError:
        raise too_deep from None
    except yaml.YAMLError as e:
        raise CertkdError(f"--set {key}={shown}: not a valid YAML value ({_yaml_problem(e)}); close the brackets or "
                          f"quote the value, e.g. --set 'alpha=0.5' or --set 'model_kwargs={{hidden: [32, 32]}}'") from None
    if _depth(value) > MAX_SET_DEPTH:
        raise too_deep
    return value


def parse_sets(sets: Union[None, Sequence[str], Mapping[str, Any]]) -> Dict[str, Any]:
    """``--set KEY=VALUE`` items (VALUE is YAML) → ``{key: value}``; a mapping is returned as a dict.

    The one parser of ``certkd train/teacher --set`` and ``certkd sweep --set``.
    """
    if not sets:
        return {}
    if isinstance(sets, Mapping):
        return dict(sets)
    values: Dict[str, Any] = {}
    for item in sets:
        if "=" not in item:
            raise CertkdError(f"--set expects KEY=VALUE, got '{item}'; write e.g. --set alpha=0.5")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise CertkdError(f"--set '{item}' has no key before '='; write e.g. --set alpha=0.5")
        values[key] = parse_set_value(key, raw)
    return values


def apply_overrides(cfg: TrainConfig, values: Mapping[str, Any]) -> TrainConfig:
    """Return a copy of ``cfg`` with ``values`` applied (keys may use '-' or '_')."""
    hints = get_type_hints(TrainConfig)
    names = [f.name for f in fields(TrainConfig)]
    updates = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in hints:
            raise CertkdError(f"unknown config key '{key}'{did_you_mean(name, names)}; "
                              "'certkd train --help' and certkd.config.TrainConfig list the keys")
        updates[name] = _coerce(name, hints[name], value)
    return dataclasses.replace(cfg, **updates)


#: Keys of the training schedule that follow ``epochs`` (:func:`rescale_schedule`).
SCHEDULE_KEYS = ("eps_start", "eps_length", "lr_milestones")


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def rescale_schedule(cfg: TrainConfig, epochs: int, keep: Sequence[str] = ()) -> TrainConfig:
    """``cfg`` trained for ``epochs`` epochs, with its schedule stretched by ``epochs / cfg.epochs``.

    The warm-up before the ε ramp (``eps_start - 1`` epochs), the ramp length ``eps_length`` and the
    learning-rate milestones scale with the number of epochs, rounded to whole epochs, so that a
    shorter run still reaches its target ε (by epoch ``eps_start + eps_length - 1 <= epochs``) and
    decays its learning rate at the same fractions of training. A ramp keeps at least one epoch.
    Keys in ``keep`` (set explicitly by the user) are left as they are.
    """
    old = cfg.epochs
    if epochs == old or old < 1 or epochs < 1:
        return dataclasses.replace(cfg, epochs=epochs)
    r = epochs / old
    updates: Dict[str, Any] = {"epochs": epochs}
    start, length = cfg.eps_start, cfg.eps_length
    if "eps_start" not in keep:
        start = 1 + _round_half_up((cfg.eps_start - 1) * r)
    if "eps_length" not in keep and cfg.eps_length > 0:
        length = max(1, _round_half_up(cfg.eps_length * r))
        if cfg.eps_start + cfg.eps_length - 1 <= old:  # the ramp ended within training: keep it so
            length = max(1, min(length, epochs - start + 1))
    if "eps_start" not in keep and length > 0 and start + length - 1 > epochs and cfg.eps_start + cfg.eps_length - 1 <= old:
        start = max(1, epochs - length + 1)
    updates["eps_start"], updates["eps_length"] = start, length
    if "lr_milestones" not in keep:
        updates["lr_milestones"] = [max(1, _round_half_up(m * r)) for m in cfg.lr_milestones]
    return dataclasses.replace(cfg, **updates)


def _apply_layer(cfg: TrainConfig, values: Mapping[str, Any]) -> TrainConfig:
    """``apply_overrides``, and when ``values`` change ``epochs`` the schedule keys they do not set follow it."""
    new = apply_overrides(cfg, values)
    if new.epochs == cfg.epochs:
        return new
    given = {str(k).replace("-", "_") for k in values}
    return dataclasses.replace(new, **{k: getattr(rescale_schedule(cfg, new.epochs, keep=[k for k in SCHEDULE_KEYS
                                                                                           if k in given]), k)
                                       for k in SCHEDULE_KEYS if k not in given})


def resolve_config(preset: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None,
                   teacher: bool = False) -> TrainConfig:
    """defaults ← preset ← overrides, then validate.

    When a layer (the preset, or the overrides) changes ``epochs``, the ε-ramp start and length and
    the learning-rate milestones it does not set itself are rescaled to the new number of epochs
    (:func:`rescale_schedule`): ``--epochs 5`` on a 70-epoch recipe still reaches the target ε and
    decays the learning rate; an explicit ``--set eps_length=...`` (or milestones, start) wins.

    With ``teacher=True`` (the ``certkd teacher`` command) :func:`teacher_defaults` apply too:
    below a teacher preset (method standard/pgd-at/trades), above a student preset, so that
    ``certkd teacher --preset mnist-0.1-cpu`` trains a PGD-AT teacher at the student's ε.
    """
    return _resolve(preset, overrides, teacher).validate()


def base_config(preset: Optional[str] = None, teacher: bool = False, method: Optional[str] = None) -> TrainConfig:
    """defaults ← preset (← teacher defaults, with the attack of ``method``, the one the overrides will
    set, if any), unvalidated: what ``resolve_config`` starts from before the overrides (and what
    ``--epochs`` rescales the schedule against)."""
    return _resolve(preset, None, teacher, method)


def _resolve(preset: Optional[str], overrides: Optional[Mapping[str, Any]], teacher: bool,
             method: Optional[str] = None) -> TrainConfig:
    cfg = TrainConfig()
    values = load_preset(preset) if preset else {}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if teacher:
        defaults = teacher_defaults(method or overrides.get("method") or values.get("method"))
        if values.get("method", "pgd-at") in EMPIRICAL_METHODS:
            cfg = _apply_layer(_apply_layer(cfg, defaults), values)
        else:
            cfg = _apply_layer(_apply_layer(cfg, values), defaults)
    else:
        cfg = _apply_layer(cfg, values)
    if overrides:
        cfg = _apply_layer(cfg, overrides)
    return cfg


# Defaults of ``certkd teacher`` (docs/method.md §5.7): PGD-AT at the target ε; the attack is the method's own.
TEACHER_DEFAULTS: Dict[str, Any] = {"method": "pgd-at", "train_eps_mul": 1.0, "ibp_init": False, "l1": 0.0,
                                    "reg_lambda": 0.0, "eps_length": 0}


def teacher_defaults(method: Optional[str]) -> Dict[str, Any]:
    """:data:`TEACHER_DEFAULTS` with the attack that the teacher's method declares
    (:attr:`certkd.methods.Method.attack`; none for ``standard``, so its config keeps the attack keys
    it would have without ``certkd teacher``). ``method``: the one asked for, else a teacher preset's, else pgd-at."""
    method = method if method in EMPIRICAL_METHODS else TEACHER_DEFAULTS["method"]
    return dict(TEACHER_DEFAULTS, **method_class(method).attack)
