"""Tests for certkd.config: defaults, presets, overrides and validation."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from certkd.config import (DISTILLATION_METHODS, METHODS, TEACHER_DEFAULTS, TrainConfig, apply_overrides,
                           list_presets, load_preset, resolve_config)
from certkd.errors import CertkdError
from certkd.methods import method_class

CONFIG_DIR = Path(__file__).resolve().parents[1] / "src" / "certkd" / "presets"
PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def test_repository_has_presets():
    assert PRESETS, "src/certkd/presets/ should hold at least one preset"
    assert set(PRESETS) <= set(list_presets())


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_validates(name):
    values = load_preset(name)
    assert isinstance(values, dict) and values
    overrides = {"teacher": "some/run"} if values.get("method") in DISTILLATION_METHODS else None
    cfg = resolve_config(name, overrides)
    assert isinstance(cfg, TrainConfig)
    for key, value in values.items():
        got = getattr(cfg, key.replace("-", "_"))
        if isinstance(got, float):
            assert got == pytest.approx(float(value))
        elif isinstance(got, list):
            assert got == list(value)
        else:
            assert got == value or str(got) == str(value)


def test_preset_by_path(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("eps: 0.2\nmodel: mlp\n")
    cfg = resolve_config(str(p))
    assert cfg.eps == 0.2 and cfg.model == "mlp"


def test_preset_from_env_dir(tmp_path, monkeypatch):
    (tmp_path / "zz-env-preset.yaml").write_text("alpha: 0.25\n")
    monkeypatch.setenv("CERTKD_CONFIG_DIR", str(tmp_path))
    assert "zz-env-preset" in list_presets()
    assert resolve_config("zz-env-preset").alpha == 0.25


def test_unknown_preset_did_you_mean():
    if "digits-small" not in PRESETS:
        pytest.skip("digits-small preset missing")
    with pytest.raises(CertkdError, match="did you mean 'digits-small'"):
        load_preset("digits-smal")


def test_invalid_yaml_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("eps: [0.1\nalpha: 2\n")
    with pytest.raises(CertkdError, match="invalid YAML"):
        load_preset(str(bad))
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(CertkdError, match="mapping"):
        load_preset(str(lst))


def test_defaults_follow_spec():
    cfg = TrainConfig().validate()
    assert (cfg.lr, cfg.lr_gamma, cfg.grad_clip, cfg.seed) == (5e-4, 0.2, 10.0, 100)
    assert (cfg.l1, cfg.reg_lambda, cfg.reg_tol, cfg.weight_decay) == (1e-5, 0.5, 0.5, 0.0)
    assert cfg.optimizer == "adam"


def test_teacher_defaults_validate():
    cfg = resolve_config(teacher=True)
    assert cfg.method == "pgd-at" and cfg.ibp_init is False and cfg.eps_length == 0


def test_teacher_defaults_win_over_a_student_preset_but_not_over_flags():
    cfg = resolve_config("digits-small", teacher=True)
    assert cfg.method == "pgd-at" and (cfg.attack_steps, cfg.attack_step_size) == (10, 0.25)
    assert cfg.eps == 0.05 and cfg.model == "cnn-small"  # the student's task is kept
    assert resolve_config("digits-small", {"method": "trades", "attack_steps": 3}, teacher=True).attack_steps == 3


def test_a_teachers_attack_is_its_methods_own(tmp_path):
    """PGD-AT and TRADES bring Madry's attack (10 steps of 0.25); a standard teacher, which attacks
    nothing, records the attack keys it would have without certkd teacher; an old config.yaml of a
    standard teacher, with the attack the teacher defaults used to add, still loads and is reproduced."""
    from certkd.methods import method_class
    from certkd.reporting import train_command
    from certkd.runs import read_config, write_config

    assert not any(k.startswith("attack") for k in TEACHER_DEFAULTS)
    plain = TrainConfig()
    for method in ("pgd-at", "trades"):
        cfg = resolve_config(None, {"method": method}, teacher=True)
        assert dict(method_class(method).attack) == {"attack_steps": 10, "attack_step_size": 0.25,
                                                     "attack_eps_factor": 1.0}
        assert (cfg.attack_steps, cfg.attack_step_size) == (10, 0.25)
    std = resolve_config(None, {"method": "standard"}, teacher=True)
    assert (std.attack_steps, std.attack_step_size) == (plain.attack_steps, plain.attack_step_size)
    assert resolve_config("digits-small", {"method": "standard"}, teacher=True).attack_steps == \
        resolve_config("digits-small").attack_steps  # the preset's own keys, untouched
    assert train_command(std, "runs/t") == "certkd teacher --method standard --out runs/t"
    old = apply_overrides(std, {"attack_steps": 10, "attack_step_size": 0.25})
    write_config(tmp_path, old)
    assert read_config(tmp_path) == old
    assert train_command(old, "runs/t") == ("certkd teacher --method standard --set attack_steps=10 "
                                            "--set attack_step_size=0.25 --out runs/t")


# --------------------------------------------------------------------------- overrides

def test_overrides_coerce_types():
    cfg = apply_overrides(TrainConfig(), {"eps": "0.1", "lr_milestones": "[1,2]", "epochs": "7",
                                          "augment": "false", "teacher": "none", "alpha": "1e-2",
                                          "model_kwargs": "{width: 8, linear: 32}"})
    assert cfg.eps == 0.1 and isinstance(cfg.eps, float)
    assert cfg.lr_milestones == [1, 2] and all(isinstance(m, int) for m in cfg.lr_milestones)
    assert cfg.epochs == 7 and isinstance(cfg.epochs, int)
    assert cfg.augment is False
    assert cfg.teacher is None
    assert cfg.alpha == 0.01
    assert cfg.model_kwargs == {"width": 8, "linear": 32}


def test_overrides_accept_dashes_and_native_values():
    cfg = apply_overrides(TrainConfig(), {"lr-milestones": [3, 4], "attack-step-size": 1, "eval_limit": "null"})
    assert cfg.lr_milestones == [3, 4]
    assert cfg.attack_step_size == 1.0 and isinstance(cfg.attack_step_size, float)
    assert cfg.eval_limit is None


def test_overrides_do_not_mutate_input():
    base = TrainConfig()
    out = apply_overrides(base, {"eps": 0.3})
    assert base.eps == 0.1 and out.eps == 0.3


def test_empty_list_override():
    assert apply_overrides(TrainConfig(), {"lr_milestones": "[]"}).lr_milestones == []


@pytest.mark.parametrize("key, value", [("epochs", "ten"), ("epochs", 2.5), ("augment", "maybe"),
                                        ("eps", "abc"), ("lr_milestones", "[1, x]"), ("model_kwargs", "[1, 2]")])
def test_bad_override_values_name_the_key(key, value):
    with pytest.raises(CertkdError, match=f"'{key}'"):
        apply_overrides(TrainConfig(), {key: value})


def test_unknown_key_did_you_mean():
    with pytest.raises(CertkdError) as e:
        apply_overrides(TrainConfig(), {"alpah": 0.1})
    assert "unknown config key 'alpah'" in str(e.value)
    assert "did you mean 'alpha'" in str(e.value)


def test_unknown_key_via_resolve_and_dashes():
    with pytest.raises(CertkdError, match="did you mean 'train_eps_mul'"):
        resolve_config(overrides={"train-eps-mull": 2.0})


def test_resolve_ignores_none_overrides():
    cfg = resolve_config(overrides={"eps": None, "alpha": 0.2})
    assert cfg.eps == TrainConfig().eps and cfg.alpha == 0.2


def test_dict_roundtrip():
    cfg = apply_overrides(TrainConfig(), {"eps": 0.3, "lr_milestones": [5], "model_kwargs": {"width": 4}})
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again == cfg


# --------------------------------------------------------------------------- validation

@pytest.mark.parametrize("eps", [0.0, -0.1, 1.5, float("nan")])
def test_invalid_eps(eps):
    with pytest.raises(CertkdError, match="eps"):
        resolve_config(overrides={"eps": eps})


def test_eps_one_is_valid():
    assert resolve_config(overrides={"eps": 1.0}).eps == 1.0


@pytest.mark.parametrize("alpha", [1.5, -0.01])
def test_invalid_alpha(alpha):
    with pytest.raises(CertkdError, match="alpha"):
        resolve_config(overrides={"alpha": alpha})


def test_unknown_method_did_you_mean():
    with pytest.raises(CertkdError) as e:
        resolve_config(overrides={"method": "cc-ibpp"})
    assert "unknown method 'cc-ibpp'" in str(e.value) and "did you mean 'cc-ibp'" in str(e.value)


@pytest.mark.parametrize("key, value", [("batch_size", 0), ("epochs", 0), ("l1", -1e-5), ("lr", 0.0),
                                        ("beta", -1.0), ("attack_steps", -1), ("optimizer", "rmsprop"),
                                        ("dist_combination", "foo"), ("dist_distance", "l3"),
                                        ("eps_start", 0), ("attack_restarts", 0), ("eval_limit", 0),
                                        ("train_limit", 0)])
def test_invalid_values_name_the_problem(key, value):
    with pytest.raises(CertkdError, match=key):
        resolve_config(overrides={key: value})


@pytest.mark.parametrize("method", [m for m in DISTILLATION_METHODS if method_class(m).needs_teacher])
def test_distillation_without_teacher_raises(method):
    with pytest.raises(CertkdError, match="teacher"):
        resolve_config(overrides={"method": method})
    assert resolve_config(overrides={"method": method, "teacher": "runs/t"}).teacher == "runs/t"


@pytest.mark.parametrize("method", [m for m in METHODS if not method_class(m).needs_teacher])
def test_other_methods_need_no_teacher(method):
    assert resolve_config(overrides={"method": method}).method == method


@pytest.mark.parametrize("key", ["lr", "beta", "l1"])
def test_nan_values_are_rejected(key):
    with pytest.raises(CertkdError, match=key):
        resolve_config(overrides={key: "nan"})


def test_validate_returns_self():
    cfg = TrainConfig()
    assert cfg.validate() is cfg
    assert dataclasses.is_dataclass(cfg)


@pytest.mark.parametrize("method", ["cc-ibp", "ibp", "sabr", "cc-dist"])
def test_amp_is_accepted_for_certified_methods_where_it_covers_the_attack_only(method):
    cfg = TrainConfig(method=method, amp=True, teacher="some/run")
    assert cfg.validate().amp is True  # tests/training/test_amp.py: bounds and loss stay float32


@pytest.mark.parametrize("method", ["standard", "pgd-at", "trades"])
def test_amp_is_accepted_for_empirical_methods_and_tf32_off_by_default(method):
    cfg = resolve_config("digits-small", {"method": method, "amp": "true"})
    assert cfg.amp is True and cfg.allow_tf32 is False
    assert resolve_config("digits-small", {"allow_tf32": True}).allow_tf32 is True
