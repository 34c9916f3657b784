"""The YAML search space of certkd tune: exact parse, suggestions, one-line errors for bad spaces."""
import pytest
import yaml

from certkd.config import TrainConfig
from certkd.errors import CertkdError
from certkd.tuning.space import Param, load_space, parse_space

SPACE = """
lr: {low: 1.0e-4, high: 1.0e-2, log: true}
epochs: {low: 2, high: 6, step: 2}
alpha: {low: 0.1, high: 0.9, step: 0.2}
eps: {low: 1/255, high: 8/255}
method: {choices: [cc-ibp, mtl-ibp]}
model_kwargs: {choices: [{hidden: [32]}, {hidden: [64, 64]}]}
"""


def test_parse_exact_values(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    space = load_space(path)
    assert space.params == (
        Param("lr", "float", 1e-4, 1e-2, True, None),
        Param("epochs", "int", 2.0, 6.0, False, 2.0),
        Param("alpha", "float", 0.1, 0.9, False, 0.2),
        Param("eps", "float", 1 / 255, 8 / 255, False, None),
        Param("method", "categorical", choices=("cc-ibp", "mtl-ibp")),
        Param("model_kwargs", "categorical", choices=({"hidden": [32]}, {"hidden": [64, 64]})),
    )
    assert space.params[-1].labels() == ("{hidden: [32]}", "{hidden: [64, 64]}")
    assert parse_space(yaml.safe_load(yaml.safe_dump(space.to_dict(), sort_keys=False))) == space  # to_dict round-trips


def test_suggest_maps_labels_back_to_values():
    optuna = pytest.importorskip("optuna")
    space = parse_space(yaml.safe_load(SPACE))
    trial = optuna.trial.FixedTrial({"lr": 1e-3, "epochs": 4, "alpha": 0.5, "eps": 0.01, "method": "mtl-ibp",
                                     "model_kwargs": "{hidden: [64, 64]}"})
    assert space.suggest(trial) == {"lr": 1e-3, "epochs": 4, "alpha": 0.5, "eps": 0.01, "method": "mtl-ibp",
                                    "model_kwargs": {"hidden": [64, 64]}}
    assert space.values_of({"model_kwargs": "{hidden: [32]}", "lr": 0.5}) == {"model_kwargs": {"hidden": [32]},
                                                                              "lr": 0.5}


@pytest.mark.parametrize("text, message", [
    ("alpah: {low: 0.1, high: 0.9}", "unknown config key 'alpah' (did you mean 'alpha'?)"),
    ("alpha: {low: 0.9, high: 0.1}", "'alpha': low (0.9) must be below high (0.1)"),
    ("lr: {low: 0, high: 0.1, log: true}", "'lr': a log scale needs low > 0, got 0"),
    ("lr: {low: 0.001, high: 0.1, log: true, step: 0.01}", "'lr': give log or step, not both"),
    ("method: {low: 1, high: 2}", "'method': a range needs an int or float key"),
    ("alpha: {low: 0.1, hi: 0.9}", "'alpha': unknown field 'hi' (did you mean 'high'?)"),
    ("alpha: {low: 0.1}", "'alpha': a range needs low and high (high missing)"),
    ("alpha: {low: 0.1, high: x}", "'alpha': high must be a number, got 'x'"),
    ("epochs: {low: 1.5, high: 4}", "'epochs': low must be an integer (the key is an int), got 1.5"),
    ("method: {choices: []}", "'method': choices must be a non-empty list"),
    ("method: {choices: [cc-ibp, cc-ibp]}", "'method': the choice 'cc-ibp' is listed twice"),
    ("method: {choices: [cc-ibp], low: 1}", "'method': give either choices or a range"),
    ("epochs: {choices: [abc]}", "invalid value 'abc' for 'epochs': expected int"),
    ("alpha: 0.5", "'alpha': write a range {low: A, high: B}"),
    ("val_fraction: {low: 0.1, high: 0.3}", "'val_fraction' cannot be searched"),
    ("[1, 2]", "expected a mapping of config keys to ranges or choices"),
])
def test_bad_space_is_one_line(text, message):
    with pytest.raises(CertkdError) as e:
        parse_space(yaml.safe_load(text), "s.yaml")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_check_refuses_a_bound_no_trial_could_train_with():
    space = parse_space({"alpha": {"low": 0.5, "high": 2}, "method": {"choices": ["cc-ibp", "nope"]}})
    with pytest.raises(CertkdError, match=r"search space: alpha=2.0 is not a valid config: alpha must be in \[0, 1\]"):
        space.check(TrainConfig())
    with pytest.raises(CertkdError, match="search space: method=nope is not a valid config: unknown method 'nope'"):
        parse_space({"method": {"choices": ["cc-ibp", "nope"]}}).check(TrainConfig())
    parse_space({"alpha": {"low": 0.0, "high": 1.0}}).check(TrainConfig())  # both ends valid: no error


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(CertkdError, match="search space .*nope.yaml is not a file"):
        load_space(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: {low: 1\n")
    with pytest.raises(CertkdError, match="invalid YAML in search space"):
        load_space(bad)
