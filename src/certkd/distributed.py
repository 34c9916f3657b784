"""Data-parallel training over processes (``torchrun``) that equals single-process training.

``torchrun --nproc_per_node W -m certkd train ...`` starts W processes; each reads
``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` and :func:`setup` joins the process group (NCCL with
device ``cuda:LOCAL_RANK`` on CUDA, gloo on CPU). The config's ``batch_size`` is the *global*
batch G: every step, each rank takes the slice ``chunk[rank::W]`` of the same shuffled global
chunk (:func:`certkd.data.iterate_batches`, same seed on every rank), so G must be a multiple
of W. The goal is that W processes compute what one process with batch G computes, up to float
rounding; the pieces below are what that takes.

Design
------
* **Explicit shard, no module state.** A step's place in the global batch is a frozen
  :class:`Shard` (rank, world size, local and global batch size) that :func:`sharded_batch`
  returns and the trainer passes down: through ``training_loss`` into the method's
  :class:`certkd.methods.Batch` (``b.shard``), and from there as the ``shard=`` keyword of every
  loss, regulariser and attack. :data:`LOCAL`, the default of that keyword, is one process
  holding the whole batch: plain ``t.mean()``, ``t.sum()`` and ``torch.rand``, so single-process
  numerics are unchanged. There is no mutable module state: a loss called outside a step
  (tests, evaluation) cannot pick up a reduction it was not given.
* **Global batch statistics, everywhere.** With a global shard,

  - every train-mode BatchNorm uses the mean and biased variance of the *global* batch (sync
    BN: :func:`convert_batchnorm` swaps the class of each BatchNorm to
    :class:`SyncBatchNorm1d`/:class:`SyncBatchNorm2d`, which keep the state dict and
    ``isinstance`` of the originals). A module is called by code that cannot pass it an
    argument (``nn.Sequential``, the IBP pass), so :func:`sharded_batch` sets the shard on the
    sync BN modules of the models it is given for the duration of the step (:func:`bind_shard`)
    and puts back :data:`LOCAL` afterwards. The IBP rule for train-mode BN (docs/method.md §2.2)
    gets the same global statistics of the carried point through :meth:`forward_with_stats`, so
    the bounds use the statistics of the global adversarial batch, as in one process;
  - every batch mean or sum of a loss (cross-entropy, IBP/CC/MTL/Exp terms, distillation
    distances, the warm-up regularisers and their ratios of means, δ0) is
    :meth:`Shard.mean`/:meth:`Shard.sum` of the shard it is given.

  The reductions are differentiable all-reduces (sum in forward, sum of the incoming gradients
  in backward). Every rank therefore holds the same *global* loss, its backward gives W times
  this rank's share of the gradient on data paths plus the gradient of parameter-only terms
  (the L1 penalty) once, and averaging the parameter gradients over ranks yields exactly the
  single-process gradient, including for losses that are not means of per-sample terms
  (Exp-IBP's product of means, the regularisers' ratios of means) and for uneven final
  batches (shards differ in size by at most one, possibly zero).
* **Explicit gradient all-reduce, not DistributedDataParallel.** After ``backward`` the
  parameter gradients are averaged with bucketed all-reduces (:func:`average_gradients`).
  DDP does not fit: its reducer is armed by ``DDP.forward``, but the losses call
  ``model.features``, ``model.head`` and the bound functions, plus extra forwards (clean,
  attack, adversarial) and input-gradient ``autograd.grad`` calls per step; with DDP these
  either bypass synchronisation silently or need ``no_sync``/``static_graph`` workarounds.
  DDP's buffer broadcast would also overwrite BN running statistics, which sync BN already
  keeps identical. The cost is no overlap of the gradient all-reduce with the backward pass
  (one ~68 MB all-reduce per step for CNN7), small next to the IBP/attack compute.
  Gradient clipping and the optimiser step run after averaging, identically on every rank,
  so parameters stay bitwise equal across ranks (also broadcast from rank 0 at start).
* **Same random numbers.** The only randomness of a step is the PGD random start. With a
  global shard :meth:`Shard.uniform_like` draws the uniform noise for the whole global batch on
  every rank and keeps this rank's rows, so every rank's RNG stream stays identical to the
  others' and to a single-process run, and each sample gets the start it would get in one
  process. Augmentation is drawn per global chunk by ``iterate_batches``. Models are
  dropout-free. Hence checkpoints (which store rank 0's RNG state) resume all ranks.
* **Rank 0 writes.** Only rank 0 prepares the run directory, writes config, metrics,
  checkpoints and logs, and runs the periodic evaluation; the other ranks wait at a
  barrier (:func:`on_main` passes rank 0's :class:`CertkdError` to every rank). Whether this
  process created the process group (and so must destroy it) is part of its
  :class:`DistContext`, not module state. The process group timeout is
  ``CERTKD_DIST_TIMEOUT_MIN`` minutes (default 120) so that a long evaluation on rank 0 does
  not time out the waiting ranks.

Remaining differences to one process are float rounding only: statistics and means are
summed per rank and then across ranks, in another order. They are ~1e-7 relative per step
and can grow where a sign is decided by a near-zero value (the FGSM-to-vertex attack).
"""
from __future__ import annotations

