"""Issue 19: ``certkd sweep --grid lr=0.001,1e-3`` (or ``eps=2/255,0.0078431…``) trained one configuration
twice, and ``certkd report`` then averaged the duplicate as two seeds. Grid values are now compared
after parsing (numbers equal to 9 significant digits are one value) and a repeat is refused with one
line; ``report`` counts two runs of one configuration and seed once, with a warning.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import certkd
import certkd.sweep as sweep
from certkd import reporting
from certkd.cli import main
from certkd.errors import CertkdError
from certkd.sweep import parse_grid, plan_sweep, run_sweep, same_value


@pytest.mark.parametrize("grid, message", [
    ("lr=0.001,1e-3", "--grid lr lists one value twice: 0.001 and 1e-3 are both 0.001 "),
    ("eps=2/255,0.00784313725490196", "--grid eps lists one value twice: 2/255 and 0.00784313725490196 are both "
                                      "0.00784313725 "),
    ("eps=2/255,0.0078431372549", "2/255 and 0.0078431372549 are both 0.00784313725 "),  # 13 digits: one value
    ("eps=0.1,0.3,0.30000000001", "0.3 and 0.30000000001 are both 0.3 "),
    ("batch_size=32,32.0", "--grid batch_size lists one value twice: 32 and 32.0 are both 32 "),
    ("lr_milestones=[1, 2],[1.0,2]", "[1, 2] and [1.0,2] are both [1, 2] "),
    ("dist_warmup=true,yes", "true and yes are both true "),
])
def test_equal_grid_values_are_refused_in_one_line(grid, message):
    with pytest.raises(CertkdError) as e:
        parse_grid([grid])
    assert message in str(e.value) and str(e.value).startswith(f"--grid {grid.split('=')[0]} lists one value twice: ")
    assert "\n" not in str(e.value) and str(e.value).endswith("; list each value once")


@pytest.mark.parametrize("grid", ["eps=2/255,0.0078", "eps=2/255,0.0078431", "lr=0.001,0.0010001",
                                  "lr_milestones=[1, 2],[1, 3]"])
def test_values_that_differ_after_parsing_stay(grid):
    key, values = parse_grid([grid])[0]
    assert len(values) == 2


def test_same_value_rule():
    assert same_value(2 / 255, 0.00784313725490196) and same_value(1e-3, 0.001)
    assert same_value(0.1, 0.1 * (1 + 9e-10)) and not same_value(0.1, 0.1 * (1 + 2e-9))
    assert not same_value(0.0, 1e-300) and same_value(0.0, 0.0)
    assert not same_value(True, 1) and same_value([1, {"a": 0.5}], [1.0, {"a": 0.5}])
    assert not same_value({"a": 1}, {"b": 1}) and not same_value([1], [1, 1])


def test_python_grid_mapping_is_checked_too():
    with pytest.raises(CertkdError, match=r"--grid eps lists one value twice: 2/255 and 0.00784314 are both"):
        parse_grid({"eps": ["2/255", 2 / 255]})


def test_cli_sweep_refuses_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "s"
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--preset", "digits-small", "--grid", "lr=0.001,1e-3", "--seeds", "0,1", "--set",
              "method=standard", "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "0.001 and 1e-3 are both 0.001" in err, err
    assert not out.exists()


def test_combinations_resolving_to_one_config_are_refused(tmp_path, monkeypatch):
    """The last check, behind the value check: two combinations with equal configs never both train."""
    monkeypatch.setattr(sweep, "_refuse_equal_values", lambda name, values: None)
    with pytest.raises(CertkdError) as e:
        plan_sweep(tmp_path / "s", "digits-small", ["lr=0.001,1e-3"], seeds=[0], sets={"method": "standard"})
    assert str(e.value) == ("sweep combinations lr=0.001_seed=0 and lr=1e-3_seed=0 resolve to the same "
                            "configuration, which would train it twice; drop one of the grid values")
    with pytest.raises(CertkdError, match="resolve to the same configuration"):
        run_sweep(tmp_path / "s", "digits-small", ["lr=0.001,1e-3"], sets={"method": "standard"}, log=lambda s: None)
    assert not (tmp_path / "s").exists()


def _run(path: Path, seed: int, clean: float, **overrides) -> Path:
    cfg = certkd.resolve_config("digits-small", dict({"method": "cc-ibp"}, **overrides, seed=seed))
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (path / "evaluation.json").write_text(json.dumps({"clean_accuracy": clean, "pgd_accuracy": clean / 2,
                                                      "ibp_verified_accuracy": clean / 4, "n": 30, "eps": 0.05}))
    return path


def test_report_counts_a_repeated_seed_once(tmp_path):
    # what the old sweep left: lr=0.001 and lr=1e-3 are one configuration, trained twice per seed
    _run(tmp_path / "s" / "lr=0.001_seed=0", 0, 0.8, lr=0.001)
    _run(tmp_path / "s" / "lr=1e-3_seed=0", 0, 0.6, lr="1e-3")
    _run(tmp_path / "s" / "lr=0.001_seed=1", 1, 0.7, lr=0.001)
    runs = reporting.collect_runs([tmp_path / "s"])
    groups = reporting.group_runs(runs)
    assert len(groups) == 1 and groups[0].seeds == [0, 1]
    assert [r.name for r in groups[0].runs] == ["lr=0.001_seed=0", "lr=0.001_seed=1"]
    st = groups[0].stats("clean_accuracy")
    assert (st.n, st.total, st.mean) == (2, 2, pytest.approx(0.75))  # not the mean of three "seeds"
    dup = next(r for r in runs if r.name == "lr=1e-3_seed=0")
    assert [w for w in dup.warnings if "seed" in w] == ["same configuration and seed (0) as `lr=0.001_seed=0`: counted once, as "
                            "`lr=0.001_seed=0`, not averaged in as another seed; delete one of them or retrain it "
                            "with another seed"]
    s = reporting.write_report([tmp_path / "s"], tmp_path / "rep")
    assert any(w.startswith("`lr=1e-3_seed=0`: same configuration and seed (0)") for w in s["warnings"])
    row = (tmp_path / "rep" / "results.csv").read_text().splitlines()
    values = dict(zip(row[0].split(","), row[1].split(",")))
    assert float(values["clean_accuracy_mean"]) == pytest.approx(0.75) and values["clean_accuracy_n"] == "2"


def test_report_keeps_the_repeat_that_has_results(tmp_path):
    a = _run(tmp_path / "a", 0, 0.8)
    (a / "evaluation.json").unlink()
    _run(tmp_path / "b", 0, 0.6)
    groups = reporting.group_runs(reporting.collect_runs([a, tmp_path / "b"]))
    assert [r.name for r in groups[0].runs] == ["b"]
    assert groups[0].stats("clean_accuracy").mean == pytest.approx(0.6)
