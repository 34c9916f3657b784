"""Objectives of certkd tune (exact values) and the pruner option."""
import pytest

from certkd.errors import CertkdError
from certkd.tuning.objective import parse_objective

METRICS = {"clean_accuracy": 0.8, "pgd_accuracy": 0.6, "ibp_verified_accuracy": 0.4, "n": 100}


def test_objective_values_exact():
    assert parse_objective("ibp").values(METRICS) == (0.4,)
    one = parse_objective("0.25*clean+0.75*ibp")
    assert one.values(METRICS) == (0.25 * 0.8 + 0.75 * 0.4,) and one.names == ("0.25*clean+0.75*ibp",)
    two = parse_objective("clean, pgd")
    assert two.multi and two.values(METRICS) == (0.8, 0.6) and two.text == "clean,pgd"
    assert not one.multi


@pytest.mark.parametrize("text, message", [
    ("ibb", "unknown metric 'ibb' (did you mean 'ibp'?)"),
    ("-1*clean", "weights must be positive numbers"),
    ("x*clean", "'x' is not a weight"),
    ("clean,", "an empty objective"),
    ("clean+clean", "a metric appears twice"),
    ("ibp,ibp", "the same objective is listed twice"),
])
def test_bad_objective(text, message):
    with pytest.raises(CertkdError) as e:
        parse_objective(text)
    assert message in str(e.value)


def test_pruners():
    optuna = pytest.importorskip("optuna")
    from certkd.tuning.study import make_pruner

    assert isinstance(make_pruner(None, multi=False), optuna.pruners.MedianPruner)
    assert isinstance(make_pruner(None, multi=True), optuna.pruners.NopPruner)
    assert isinstance(make_pruner("threshold:0.5", multi=False), optuna.pruners.ThresholdPruner)
    assert isinstance(make_pruner("percentile:25", multi=False), optuna.pruners.PercentilePruner)
    for spec, multi, message in [("median", True, "cannot prune a multi-objective (Pareto) study"),
                                 ("percentile", False, "write percentile:NUMBER"),
                                 ("median:3", False, "median takes no argument"),
                                 ("percentile:200", False, "must be in [0, 100]"),
                                 ("medain", False, "unknown pruner")]:
        with pytest.raises(CertkdError) as e:
            make_pruner(spec, multi)
        assert message in str(e.value)
