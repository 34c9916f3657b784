"""ε and learning-rate schedules (docs/method.md §2.4, §3.1, §3.2)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class SmoothedEpsilonSchedule:
    """auto_LiRPA's SmoothedScheduler: 0, then a quartic start, then a linear ramp to ``eps_max``.

    Args:
        eps_max: target ε.
        start: S, the first epoch (1-based) of the ramp; epochs 1..S−1 have ε = 0.
        length: N, ramp length in epochs; ε reaches eps_max at the end of epoch S+N−1.
        steps_per_epoch: L = ceil(|train| / batch size).
        mid: fraction of the ramp spent in the polynomial phase (0.25).
    Call with q, the 0-based global index of the training batch.
    """

    eps_max: float
    start: int
    length: int
    steps_per_epoch: int
    mid: float = 0.25
    power: float = 4.0

    def __call__(self, q: int) -> float:
        q0 = (self.start - 1) * self.steps_per_epoch
        q1 = (self.start + self.length - 1) * self.steps_per_epoch
        if q <= q0:
            return 0.0
        if q >= q1:
            return self.eps_max
        qm = q0 + math.floor(self.mid * (q1 - q0))
        m = qm - q0
        if q < qm:
            a = self.eps_max / (self.power * m ** (self.power - 1) * (q1 - qm) + m ** self.power)
            return a * (q - q0) ** self.power
        if m > 0:
            eps_mid = self.eps_max * m ** self.power / (self.power * m ** (self.power - 1) * (q1 - qm) + m ** self.power)
        else:
            eps_mid = 0.0
        return min(eps_mid + (self.eps_max - eps_mid) * (q - qm) / (q1 - qm), self.eps_max)

    def ramp_end_epoch(self) -> int:
        """Last epoch of warm-up plus ramp (S+N−1); the regularisers are active up to it."""
        return self.start + self.length - 1


def multistep_lr(base_lr: float, epoch: int, milestones: Sequence[int], gamma: float) -> float:
    """Learning rate for 1-based ``epoch``: decays by ``gamma`` after each milestone epoch."""
    return base_lr * gamma ** sum(1 for m in milestones if epoch > m)


def training_eps_reached(config, epoch: int) -> "float | None":
    """The training ε (ε_s · train_eps_mul, as logged in metrics.jsonl) at the end of ``epoch`` for a run's
    config dict (or :class:`~certkd.config.TrainConfig`); None for ``standard`` training, which uses no ε.

    Computed from the schedule with a nominal 1000 steps per epoch (the true count only moves the
    value within the ramp's last step).
    """
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    if get("method") == "standard":
        return None
    eps, mul = float(get("eps", 0.0)), float(get("train_eps_mul", 1.0))
    start, length = int(get("eps_start", 1)), int(get("eps_length", 0))
    if epoch >= start + length - 1:
        return eps * mul
    steps = 1000
    return SmoothedEpsilonSchedule(eps, start, length, steps)(epoch * steps - 1) * mul