import contextlib
import datetime
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from certkd.errors import CertkdError

T = TypeVar("T")
BUCKET_BYTES = 25 * 2 ** 20


@dataclass(frozen=True)
class DistContext:
    """This process's place in a multi-process run; ``owns_group``: :func:`setup` created the
    process group, so :func:`shutdown` destroys it."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Shard:
    """This process's rows of one step's batch, and the batch reductions that follow from them.

    ``Shard()`` (:data:`LOCAL`) is one process holding the whole batch: :meth:`mean`,
    :meth:`sum` and :meth:`uniform_like` are plain ``t.mean()``, ``t.sum()`` and ``torch.rand``.
    A *global* shard (``local_n``/``global_n`` set, from :func:`sharded_batch`) holds the rows
    ``rank::world_size`` of a global batch of ``global_n``; its reductions are differentiable
    all-reduces over the process group, so every rank gets the global batch's value.
    """

    rank: int = 0
    world_size: int = 1
    local_n: Optional[int] = None
    global_n: Optional[int] = None

    def __post_init__(self) -> None:
        if (self.local_n is None) != (self.global_n is None):
            raise ValueError("a Shard needs both local_n and global_n, or neither (one process)")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world_size})")
        if self.global_n is not None:
            expected = len(range(self.rank, self.global_n, self.world_size))
            if self.local_n != expected:
                raise RuntimeError(f"rank {self.rank} holds {self.local_n} of {self.global_n} samples, "
                                   f"expected {expected}")

    @property
    def is_global(self) -> bool:
        """Whether reductions are over the global batch (all-reduces) rather than this process's rows."""
        return self.global_n is not None

    def global_rows(self, t: Tensor, what: str) -> int:
        """``global_n``, after checking that ``t``'s first dimension is this rank's batch."""
        assert self.global_n is not None, "global_rows of the LOCAL shard"
        if t.dim() == 0 or t.shape[0] != self.local_n:
            raise RuntimeError(f"{what} expects a tensor whose first dimension is this rank's batch "
                               f"({self.local_n}), got shape {tuple(t.shape)}")
        return self.global_n

    def sum(self, t: Tensor) -> Tensor:
        """Sum of all elements of ``t`` (N, *) over the batch (plain ``t.sum()`` for LOCAL)."""
        if not self.is_global:
            return t.sum()
        self.global_rows(t, "Shard.sum")
        return all_reduce_sum(t.sum())

    def mean(self, t: Tensor) -> Tensor:
        """Mean of all elements of ``t`` (N, *) over the batch (plain ``t.mean()`` for LOCAL)."""
        if not self.is_global:
            return t.mean()
        n = self.global_rows(t, "Shard.mean") * math.prod(t.shape[1:])
        return all_reduce_sum(t.sum()) / n

    def uniform_like(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """U[0, 1) noise of x's shape, dtype and device (drawn on the CPU with a ``generator``).

        The noise is drawn in float32 (then cast), so it does not depend on the working precision
        (``certkd verify --dtype float64`` starts its attack where the float32 run does).
        With a global shard the noise is drawn for the global batch and this rank's rows are
        kept, so each sample's noise and every rank's RNG stream equal a single-process run.
        """
        shape = tuple(x.shape)
        dev = torch.device("cpu") if generator is not None else x.device
        if self.global_n is not None and x.dim() > 0 and x.shape[0] == self.local_n:
            full = torch.rand((self.global_n,) + shape[1:], generator=generator, device=dev, dtype=torch.float32)
            return full[self.rank::self.world_size].to(device=x.device, dtype=x.dtype)
        return torch.rand(shape, generator=generator, device=dev, dtype=torch.float32).to(device=x.device,
                                                                                          dtype=x.dtype)


#: One process holding the whole batch: the default ``shard`` of every loss and attack.
LOCAL = Shard()


def env_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when absent)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise CertkdError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def setup(device: str) -> Optional[DistContext]:
    """Join the process group when started by torchrun (or inside one); None for one process.

    Args:
        device: the config's device: ``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]``.
            With several processes on CUDA each rank uses ``cuda:LOCAL_RANK`` (N is ignored).
    """
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        world = env_world_size()
        rank = int(os.environ.get("RANK", "0"))
    if world <= 1:
        return None
    if not dist.is_available():
        raise CertkdError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise CertkdError(f"device '{device}' requested but CUDA is not available; use --device cpu or auto")
        if local_rank >= torch.cuda.device_count():
            raise CertkdError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                              "lower --nproc_per_node")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif device in ("cpu", "auto"):
        dev = torch.device("cpu")
    else:
        raise CertkdError(f"unknown device '{device}'; use auto, cpu or cuda[:N]")
    owns_group = False
    if not dist.is_initialized():
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
            if key not in os.environ:
                raise CertkdError(f"WORLD_SIZE={world} but {key} is not set; start with torchrun --nproc_per_node N")
        _import_before_init()
        minutes = float(os.environ.get("CERTKD_DIST_TIMEOUT_MIN", "120"))
        kwargs: Dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=minutes), **kwargs)
        owns_group = True
    elif (dist.get_backend() == "nccl") != (dev.type == "cuda"):
        raise CertkdError(f"the process group uses {dist.get_backend()} but training runs on {dev}; "
                          "use nccl with CUDA and gloo with --device cpu")
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev, owns_group=owns_group)


