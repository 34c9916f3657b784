"""The option table (certkd.options): the CLI, validate() and reproduced commands all come from it."""
from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
from collections import Counter

import click
import pytest

from certkd import choices
from certkd.cli import cli, main
from certkd.config import TrainConfig, resolve_config
from certkd.errors import CertkdError
from certkd.methods import method_names
from certkd.options import OPTIONS, command_options, option
from certkd.run_plan import TrainRequest

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


def _params(command: str):
    return {p.name: p for p in cli.commands[command].params}


def _one_error_line(capsys, argv, code=2):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------------- the table

def test_every_config_field_is_in_the_table_once_and_every_entry_is_a_field():
    keys = [o.key for o in OPTIONS]
    assert [k for k, n in Counter(keys).items() if n > 1] == []
    assert keys == FIELDS  # one entry per field, in the field order
    flags = [o.flag for o in OPTIONS if o.flag]
    assert len(flags) == len(set(flags))
    assert all(o.help.strip() and o.scope in ("both", "student") for o in OPTIONS)


@pytest.mark.parametrize("command", ["train", "teacher"])
def test_the_cli_options_are_the_tables(command):
    params = _params(command)
    config_params = {name for name in params if name in FIELDS}
    assert config_params == {o.key for o in command_options(command, flagged=True)}
    for o in command_options(command, flagged=True):
        assert o.flag in params[o.key].opts
        if o.choices is not None:
            assert isinstance(params[o.key].type, click.Choice)
            assert tuple(params[o.key].type.choices) == o.allowed(command)


def test_static_names_match_the_registries():
    """certkd.choices keeps torch-free copies of names whose registries import torch."""
    from certkd.data.registry import DATASETS, _REGISTRY
    from certkd.models import list_models

    assert choices.DATASETS == tuple(DATASETS) == tuple(_REGISTRY)
    assert choices.MODELS == tuple(list_models())


def test_verify_engines_are_the_listed_ones():
    from certkd.verification.pipeline import VerifyConfig

    for engine in choices.ENGINES:
        VerifyConfig(eps=0.1, engine=engine).validate()
    with pytest.raises(CertkdError, match="unknown engine 'lp'; choose one of: " + ", ".join(choices.ENGINES)):
        VerifyConfig(eps=0.1, engine="lp").validate()


def test_distillation_losses_accept_exactly_the_listed_names():
    """The distillation settings come from certkd.choices: each listed name works (and each combination
    is its own formula, not a fall-through), an unlisted one is refused with the listed names."""
    import torch

    from certkd.losses.distillation import DISTANCES, DistillationError, cc_dist_distance

    # the losses compute every listed distance but standardized (l2sq after the method's scaling)
    assert DISTANCES + ("standardized",) == choices.DIST_DISTANCES
    g = torch.Generator().manual_seed(0)
    lo = torch.rand(3, 5, generator=g)
    hi = lo + torch.rand(3, 5, generator=g) + 0.1
    a, t = lo + (hi - lo) * torch.rand(3, 5, generator=g), torch.rand(3, 5, generator=g) * 2
    values = {}
    for c in choices.DIST_COMBINATIONS:
        for d in DISTANCES:
            for r in choices.DIST_REDUCTIONS:
                if d == "cosine" and (c != "box" or r != "sum"):  # refused: tests/losses/test_cosine.py
                    with pytest.raises(DistillationError):
                        cc_dist_distance(a, lo, hi, t, 0.5, combination=c, distance=d, reduction=r)
                    continue
                values[c, d, r] = cc_dist_distance(a, lo, hi, t, 0.5, combination=c, distance=d, reduction=r)
                assert torch.isfinite(values[c, d, r]).all()
    for d in DISTANCES:
        if d == "cosine":
            continue
        distinct = {tuple(values[c, d, "sum"].tolist()) for c in choices.DIST_COMBINATIONS}
        assert len(distinct) == len(choices.DIST_COMBINATIONS), d
    for key, bad, listed in (("combination", "interval", choices.DIST_COMBINATIONS),
                             ("distance", "linf", DISTANCES),
                             ("reduction", "max", choices.DIST_REDUCTIONS)):
        with pytest.raises(DistillationError) as e:
            cc_dist_distance(a, lo, hi, t, 0.5, **{key: bad})
        assert str(e.value) == f"unknown {key} {bad!r}; expected one of {', '.join(listed)}"


def test_method_choices_come_from_the_registry():
    assert option("method").allowed("train") == method_names()
    assert option("method").allowed("teacher") == method_names("empirical")


# ------------------------------------------------------------------------------------- help

def test_train_help_lists_every_registered_method_and_the_set_only_keys(capsys):
    main(["train", "--help"])
    out = capsys.readouterr().out
    assert "[" + "|".join(method_names()) + "]" in out
    for o in command_options("train", flagged=False):
        assert f"\n  {o.key} " in out, o.key


