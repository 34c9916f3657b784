"""BaB in parts (#12 item 4): domain store, warm-started α, branching classes, sub-domain attack."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from certkd.attacks import PGD, linf_box, margin_loss
from certkd.attacks.subdomain import SubdomainAttack
from certkd.bounds.crown import crown_bounds
from certkd.verification.bab import (BRANCHERS, FSB, BaBSR, DomainStore, Intercept, _Domain, bab_verify,
                                     make_brancher)


def test_domain_store_pops_worst_bound_first_and_fifo_keeps_order():
    store = DomainStore()
    for b in (0.3, -2.0, -0.5, -2.0, 1.0):
        store.push(_Domain({}, b))
    assert [d.bound for d in store.pop(3)] == [-2.0, -2.0, -0.5]
    assert [d.bound for d in store.pop(10)] == [0.3, 1.0] and len(store) == 0
    fifo = DomainStore("fifo")
    for b in (0.3, -2.0, -0.5):
        fifo.push(_Domain({}, b))
    assert [d.bound for d in fifo.pop(3)] == [0.3, -2.0, -0.5]
    with pytest.raises(ValueError):
        DomainStore("lifo")


def test_branchers_by_name_or_instance():
    assert isinstance(make_brancher("babsr"), BaBSR) and isinstance(make_brancher("intercept"), Intercept)
    assert isinstance(make_brancher("fsb"), FSB) and set(BRANCHERS) == {"babsr", "intercept", "fsb"}
    custom = FSB(candidates=2)
    assert make_brancher(custom) is custom
    with pytest.raises(ValueError, match="branching must be one of"):
        bab_verify(nn.Sequential(nn.Linear(2, 2)), torch.zeros(2), 0, torch.zeros(2), torch.ones(2), branching="x")


def test_subdomain_attack_stays_in_box_and_descends():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    lo, hi = torch.zeros(1, 4), torch.ones(1, 4)
    starts = torch.rand(5, 4)
    y = int(model(starts[:1]).argmax(1))
    x, m = SubdomainAttack(steps=5)(model, starts, y, lo, hi)
    assert x.shape == starts.shape and m.shape == (5,)
    assert bool(((x >= lo) & (x <= hi)).all())
    with torch.no_grad():
        start_m = -margin_loss(model(starts), torch.full((5,), y))
        assert bool((m <= start_m + 1e-6).all())
        torch.testing.assert_close(m, -margin_loss(model(x), torch.full((5,), y)))


def _strong_attack(model, x, y, lo, hi) -> float:
    xa = PGD(50, 0.1, restarts=5, stop_on_success=True)(model, x, torch.tensor([y]), lo, hi,
                                                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float(-margin_loss(model(xa), torch.tensor([y]))[0])


@pytest.mark.parametrize("kw", [dict(), dict(warm_alpha=False), dict(order="fifo"), dict(branching="intercept"),
                                dict(branching="fsb"), dict(beta=False)],
                         ids=["default", "cold", "fifo", "intercept", "fsb", "no-beta"])
def test_every_part_agrees_with_the_milp(kw):
    """Hard radii of a small MLP: every setting decides as the MILP does and never verifies a point
    a strong PGD breaks; the default has to branch on at least one of them."""
    pytest.importorskip("highspy")
    from certkd.verification.milp import milp_verify

    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 3)).eval()
    x = torch.rand(1, 6, generator=torch.Generator().manual_seed(4))
    y = int(model(x).argmax(1))

    def certified(eps):
        lo, hi = linf_box(x, eps)
        return float(crown_bounds(model, lo, hi, torch.tensor([y])).min()) > 0

    a, b = 1e-4, 1.0
    for _ in range(14):
        mid = (a + b) / 2
        a, b = (mid, b) if certified(mid) else (a, mid)
    branched = 0
    for eps in (a * 1.15, a * 1.4, a * 1.8, a * 3):
        lo, hi = linf_box(x, eps)
        r = bab_verify(model, x[0], y, lo[0], hi[0], timeout=30, **kw)
        m = milp_verify(model, x[0], y, lower=lo[0], upper=hi[0], timeout=30)
        assert r.status == m.status, (eps, r, m)
        branched += r.domains > 2
        if r.status == "verified":
            assert _strong_attack(model, x, y, lo, hi) > 0
        else:
            with torch.no_grad():
                assert float(-margin_loss(model(r.counterexample.reshape(1, 6)), torch.tensor([y]))[0]) <= 0
    if not kw:
        assert branched >= 1
