"""TensorBoard logging of a training run (``certkd train --tensorboard``), an optional extra.

The scalars are those of ``metrics.jsonl``, one point per epoch: ``lr``, ``time_s``, ``train/<key>``
(the epoch means of the loss, its components, ε and batch accuracies) and ``test/<key>`` (the
evaluation of that epoch, when there was one). They are written to ``RUN/tensorboard/``; view them
with ``tensorboard --logdir RUN/tensorboard``. Needs the ``tensorboard`` package:
``pip install 'certkd[tensorboard]'``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from certkd.errors import CertkdError

INSTALL_HINT = "pip install 'certkd[tensorboard]'"


def summary_writer_class():
    """torch's SummaryWriter, or a one-line CertkdError naming the extra to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise CertkdError(f"--tensorboard needs the tensorboard package, which is not installed: {INSTALL_HINT}") \
            from None
    return SummaryWriter


def scalars(record: Mapping[str, Any]) -> Dict[str, float]:
    """The numbers of one metrics.jsonl record as TensorBoard tags (nested keys joined by '/')."""
    out: Dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[prefix] = float(value)

    walk("", {k: v for k, v in record.items() if k != "epoch"})
    return out


class TensorBoardLog:
    """Writes each epoch's record to ``run/tensorboard``; ``purge_step`` drops events of a resumed
    run's epochs that are being trained again."""

    def __init__(self, run_dir: Path, purge_step: Optional[int] = None):
        writer = summary_writer_class()
        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer = writer(log_dir=str(self.log_dir), purge_step=purge_step)

    def write(self, record: Mapping[str, Any]) -> None:
        step = int(record["epoch"])
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
