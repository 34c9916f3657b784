"""Issue #19 §3: ``certkd.verify_model`` checks what it is given, answers in one sentence, and never
changes the caller's model (docs/verify_onnx.md)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import certkd
from certkd.errors import CertkdError


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


Z4, O4 = torch.zeros(4), torch.ones(4)


#: (name, the call as a user writes it, words the one-line message must hold); ``m`` is a small eval-mode MLP
#: (4 inputs, 3 outputs). ``scripts/bad_input_catalogue.py`` lists these in docs/bad_inputs.md.
API_CASES = [
    ("lower above upper", "verify_model(m, torch.ones(4), torch.zeros(4), 0)", ("lower > upper", "pass lower <= upper")),
    ("shapes differ", "verify_model(m, torch.zeros(4), torch.ones(5), 0)", ("shape", "same shape")),
    ("NaN bound", "verify_model(m, torch.full((4,), float('nan')), torch.ones(4), 0)", ("NaN",)),
    ("wrong input size", "verify_model(m, torch.zeros(5), torch.ones(5), 0)", ("does not take",)),
    ("a batch on the bounds", "verify_model(m, torch.zeros(3, 4), torch.ones(3, 4), 0)", ("batch",)),
    ("empty specification matrix", "verify_model(m, torch.zeros(4), torch.ones(4), np.zeros((0, 3)))", ("no rows",)),
    ("matrix of the wrong width", "verify_model(m, torch.zeros(4), torch.ones(4), np.ones((1, 2)))", ("columns",)),
    ("label out of range", "verify_model(m, torch.zeros(4), torch.ones(4), 3)", ("out of range",)),
    ("missing VNN-LIB path", "verify_model(m, torch.zeros(4), torch.ones(4), '/nonexistent/p.vnnlib')",
     ("not found",)),
    ("only lower", "verify_model(m, torch.zeros(4), None, 0)", ("both",)),
    ("timeout nan", "verify_model(m, torch.zeros(4), torch.ones(4), 0, timeout=float('nan'))", ("timeout",)),
    ("not a model", "verify_model(42, torch.zeros(4), torch.ones(4), 0)", ("model must be",)),
    ("float16 model", "verify_model(copy.deepcopy(m).half(), torch.zeros(4), torch.ones(4), 0)", ("float16", "float()")),
    ("float64 model, float32 weights mixed in",
     "verify_model(nn.Sequential(nn.Linear(4, 3).double(), nn.Linear(3, 3)), torch.zeros(4), torch.ones(4), 0)",
     ("mixes",)),
    ("BatchNorm without running statistics",
     "verify_model(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False)), torch.zeros(4), "
     "torch.ones(4), 0)", ("running statistics",)),
]


def api_case_message(code: str) -> str:
    """The one-line CertkdError message of one :data:`API_CASES` call (AssertionError if none is raised)."""
    env = {"verify_model": certkd.verify_model, "m": _mlp().eval(), "torch": torch, "np": np, "nn": nn, "copy": copy}
    try:
        eval(code, env)  # noqa: S307  (the catalogue's own fixed strings)
    except CertkdError as e:
        return str(e)
    raise AssertionError(f"{code} raised nothing")


@pytest.mark.parametrize("name, code, words", API_CASES, ids=[c[0] for c in API_CASES])
def test_bad_arguments_raise_one_line(name, code, words):
    msg = api_case_message(code)
    assert "\n" not in msg and msg.strip()
    for w in words:
        assert w in msg, msg


def test_empty_box_is_refused_not_proved():
    """lower > upper used to answer 'property holds' (an empty box has no counterexample)."""
    with pytest.raises(CertkdError):
        certkd.verify_model(nn.Linear(2, 2), torch.ones(2), torch.zeros(2), 0)


def test_caller_model_is_left_as_it_was():
    """verify_model used to put every child in eval mode, so later training stopped updating BatchNorm."""
    model = _mlp().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = certkd.verify_model(model, Z4, O4 * 0.01, 0, timeout=20)
    assert res.status in ("sat", "unsat", "unknown", "timeout")
    assert all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_float64_module_is_verified_in_float64():
    lin = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1024.0000611, -341.3333587]], dtype=torch.float64))
    x = torch.tensor([1.0, 3.0], dtype=torch.float64)
    res = certkd.verify_model(nn.Sequential(lin), x, x, np.array([[1.0]]), timeout=20)  # needs y > 0: y = -1.5e-5
    assert res.status == "sat" and res.y.dtype == np.float64 and float(res.y[0]) < 0
    res = certkd.verify_model(nn.Sequential(lin), x, x, np.array([[-1.0]]), timeout=20)
    assert res.status == "unsat" and res.float_proof


def test_twenty_thousand_way_or_is_decided_within_its_time_limit(tmp_path):
    """An `or` of 20,000 disjuncts used to spend 30 s in the bounds' (m x m) label matrix and PGD's per-disjunct
    loop; the rows now go to the engines as one (m x K) specification, so it is decided well inside 20 s."""
    import random

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 10))
    rng = random.Random(0)
    lines = [f"(declare-const X_{i} Real)" for i in range(5)] + [f"(declare-const Y_{j} Real)" for j in range(10)]
    lines += [f"(assert (>= X_{i} 0.0))\n(assert (<= X_{i} 0.01))" for i in range(5)]
    lines.append("(assert (or " + " ".join(f"(and (>= Y_{rng.randrange(1, 10)} {rng.uniform(5, 9)!r}))"
                                           for _ in range(20000)) + "))")
    path = tmp_path / "or.vnnlib"
    path.write_text("\n".join(lines) + "\n")
    res = certkd.verify_model(net, spec=str(path), timeout=20)
    assert res.status == "unsat" and res.stage == "ibp" and res.time_s < 20