def _import_before_init() -> None:
    """Import now, before the process group exists, the torch modules that later code imports lazily.

    Several torch.distributed modules bind the default group as a default argument when they are
    imported (``def broadcast(tensor, src, group=group.WORLD)`` in ``torch.distributed.nn.functional``,
    likewise in ``_shard``, ``fsdp``). The first optimiser imports ``torch._dynamo``, which imports
    them; after ``init_process_group`` that keeps a reference to the default ProcessGroup, so
    ``destroy_process_group`` no longer frees it: its gloo threads live on until interpreter
    finalisation, which then tears them down and aborts the process now and then ("terminate
    called without an active exception", exit -6). Imported here, the defaults bind None.
    """
    try:
        import torch._dynamo  # noqa: F401  (what torch.optim imports on its first optimiser)
    except Exception:  # pragma: no cover - torch builds without dynamo
        pass
    for name in ("torch.distributed.nn.functional", "torch.distributed.optim"):
        try:
            __import__(name)
        except Exception:  # pragma: no cover - optional parts of torch.distributed
            pass


def shutdown(ctx: Optional[DistContext]) -> None:
    """Leave the process group if :func:`setup` created it (``ctx.owns_group``); no-op for None."""
    if ctx is not None and ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: Optional[DistContext]) -> None:
    if ctx is None:
        return
    if ctx.device.type == "cuda":
        dist.barrier(device_ids=[ctx.device.index])
    else:
        dist.barrier()


def on_main(ctx: Optional[DistContext], fn: Callable[[], T]) -> Optional[T]:
    """Run ``fn`` on rank 0 only, then pass its CertkdError (if any) to every rank and sync."""
    if ctx is None:
        return fn()
    result, err = None, None
    if ctx.is_main:
        try:
            result = fn()
        except CertkdError as e:
            err = e
    msg: List[Optional[str]] = [None if err is None else str(err)]
    dist.broadcast_object_list(msg, src=0, device=ctx.device)
    if err is not None:
        raise err
    if msg[0] is not None:
        raise CertkdError(msg[0])
    return result


def broadcast_module(ctx: Optional[DistContext], *modules: Optional[nn.Module]) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if ctx is None:
        return
    with torch.no_grad():
        for m in modules:
            if m is None:
                continue
            for t in list(m.parameters()) + list(m.buffers()):
                dist.broadcast(t.data, src=0)


# ------------------------------------------------------------------------- one sharded step

def step_shard(ctx: Optional[DistContext], local_n: int, global_n: int) -> Shard:
    """The shard of one step: this rank holds ``local_n`` of the ``global_n`` samples, the rows
    ``rank::world_size``; :data:`LOCAL` for ``ctx=None`` (one process)."""
    if ctx is None:
        return LOCAL
    return Shard(ctx.rank, ctx.world_size, local_n, global_n)


@contextlib.contextmanager
def bind_shard(shard: Shard, *models: Optional[nn.Module]) -> Iterator[Shard]:
    """Give the sync BN modules of ``models`` the ``shard`` for this block, then their previous one.

    Modules are called by code that passes them no shard (``nn.Sequential``, the IBP pass), so
    the trainer sets it on them explicitly for one step; outside it they hold :data:`LOCAL` and
    behave as plain BN.
    """
    bns = [m for model in models if model is not None for m in model.modules()
           if isinstance(m, _SyncBatchNormMixin)]
    prev = [m.shard for m in bns]
    for m in bns:
        m.shard = shard
    try:
        yield shard
    finally:
        for m, old in zip(bns, prev):
            m.shard = old


