"""Tests for certkd.schedules (docs/method.md §3.1, §3.2)."""
from __future__ import annotations

import math

import pytest

from certkd.schedules import SmoothedEpsilonSchedule, multistep_lr

L_CIFAR = 391  # ceil(50000 / 128)


def cifar(eps_max=1.0):
    return SmoothedEpsilonSchedule(eps_max=eps_max, start=2, length=80, steps_per_epoch=L_CIFAR)


def first_batch(epoch, steps=L_CIFAR):
    """q of the first batch of 1-based ``epoch``."""
    return (epoch - 1) * steps


Q0, QM, Q1 = 391, 8211, 31671


def test_cifar_phase_boundaries():
    s = cifar()
    assert (Q0, QM, Q1) == ((2 - 1) * L_CIFAR, Q0 + math.floor(0.25 * (Q1 - Q0)), (2 + 80 - 1) * L_CIFAR)
    assert s(0) == 0.0
    assert s(Q0) == 0.0          # q <= q0 -> 0
    assert s(Q0 + 1) > 0.0
    assert s(Q1) == 1.0
    assert s(Q1 - 1) < 1.0
    assert s(10 ** 7) == 1.0
    assert s.ramp_end_epoch() == 81


def test_cifar_first_epoch_is_zero_second_is_not():
    s = cifar()
    assert all(s(q) == 0.0 for q in range(0, L_CIFAR + 1))  # all of epoch 1 (and q0 itself)
    assert s(first_batch(2) + 1) > 0


@pytest.mark.parametrize("epoch, value", [(22, 1 / 13), (42, 5 / 13), (81, 1 / 13 + 12 / 13 * 23069 / 23460)])
def test_cifar_check_values(epoch, value):
    s = cifar()
    assert s(first_batch(epoch)) == pytest.approx(value, rel=1e-12)


def test_cifar_check_values_rounded_as_in_the_docs():
    """The worked CIFAR-10 example of docs/method.md §3.1, at ε = 2/255."""
    s = cifar(eps_max=2 / 255)
    ratio = lambda e: s(first_batch(e)) / (2 / 255)  # noqa: E731
    assert round(ratio(22), 4) == 0.0769
    assert round(ratio(42), 3) == 0.385
    assert round(ratio(81), 3) == 0.985
    for e in (82, 83, 120, 160):
        assert s(first_batch(e)) == 2 / 255
    assert s(first_batch(82) - 1) < 2 / 255  # last batch of epoch 81


def test_polynomial_phase_is_quartic():
    s = cifar()
    m = QM - Q0
    a = 1.0 / (4 * m ** 3 * (Q1 - QM) + m ** 4)
    for q in (Q0 + 1, Q0 + 100, Q0 + 5000, QM - 1):
        assert s(q) == pytest.approx(a * (q - Q0) ** 4, rel=1e-12)
    # doubling the distance from q0 multiplies ε by 16
    assert s(Q0 + 2000) / s(Q0 + 1000) == pytest.approx(16.0, rel=1e-12)


def test_linear_phase_is_linear():
    s = cifar()
    steps = [s(q + 1) - s(q) for q in (QM, QM + 100, 20000, Q1 - 2)]
    for d in steps:
        assert d == pytest.approx(steps[0], rel=1e-9)


def test_continuity_and_slope_at_switch():
    s = cifar()
    left, right = s(QM - 1), s(QM)
    slope_right = s(QM + 1) - s(QM)
    assert right - left == pytest.approx(slope_right, rel=1e-3)  # no jump: one step's increase
    m = QM - Q0
    a = 1.0 / (4 * m ** 3 * (Q1 - QM) + m ** 4)
    assert right == pytest.approx(a * m ** 4, rel=1e-12)  # ε_mid = a m^4
    assert slope_right == pytest.approx(4 * a * m ** 3, rel=1e-9)  # slopes match at q_m


def test_monotone_non_decreasing():
    s = cifar(eps_max=8 / 255)
    values = [s(q) for q in range(0, Q1 + 2000, 7)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert max(values) == 8 / 255 and min(values) == 0.0


def test_scales_with_eps_max():
    a, b = cifar(1.0), cifar(0.3)
    for q in (Q0 + 17, QM, 20000, Q1):
        assert b(q) == pytest.approx(0.3 * a(q), rel=1e-12)


def test_mnist_only_first_batch_is_zero():
    s = SmoothedEpsilonSchedule(eps_max=0.1, start=1, length=20, steps_per_epoch=235)
    assert s(0) == 0.0
    assert all(s(q) > 0.0 for q in range(1, 500))
    assert s(20 * 235) == 0.1
    assert s(20 * 235 - 1) < 0.1


def test_zero_length_ramp_jumps_to_max():
    # q0 = q1: q <= q0 is still the (single) zero batch, then ε_max with no division by zero
    s = SmoothedEpsilonSchedule(eps_max=0.1, start=1, length=0, steps_per_epoch=10)
    assert s(0) == 0.0 and s(1) == 0.1 and s(5) == 0.1
    s = SmoothedEpsilonSchedule(eps_max=0.1, start=3, length=0, steps_per_epoch=10)
    assert s(20) == 0.0 and s(21) == 0.1


@pytest.mark.parametrize("epoch, lr", [(1, 5e-4), (120, 5e-4), (121, 1e-4), (140, 1e-4), (141, 2e-5), (160, 2e-5)])
def test_multistep_lr_cifar(epoch, lr):
    assert multistep_lr(5e-4, epoch, [120, 140], 0.2) == pytest.approx(lr, rel=1e-12)


def test_multistep_lr_all_epochs():
    for e in range(1, 161):
        expected = 5e-4 if e <= 120 else (1e-4 if e <= 140 else 2e-5)
        assert multistep_lr(5e-4, e, (120, 140), 0.2) == pytest.approx(expected, rel=1e-12)
