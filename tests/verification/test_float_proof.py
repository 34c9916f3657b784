"""A certificate of certkd's pipeline against floating-point rounding (docs/verify_onnx.md §5):
``rounding_bound``/``float_proof`` on verified rows, ``strict_rounding`` turning close margins into unknown."""
from __future__ import annotations

import pytest
import torch

from certkd.errors import CertkdError
from certkd.models import create_model
from certkd.verification.pipeline import VerifyConfig, summarize_rows, verify_sample


def _tiny_margin_model():
    """z = (1 + 2⁻²², 1) for every input: certified margin 2⁻²² ≈ 2.4e-7 (IBP is exact here), below twice
    the float32 rounding bound of the head (γ₄·(1 + 1) per logit ≈ 4.8e-7)."""
    m = create_model("mlp", 1, 1, 2, hidden=[1]).eval()
    with torch.no_grad():
        m.features[2].weight.zero_()
        m.features[2].bias.fill_(1.0)
        m.head.weight.fill_(1.0)
        m.head.bias.copy_(torch.tensor([2.0 ** -22, 0.0]))
    return m


def test_margin_below_the_rounding_bound_has_no_float_proof():
    model, x = _tiny_margin_model(), torch.full((1, 1, 1, 1), 0.5)
    row = verify_sample(model, x, 0, VerifyConfig(eps=0.1, engine="none"))
    assert row["status"] == "verified-ibp" and row["margin"] == 2.0 ** -22
    assert row["float_proof"] is False and 2 * row["rounding_bound"] > row["margin"] > 0
    assert summarize_rows([row])["verified_float_proof"] == 0


@pytest.mark.parametrize("engine", ["none", "bab", "milp"])
def test_strict_rounding_answers_unknown_within_twice_the_rounding_bound(engine):
    """Every stage certifies the margin in exact arithmetic only; the complete stage is asked for a margin
    above twice the bound and cannot give it: unknown, with the exact certificate in the note."""
    model, x = _tiny_margin_model(), torch.full((1, 1, 1, 1), 0.5)
    row = verify_sample(model, x, 0, VerifyConfig(eps=0.1, engine=engine, timeout=3, strict_rounding=True))
    assert row["status"] == "unknown" and row["float_proof"] is False
    assert "verified-ibp in exact arithmetic" in row["note"] and "strict_rounding" in row["note"]
    numbers = summarize_rows([row])
    assert numbers["counts"]["unknown"] == 1 and numbers["verified_accuracy"] == 0
    assert numbers["empirical_robust_accuracy"] == 1.0  # unknown is not falsified


def test_strict_rounding_is_a_boolean():
    with pytest.raises(CertkdError, match="strict_rounding must be True or False"):
        VerifyConfig(eps=0.1, strict_rounding="yes").validate()
