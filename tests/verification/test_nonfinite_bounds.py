"""Numerical faults in verification: a NaN/Inf weight or bound is never certified."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from certkd.checkpoints import save_checkpoint
from certkd.cli import main
from certkd.config import resolve_config
from certkd.data import load_dataset
from certkd.errors import CertkdError
from certkd.models import create_model
from certkd.verification import evaluate_accuracy
from certkd.verification.pipeline import VerifyConfig, verify_run, verify_sample


def _model(fault: str):
    torch.manual_seed(0)
    net = create_model("mlp", 1, 8, 10, hidden=[16]).eval()
    with torch.no_grad():
        if fault == "nan":
            net.features[2].weight[3, 5] = float("nan")
        elif fault == "inf":
            net.features[2].weight[3, 5] = float("inf")
        elif fault == "overflow":  # finite weights whose bounds overflow float32
            net.features[2].weight.mul_(1e37)
            net.head.weight.mul_(1e37)
    return net


@pytest.mark.parametrize("fault", ["nan", "inf", "overflow"])
def test_verify_sample_refuses_to_certify_a_nonfinite_bound(fault):
    _, test, _ = load_dataset("digits")
    x, y = test.get(torch.tensor([0]))
    model = _model(fault)
    refused = 0
    for index in range(3):
        try:
            row = verify_sample(model, x, int(y[0]), VerifyConfig(eps=0.05, engine="none"), index=index)
        except CertkdError as e:
            assert "non-finite IBP bound" in str(e) and "refusing to certify" in str(e) and "\n" not in str(e)
            assert f"at test point {index}" in str(e)
            refused += 1
        else:  # decided before the bounds (e.g. misclassified): never a verified status
            assert not row["status"].startswith("verified"), row
    assert refused == 3 or fault == "inf"  # an Inf weight makes this point misclassified (margin -inf)


@pytest.mark.parametrize("fault", ["nan", "inf"])
def test_ibp_evaluation_does_not_count_nonfinite_bounds_as_verified(fault):
    _, test, _ = load_dataset("digits")
    res = evaluate_accuracy(_model(fault), test, 0.05, limit=20, attack_steps=2)
    assert res["ibp_verified_accuracy"] == 0.0


def _nan_run(root: Path) -> Path:
    net = _model("nan")
    cfg = resolve_config("digits-small", {"method": "standard", "model": "mlp", "model_kwargs": {"hidden": [16]},
                                          "epochs": 1})
    root.mkdir()
    (root / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    save_checkpoint(root, 1, net, {"model": net.spec.to_dict(), "config": cfg.to_dict(), "dataset": "digits"})
    return root


def test_verify_run_refuses_a_model_with_nan_weights(tmp_path, capsys):
    run = _nan_run(tmp_path / "run")
    with pytest.raises(CertkdError, match=r"model weights contain NaN/Inf \(features\.2\.weight\)"):
        verify_run(run, VerifyConfig(eps=0.05), limit=2, progress=False)
    assert not (run / "verification.json").exists()
    with pytest.raises(SystemExit) as exc:
        main(["verify", str(run), "--limit", "2", "--quiet"])
    captured = capsys.readouterr()
    assert exc.value.code == 2 and "Traceback" not in captured.out + captured.err
    assert captured.err.strip().splitlines() == [captured.err.strip()]
    assert "refusing to verify" in captured.err
