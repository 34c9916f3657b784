"""One training batch: the per-batch procedure of docs/method.md §4, delegated to the method.

Each method is a class of :mod:`certkd.methods`, looked up by ``cfg.method``; this module
prepares the batch (radii, warm-up) and holds the frozen :class:`Teacher`.

Order matters for BatchNorm: clean forward (train mode) → attack (eval mode) → adversarial
forward in train mode, carried through the same IBP pass, so the bounds use the batch
statistics of the adversarial batch. The loss formulas themselves are the pure functions of
:mod:`certkd.losses`. Every batch mean of a loss term is over the step's explicit ``shard``
(:class:`certkd.distributed.Shard`, handed to the method as ``Batch.shard``): the mean over the
global batch in multi-process training, see :mod:`certkd.distributed`; logged numbers are this
rank's and are averaged by the training loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from certkd.attacks import PGD
from certkd.bounds import interval_bounds
from certkd.config import TrainConfig
from certkd.distributed import LOCAL, Shard
from certkd.methods import Batch, method_class
from certkd.methods._parts import REG_BOX_EPS, WARMUP_EPS  # noqa: F401  (re-exported)


def effective_alpha(cfg: TrainConfig) -> float:
    """The α the method uses: adv-dist (α=0) and ibp-dist (α=1) fix it; other methods use cfg.alpha."""
    return method_class(cfg.method)(cfg).alpha()


@dataclass
class Teacher:
    """A frozen teacher (eval mode, no gradient) and the optional learned feature adapter.

    The adapter sits on the *student's* side: an ``nn.Linear`` from the student's features
    (m_S) to the teacher's (m_T), trained with the student. The target is always the fixed
    teacher feature t = h_T(x); the distance is taken between A(student features) and t, and
    the student's IBP feature box goes through A by the exact interval rule of a linear layer
    (:meth:`adapt`). (On the teacher's side, trained with the distance, the adapter could walk
    the target towards the student: W = 0, b = the student's mean feature is a trivial optimum.)
    """

    model: nn.Module
    adapter: Optional[nn.Linear] = None
    stats: Optional[Any] = None  # certkd.training.teacher_stats.FeatureStats: standardized / class-mean

    def targets(self, x: Tensor) -> Tensor:
        """The fixed target t = h_T(x), (N, m_T): no gradient, no adapter."""
        with torch.no_grad():
            return self.model.features(x)

    def adapt(self, features: Tensor, lower: Optional[Tensor] = None,
              upper: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """Student features (N, m_S) and their IBP box, mapped into the teacher's feature space.

        Returns (A(features), lower', upper') with [lower', upper'] the exact interval image of
        [lower, upper] under A (centre W c + b, radius |W| r); the box is None when not given.
        Without an adapter everything is returned unchanged.
        """
        if self.adapter is None:
            return features, lower, upper
        if lower is None:
            return self.adapter(features), None, None
        box = interval_bounds(nn.Sequential(self.adapter), lower, upper, point=features)
        return box.point_output, box.lower, box.upper

    def logits(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.model(x)


def training_loss(model: nn.Module, x: Tensor, y: Tensor, cfg: TrainConfig, eps_sched: float,
                  reg_active: bool, attack: PGD, teacher: Optional[Teacher] = None, *,
                  shard: Shard = LOCAL) -> Tuple[Tensor, Dict[str, float]]:
    """Loss of one batch and the numbers to log.

    Args:
        model: the network being trained (train mode).
        x, y: batch in pixel space (N, C, H, W) and labels (N,).
        eps_sched: ε_s from the schedule; the IBP radius is ε_s·train_eps_mul and the
            attack radius that times attack_eps_factor (docs/method.md §2.4).
        reg_active: whether this epoch is in warm-up + ramp (regularisers on).
        attack: the training attack.
        teacher: frozen teacher for distillation methods.
        shard: this step's part of the global batch (:func:`certkd.distributed.sharded_batch`);
            the default ``LOCAL`` is one process holding the whole batch.
    """
    eps_tr = eps_sched * cfg.train_eps_mul
    eps_att = eps_tr * cfg.attack_eps_factor
    b = Batch(model=model, x=x, y=y, eps_sched=eps_sched, eps_tr=eps_tr, eps_att=eps_att,
              warmup=eps_tr < WARMUP_EPS, reg_active=reg_active, attack=attack, shard=shard, teacher=teacher,
              logs={"eps": eps_tr})
    loss = method_class(cfg.method)(cfg).loss(b)
    return loss, b.logs
