"""The training loop's bookkeeping without a host–device synchronisation per step (docs/performance.md).

A step leaves its loss, its per-parameter gradient norms and its log terms as device tensors here;
:meth:`StepMonitor.flush` reads them all back in one transfer every :data:`SYNC_EVERY` steps and at
the end of the epoch. It then checks them in step order, exactly as a per-step check would: the first
non-finite loss or gradient raises :class:`NonFiniteError` naming its epoch, batch, step and term
(or parameter), and the logged sums are the same Python floats, added in the same order, as a per-step
``.item()`` gave. A fault found late costs at most ``SYNC_EVERY - 1`` wasted steps, never a
checkpoint: the epoch's checkpoint is written only after the epoch's last flush.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from certkd.errors import CertkdError

#: Steps between two read-backs on an accelerator. On a CPU a read-back costs nothing, but one code
#: path for every device keeps the messages and the logged numbers the same everywhere.
SYNC_EVERY = 50

LogValue = Union[float, Tensor]


class NonFiniteError(CertkdError):
    """A loss or gradient became NaN/Inf; the last good checkpoint is left intact."""


def gradient_norms(params: Sequence[torch.nn.Parameter]) -> Tuple[Tensor, Tensor, List[int]]:
    """Per-parameter 2-norms of the gradients (P,), their total norm (), both on the device, and the
    indices into ``params`` of the P parameters that have a gradient.

    The same arithmetic as ``torch.nn.utils.get_total_norm`` (``_foreach_norm``, then the norm of the
    stacked norms), so clipping with the total is bit-identical to ``clip_grad_norm_``; the per-parameter
    norms name a parameter with a non-finite gradient without a second pass over the gradients.
    """
    present = [i for i, p in enumerate(params) if p.grad is not None]
    if not present:
        zero = torch.zeros(())
        return zero.reshape(0), zero, present
    norms = torch._foreach_norm([params[i].grad for i in present], 2.0)
    stacked = torch.stack([torch.linalg.vector_norm(n) for n in norms])
    return stacked, torch.linalg.vector_norm(stacked), present


class StepMonitor:
    """Collects one epoch's steps and checks them at each flush.

    Args:
        epoch: the epoch (1-based), for the messages.
        names: the name of each trained parameter, in the order given to :func:`gradient_norms`.
        fix: the message's fix for a fault in this epoch (``--resume`` or not).
        sync_every: steps between flushes.
    """

    def __init__(self, epoch: int, names: Sequence[str], fix: Callable[[str], str], sync_every: int = SYNC_EVERY):
        self.epoch, self.names, self.fix, self.sync_every = epoch, list(names), fix, sync_every
        self.pending: List[Tuple[int, int, Tensor, Optional[Tuple[Tensor, List[int]]], Dict[str, LogValue]]] = []
        self.sums: Dict[str, float] = {}
        self.counts: Dict[str, int] = {}
        self.last: Dict[str, float] = {}

    def record(self, batch: int, step: int, loss: Tensor, grad_norms: Optional[Tuple[Tensor, List[int]]],
               logs: Mapping[str, LogValue]) -> bool:
        """Keep one step (``batch``, ``step`` 0-based; ``grad_norms``: the norms and indices of
        :func:`gradient_norms`); flushes when ``sync_every`` are waiting.

        Returns whether it flushed (the caller may then refresh a progress bar from :attr:`last`).
        """
        self.pending.append((batch, step, loss.detach(), grad_norms, dict(logs)))
        if len(self.pending) >= self.sync_every:
            self.flush()
            return True
        return False

    def flush(self) -> None:
        """Read back every waiting step in one transfer; raise on the first non-finite one."""
        if not self.pending:
            return
        tensors: List[Tensor] = []
        for _, _, loss, norms, logs in self.pending:
            tensors.append(loss.reshape(1))
            if norms is not None:
                tensors.append(norms[0].reshape(-1))
            tensors.extend(v.detach().reshape(1) for v in logs.values() if isinstance(v, Tensor))
        flat = torch.cat([t.to(torch.float64) for t in tensors]).tolist() if tensors else []
        pos = 0
        steps, self.pending = self.pending, []
        for batch, step, _, norms, logs in steps:
            loss_value = flat[pos]
            pos += 1
            norm_values: List[Tuple[int, float]] = []
            if norms is not None:
                norm_values = list(zip(norms[1], flat[pos:pos + len(norms[1])]))
                pos += len(norms[1])
            values: Dict[str, float] = {}
            for k, v in logs.items():
                if isinstance(v, Tensor):
                    values[k] = flat[pos]
                    pos += 1
                else:
                    values[k] = float(v)
            self._check(batch, step, loss_value, norm_values, values)
            values["loss"] = loss_value
            for k, v in values.items():
                self.sums[k] = self.sums.get(k, 0.0) + v
                self.counts[k] = self.counts.get(k, 0) + 1
            self.last = values

    def _check(self, batch: int, step: int, loss: float, norms: List[Tuple[int, float]],
               logs: Dict[str, float]) -> None:
        where = f"at epoch {self.epoch}, batch {batch + 1} (step {step + 1})"
        if not math.isfinite(loss):
            bad = [k for k, v in logs.items() if not math.isfinite(v)] or ["loss"]
            terms = ", ".join(f"{k}={v:.4g}" for k, v in logs.items())
            raise NonFiniteError(f"non-finite loss {where} in term {'/'.join(bad)} ({terms}); "
                                 + self.fix("lower --lr or check the data"))
        bad_name = next((self.names[j] for j, n in norms if not math.isfinite(n)), None)
        if bad_name is not None:
            raise NonFiniteError(f"non-finite gradient {where} in {bad_name} (loss {loss:.4g}); "
                                 + self.fix("lower --lr"))

    def means(self) -> Dict[str, float]:
        """The epoch's mean of every logged term (call after the last :meth:`flush`)."""
        return {k: self.sums[k] / self.counts[k] for k in self.sums}