@contextlib.contextmanager
def sharded_batch(ctx: Optional[DistContext], local_n: int, global_n: int,
                  *models: Optional[nn.Module]) -> Iterator[Shard]:
    """One training step: yields its :class:`Shard` (:func:`step_shard`), to be passed to the
    losses and the attack, and binds it to the sync BN modules of ``models`` for the block
    (:func:`bind_shard`). For ``ctx=None`` it yields :data:`LOCAL`."""
    with bind_shard(step_shard(ctx, local_n, global_n), *models) as shard:
        yield shard


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks. Every rank holds the same downstream (global) computation, so the
    gradient of this rank's input is the sum over ranks of the incoming gradients."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:  # type: ignore[override]
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(t: Tensor) -> Tensor:
    """Differentiable sum over ranks; backward sums the incoming gradients over ranks."""
    return _AllReduceSum.apply(t)


def average_gradients(ctx: Optional[DistContext], params: Iterable[nn.Parameter],
                      bucket_bytes: int = BUCKET_BYTES) -> None:
    """Average ``.grad`` over ranks with bucketed all-reduces (every rank has the same set of grads)."""
    if ctx is None:
        return
    grads = [p.grad for p in params if p.grad is not None]
    buckets: List[List[Tensor]] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        if not buckets or size + nbytes > bucket_bytes or buckets[-1][0].dtype != g.dtype \
                or buckets[-1][0].device != g.device:
            buckets.append([])
            size = 0
        buckets[-1].append(g)
        size += nbytes
    for bucket in buckets:
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat.div_(ctx.world_size)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def reduce_logs(ctx: Optional[DistContext], logs: Dict[str, Any], local_n: int, global_n: int) -> Dict[str, Any]:
    """Per-step log values as for the global batch: this rank's values weighted by its share."""
    if ctx is None:
        return logs
    keys = sorted(logs)
    w = local_n / global_n
    vals = torch.stack([torch.as_tensor(logs[k], dtype=torch.float64, device=ctx.device).reshape(()) * w
                        if local_n else torch.zeros((), dtype=torch.float64, device=ctx.device) for k in keys])
    dist.all_reduce(vals)
    return dict(zip(keys, vals.unbind()))  # still on the device: read back by the loop's StepMonitor


# ------------------------------------------------------------------------------ sync BatchNorm

class _SyncBatchNormMixin:
    """Train-mode statistics over the global batch while a global :class:`Shard` is bound
    (:func:`bind_shard`); otherwise the parent BN."""

    shard: Shard = LOCAL  # set per step by bind_shard; LOCAL is immutable

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        if self.training and self.shard.is_global:
            return self.forward_with_stats(x)[0]
        return super().forward(x)  # type: ignore[misc]

    def forward_with_stats(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(output, mean, biased var) of a train-mode forward; the statistics are global while a
        global shard is bound. Updates the running statistics like ``nn.BatchNorm`` does."""
        self._check_input_dim(x)  # type: ignore[attr-defined]
        dims = [0] + list(range(2, x.dim()))
        shard = self.shard
        if not shard.is_global:
            var, mean = torch.var_mean(x, dims, unbiased=False)
            return super().forward(x), mean, var  # type: ignore[misc]
        count = shard.global_rows(x, "SyncBatchNorm") * math.prod(x.shape[2:])
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = all_reduce_sum(x.sum(dims)) / count
        centered = x - mean.view(shape)
        var = all_reduce_sum((centered * centered).sum(dims)) / count
        scale = torch.rsqrt(var + self.eps)  # type: ignore[attr-defined]
        if self.affine:  # type: ignore[attr-defined]
            out = torch.addcmul(self.bias.view(shape), centered, (scale * self.weight).view(shape))  # type: ignore
        else:
            out = centered * scale.view(shape)
        if self.track_running_stats and self.running_mean is not None:  # type: ignore[attr-defined]
            with torch.no_grad():
                self.num_batches_tracked.add_(1)  # type: ignore[attr-defined]
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)  # type: ignore
                unbiased = var.detach() * (count / max(count - 1, 1))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)  # type: ignore[attr-defined]
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)  # type: ignore[attr-defined]
        return out, mean, var


class SyncBatchNorm1d(_SyncBatchNormMixin, nn.BatchNorm1d):
    pass


class SyncBatchNorm2d(_SyncBatchNormMixin, nn.BatchNorm2d):
    pass


def convert_batchnorm(model: nn.Module) -> nn.Module:
    """Make every BatchNorm1d/2d of ``model`` sync BN in place (class swap: same state dict)."""
    for m in model.modules():
        if type(m) is nn.BatchNorm1d:
            m.__class__ = SyncBatchNorm1d
        elif type(m) is nn.BatchNorm2d:
            m.__class__ = SyncBatchNorm2d
    return model
