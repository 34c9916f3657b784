"""The clock (#22 item 1): one deadline covers every step of BaB, each α iteration and each MILP leaf."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

import certkd.bounds.alpha as alpha_module
import certkd.verification.bab as bab_module
from certkd.attacks import linf_box
from certkd.bounds.crown import alpha_crown_bounds, crown_bounds
from certkd.verification.bab import BabResult, bab_verify


def _hard_mlp(seed: int = 0, width: int = 64):
    """A random MLP and a box around a point wide enough that CROWN leaves it open (BaB runs long)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3)).eval()
    x = torch.rand(1, 10, generator=torch.Generator().manual_seed(seed + 1))
    y = int(model(x).argmax(1))
    eps = 1e-3
    while float(crown_bounds(model, *linf_box(x, eps), torch.tensor([y])).min()) > 0:
        eps *= 1.5
    return model, x, y, linf_box(x, eps)


def test_alpha_iterations_stop_at_the_deadline(monkeypatch):
    model, x, y, (lo, hi) = _hard_mlp()
    calls = []
    real = alpha_module._backward
    monkeypatch.setattr(alpha_module, "_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    alpha_crown_bounds(model, lo, hi, torch.tensor([y]), iterations=10 ** 6, deadline=time.monotonic() - 1)
    assert len(calls) == 1  # the start point is evaluated, no step taken
    calls.clear()
    t0 = time.monotonic()
    res = alpha_crown_bounds(model, lo, hi, torch.tensor([y]), iterations=10 ** 6, deadline=t0 + 0.3)
    assert time.monotonic() - t0 < 1.3 and 1 < len(calls) < 10 ** 6
    assert bool((res >= crown_bounds(model, lo, hi, torch.tensor([y])) - 1e-5).all())  # still the best bound


def test_bab_answers_timeout_within_a_second_of_the_limit():
    model, x, y, (lo, hi) = _hard_mlp()
    t0 = time.monotonic()
    res = bab_verify(model, x[0], y, lo[0], hi[0], timeout=0.5, max_depth=40)
    wall = time.monotonic() - t0
    assert res.status == "timeout" and wall < 0.5 + 1.0, (res, wall)


def test_no_step_starts_after_a_bound_step_that_ran_into_the_deadline(monkeypatch):
    """A batch whose α/β-CROWN ends at the deadline is the last step: the attack, branching and leaves
    of that batch are skipped (before #22 they all ran, seconds past the limit on mnistfc)."""
    model, x, y, (lo, hi) = _hard_mlp()
    import certkd.bounds.crown as crown_module
    real_alpha = crown_module.alpha_crown_bounds

    def slow_alpha(*a, deadline=None, **k):
        out = real_alpha(*a, deadline=deadline, **k)
        while deadline is not None and time.monotonic() < deadline:  # this batch used up the time
            time.sleep(0.01)
        return out

    class SlowAttack:
        def __init__(self, steps):
            pass

        def __call__(self, *a, **k):
            time.sleep(2.0)
            raise AssertionError("the attack ran after the deadline")

    monkeypatch.setattr(crown_module, "alpha_crown_bounds", slow_alpha)
    monkeypatch.setattr(bab_module, "SubdomainAttack", SlowAttack)
    t0 = time.monotonic()
    res = bab_verify(model, x[0], y, lo[0], hi[0], timeout=0.5)
    assert res.status == "timeout" and time.monotonic() - t0 < 1.5


def test_a_milp_leaf_gets_what_is_left_of_the_deadline(monkeypatch):
    pytest.importorskip("highspy")
    import certkd.verification.milp as milp_module

    model, x, y, (lo, hi) = _hard_mlp(width=24)
    given = []
    real = milp_module.milp_verify

    def spy(*a, timeout, **k):
        given.append((timeout, deadline - time.monotonic()))
        return real(*a, timeout=timeout, **k)

    monkeypatch.setattr(milp_module, "milp_verify", spy)
    deadline = time.monotonic() + 3.0
    res = bab_verify(model, x[0], y, lo[0], hi[0], timeout=60.0, deadline=deadline, max_depth=0)
    assert res.status in ("verified", "falsified", "timeout") and given
    for timeout, left in given:  # the leaf's limit is the shared deadline's remainder, not the 60 s
        assert left - 0.05 <= timeout <= left + 0.05


def test_a_leaf_after_the_deadline_is_a_timeout_without_a_solve(monkeypatch):
    import certkd.verification.milp as milp_module

    monkeypatch.setattr(milp_module, "milp_verify", lambda *a, **k: pytest.fail("solved past the deadline"))
    res = bab_module._leaf_milp(None, None, 0, None, None, [], -0.1, 1e-6)
    assert isinstance(res, BabResult) and res.status == "timeout"


def test_verify_network_keeps_the_limit_including_loading():
    """An nn.Module property through the public API: the answer's time covers the whole call and
    stays within a second of the limit on a box BaB cannot finish in time."""
    from certkd.verification.api import verify_model

    model, x, y, (lo, hi) = _hard_mlp(width=64)
    t0 = time.monotonic()
    res = verify_model(model, lo[0].numpy(), hi[0].numpy(), y, timeout=1.0)
    wall = time.monotonic() - t0
    assert res.status == "timeout" and res.stage == "bab" and wall < 2.0, (res, wall)
    assert res.time_s <= wall


def test_call_before_returns_raises_and_stops_at_the_deadline():
    from certkd.verification.forked import call_before
    from certkd.verification.milp import EmptyDomainError

    assert call_before(lambda: {"x": torch.arange(3)}, time.monotonic() + 30)[1]["x"].tolist() == [0, 1, 2]

    def empty():
        raise EmptyDomainError("no point here")

    with pytest.raises(EmptyDomainError, match="no point here"):
        call_before(empty, time.monotonic() + 30, errors=(EmptyDomainError,))
    with pytest.raises(RuntimeError, match="EmptyDomainError: no point here"):  # not a named error class
        call_before(empty, time.monotonic() + 30)

    class Opaque:
        pass

    with pytest.raises(RuntimeError):  # a result that is not plain data is refused by the loader
        call_before(lambda: Opaque(), time.monotonic() + 30)
    t0 = time.monotonic()
    assert call_before(lambda: time.sleep(30), t0 + 0.3, grace=0.1) == (False, None)
    assert time.monotonic() - t0 < 1.0


@pytest.mark.parametrize("wide", [1.0, 2.0], ids=["verified", "falsified"])
def test_a_forked_milp_leaf_answers_as_one_in_process(monkeypatch, wide):
    pytest.importorskip("highspy")
    model, x, y, (lo, hi) = _hard_mlp(width=24)
    lo, hi = x - (x - lo) * wide, x + (hi - x) * wide
    root = crown_bounds(model, lo, hi, torch.tensor([y]), return_intermediate=True)
    pre = [(l[0], u[0]) for l, u in root.intermediate]
    answers = []
    for fork_from in (10 ** 9, 0):
        monkeypatch.setattr(bab_module, "FORK_UNSTABLE", fork_from)
        answers.append(bab_module._leaf_milp(model, x[0], y, lo[0], hi[0], pre, time.monotonic() + 30, 1e-6))
    here, forked = answers
    assert here.status == forked.status == ("verified" if wide == 1.0 else "falsified")
    assert here.margin == pytest.approx(forked.margin, abs=1e-6)
    if wide != 1.0:
        torch.testing.assert_close(here.counterexample, forked.counterexample)


def test_a_forked_milp_leaf_is_stopped_at_the_deadline(monkeypatch):
    """A solve that overruns its own time limit (HiGHS's root cut rounds do on large MILPs) is killed."""
    import certkd.verification.milp as milp_module

    model, x, y, (lo, hi) = _hard_mlp(width=24)
    root = crown_bounds(model, lo, hi, torch.tensor([y]), return_intermediate=True)
    pre = [(l[0], u[0]) for l, u in root.intermediate]
    monkeypatch.setattr(milp_module, "milp_verify", lambda *a, **k: time.sleep(30))
    monkeypatch.setattr(bab_module, "FORK_UNSTABLE", 0)
    t0 = time.monotonic()
    res = bab_module._leaf_milp(model, x[0], y, lo[0], hi[0], pre, t0 + 0.5, 1e-6)
    assert res.status == "timeout" and "MILP leaf" in res.note and time.monotonic() - t0 < 1.5
