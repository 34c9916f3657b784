"""CROWN-IBP, TAPS and STAPS from the command line (digits-small, a tiny MNIST) and their config checks.

The losses by hand: tests/bounds/test_crown_ibp.py (CROWN-IBP), tests/losses/test_taps.py (TAPS),
tests/training/test_methods.py (all three through the registry).
"""
import json
import sys
from pathlib import Path

import pytest

from certkd.cli import main
from certkd.config import resolve_config
from certkd.errors import CertkdError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_bad_input import fake_mnist  # noqa: E402  (the tests' tiny MNIST writer)

NEW = ("crown-ibp", "taps", "staps")


def _records(run: Path):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", NEW)
def test_trains_on_digits_small_from_the_cli(tmp_path, method):
    out = tmp_path / method
    main(["train", "--preset", "digits-small", "--method", method, "--epochs", "2", "--set", "train_limit=128",
          "--set", "eval_limit=20", "--set", "test_interval=2", "--quiet", "--out", str(out)])
    records = _records(out)
    assert [r["epoch"] for r in records] == [1, 2]
    last = records[-1]
    assert last["train"]["eps"] == pytest.approx(0.05) and last["test"]["n"] == 20
    key = {"crown-ibp": "ibp_loss", "taps": "taps_loss", "staps": "taps_loss"}[method]
    assert key in last["train"]


def test_distillation_variants_train_from_the_cli(tmp_path):
    for method in ("taps-dist", "staps-dist"):  # the no-teacher control target: no teacher run needed
        out = tmp_path / method
        main(["train", "--preset", "digits-small", "--method", method, "--dist-target", "zero", "--epochs", "2",
              "--set", "train_limit=128", "--set", "eval_limit=20", "--set", "test_interval=2", "--quiet",
              "--out", str(out)])
        last = _records(out)[-1]["train"]
        assert last["dist"] > 0 and "taps_loss" in last


@pytest.mark.parametrize("method", NEW)
def test_trains_on_mnist_from_the_cli(tmp_path, method):
    data = fake_mnist(tmp_path / "mnist", 28, n=32)
    out = tmp_path / method
    main(["train", "--dataset", "mnist", "--data-dir", str(data), "--model", "cnn-small", "--eps", "0.1",
          "--method", method, "--epochs", "2", "--batch-size", "16", "--set", "eps_length=1", "--set", "eval_limit=8",
          "--quiet", "--out", str(out)])
    assert _records(out)[-1]["train"]["eps"] == pytest.approx(0.1)


def test_crown_weight_is_logged_along_the_ramp(tmp_path):
    out = tmp_path / "c"
    main(["train", "--preset", "digits-small", "--method", "crown-ibp", "--epochs", "3", "--set", "eps_start=1",
          "--set", "eps_length=2", "--set", "train_limit=128", "--set", "test_interval=3", "--set", "eval_limit=10",
          "--quiet", "--out", str(out)])
    weights = [r["train"].get("crown_weight") for r in _records(out)]
    assert weights[0] > weights[1] > weights[2] == 0.0  # 1 -> 0 over the ramp, IBP alone at the target ε


@pytest.mark.parametrize("key,value,message", [
    ("crown_ibp_beta_end", 1.5, "crown_ibp_beta_end must be in [0, 1]"),
    ("crown_ibp_beta_start", -0.1, "crown_ibp_beta_start must be in [0, 1]"),
    ("taps_head_relus", 0, "taps_head_relus must be >= 1"),
    ("taps_steps", 0, "taps_steps must be >= 1"),
    ("taps_step_size", 0.0, "taps_step_size and taps_grad_scale must be finite and > 0"),
    ("taps_grad_scale", -1.0, "taps_step_size and taps_grad_scale must be finite and > 0"),
    ("taps_grad_scale", float("inf"), "taps_step_size and taps_grad_scale must be finite and > 0"),
    ("taps_step_size", float("nan"), "taps_step_size and taps_grad_scale must be finite and > 0"),
    ("crown_ibp_beta_end", float("nan"), "crown_ibp_beta_end must be in [0, 1]"),
    ("taps_link_slack", 0.0, "taps_link_slack must be in (0, 1]"),
])
def test_bad_values_are_one_line_errors(key, value, message):
    with pytest.raises(CertkdError) as exc:
        resolve_config("digits-small", {"method": "taps", key: value})
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_a_split_past_the_features_is_a_cli_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--preset", "digits-small", "--method", "taps", "--epochs", "1", "--set", "taps_head_relus=9",
              "--set", "train_limit=32", "--quiet", "--out", str(tmp_path / "t")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "taps_head_relus=9" in err and "Traceback" not in err and len(err.splitlines()) == 1