def test_teacher_help_shows_teacher_options_only(capsys):
    main(["teacher", "--help"])
    out = capsys.readouterr().out
    for flag in ("--eps", "--method", "--epochs", "--dataset", "--model", "--amp"):
        assert flag in out
    for flag in ("--alpha", "--beta", "--teacher", "--dist-combination", "--dist-target", "--feature-adapter"):
        assert flag not in out
    assert "[" + "|".join(method_names("empirical")) + "]" in out and "cc-dist" not in out
    assert "dist_distance" not in out and "kd_temperature" not in out and "trades_beta" in out


def test_choices_complete_on_tab():
    ctx = cli.commands["train"].make_context("train", ["--out", "x"], resilient_parsing=True)
    got = [c.value for c in _params("train")["method"].type.shell_complete(ctx, _params("train")["method"], "cc-")]
    assert got == [m for m in method_names() if m.startswith("cc-")]


@pytest.mark.parametrize("argv", [["teacher", "--help"], ["verify", "--help"]])
def test_help_does_not_import_torch(argv):
    code = ("import sys\nfrom certkd.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n" % (argv,))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------------- mistakes

def test_bad_method_is_one_line_naming_the_allowed_values(tmp_path, capsys):
    err = _one_error_line(capsys, ["train", "--method", "cc-ibpp", "--out", str(tmp_path / "a")])
    assert "unknown method 'cc-ibpp' (did you mean 'cc-ibp'?)" in err
    assert "choose one of: " + ", ".join(method_names()) in err
    err = _one_error_line(capsys, ["teacher", "--method", "cc-ibp", "--out", str(tmp_path / "a")])
    assert "choose one of: " + ", ".join(method_names("empirical")) in err
    err = _one_error_line(capsys, ["verify", str(tmp_path), "--engine", "bb"])
    assert "unknown engine 'bb' (did you mean 'bab'?); choose one of: bab, milp, none" in err


@pytest.mark.parametrize("value", ["alpha=[1,", "model_kwargs={hidden: [32", "teacher='runs/t"])
def test_set_with_broken_yaml_is_one_line(tmp_path, capsys, value):
    key = value.split("=")[0]
    err = _one_error_line(capsys, ["train", "--preset", "digits-small", "--set", value, "--out", str(tmp_path / "a")])
    assert f"--set {value}: not a valid YAML value" in err and "quote the value" in err and key in err


def test_dataset_spellings_are_accepted_as_before():
    ctx = cli.commands["train"].make_context("train", ["--dataset", "CIFAR-10", "--out", "x"])
    assert ctx.params["dataset"] == "cifar10"
    assert resolve_config(overrides={"dataset": "fashion_mnist"}).dataset == "fashion_mnist"


@pytest.mark.parametrize("opt", [o for o in OPTIONS if o.choices is not None], ids=lambda o: o.key)
def test_validate_checks_every_key_with_choices(opt):
    with pytest.raises(CertkdError, match=f"unknown {opt.key} 'bogus'") as e:
        TrainConfig(**{opt.key: "bogus"}).validate()
    assert len(str(e.value).splitlines()) == 1 and "choose one of" in str(e.value)


def test_one_eps_message():
    from certkd.verification.pipeline import VerifyConfig

    for cfg in (TrainConfig(eps=0.0), VerifyConfig(eps=0.0)):
        with pytest.raises(CertkdError) as e:
            cfg.validate()
        assert str(e.value) == choices.eps_error(0.0)


# ------------------------------------------------------------------------------------- round trip

ROUND_TRIP = [
    ("digits-small", {"method": "cc-dist", "teacher": "runs/t", "beta": 0.3, "dist_target": "teacher",
                      "dist_combination": "literal", "dist_distance": "l1", "feature_adapter": "linear",
                      "eps": 2 / 255, "epochs": 3, "model_kwargs": {"width": 4}, "allow_tf32": True}, False),
    ("digits-small", {"method": "sabr", "alpha": 0.25, "lr_milestones": [1], "eval_limit": 20, "seed": 3}, False),
    (None, {"dataset": "mnist", "data_dir": "data dir/mnist", "model": "mlp", "optimizer": "sgd", "augment": False},
     False),
    ("digits-small", {"method": "trades", "amp": True, "trades_beta": 3.0, "alpha": 0.2}, True),
    (None, {"dataset": "cifar-10"}, False),  # a spelling the --dataset flag would change: written with --set
]


@pytest.mark.parametrize("preset, values, teacher", ROUND_TRIP)
def test_a_reproduced_command_parses_back_to_the_same_config(preset, values, teacher):
    from certkd.reporting import train_command

    cfg = resolve_config(preset, values, teacher=teacher)
    line = train_command(cfg, "runs/x", preset)
    argv = shlex.split(line)
    assert argv[:2] in (["certkd", "train"], ["certkd", "teacher"]), line
    command = argv[1]
    ctx = cli.commands[command].make_context(command, argv[2:])
    assert TrainRequest.from_params(command, ctx.params).config() == cfg
    if command == "teacher":  # alpha is no option of certkd teacher: it goes through --set
        assert "--alpha" not in argv and "--amp" in argv and "alpha=0.2" in argv
