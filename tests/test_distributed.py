"""certkd.distributed: plain behaviour in one process; global statistics over ranks (gloo).

The shard of a step is an explicit :class:`certkd.distributed.Shard` passed to every loss and
attack (issue #13): no module-level mutable state may come back (checked with ``ast``).
End-to-end equality of torchrun training with one process is in tests/training/test_distributed.py.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from certkd import distributed as D

REPO = Path(__file__).resolve().parents[1]


def test_local_shard_is_plain_in_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.setup("cpu") is None and not D.LOCAL.is_global
    t = torch.randn(7, 3)
    assert torch.equal(D.LOCAL.mean(t), t.mean()) and torch.equal(D.LOCAL.sum(t), t.sum())
    x = torch.zeros(4, 1, 2, 2)
    assert torch.equal(D.LOCAL.uniform_like(x, torch.Generator().manual_seed(3)),
                       torch.rand(x.shape, generator=torch.Generator().manual_seed(3)))
    with D.sharded_batch(None, 4, 8) as shard:  # a single process holds the whole batch
        assert shard is D.LOCAL
    D.average_gradients(None, [nn.Parameter(torch.ones(2))])  # no-op
    D.shutdown(None)  # no-op


def test_shard_is_frozen_and_checks_its_rows():
    s = D.Shard(rank=1, world_size=2, local_n=2, global_n=5)  # rows 1, 3 of 5
    assert s.is_global and D.step_shard(D.DistContext(1, 2, 1, torch.device("cpu")), 2, 5) == s
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.global_n = 6  # type: ignore[misc]
    with pytest.raises(RuntimeError, match="holds 3 of 5 samples, expected 2"):
        D.Shard(rank=1, world_size=2, local_n=3, global_n=5)
    with pytest.raises(ValueError):
        D.Shard(rank=0, world_size=2, local_n=3)
    with pytest.raises(ValueError):
        D.Shard(rank=2, world_size=2)
    with pytest.raises(RuntimeError, match="first dimension is this rank's batch"):
        s.mean(torch.ones(3))  # the shape is checked before any collective


def test_bind_shard_sets_the_sync_batchnorm_for_the_block_only():
    net = D.convert_batchnorm(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 2),
                                            nn.BatchNorm1d(2)))
    bns = [net[1], net[4]]
    assert all(m.shard is D.LOCAL for m in bns)
    s = D.Shard(rank=0, world_size=2, local_n=2, global_n=4)
    with D.bind_shard(s, net, None) as got:
        assert got is s and all(m.shard is s for m in bns)
    assert all(m.shard is D.LOCAL for m in bns) and D.SyncBatchNorm2d.shard is D.LOCAL  # the class default is untouched
    with pytest.raises(KeyError):
        with D.bind_shard(s, net):
            raise KeyError("boom")
    assert all(m.shard is D.LOCAL for m in bns)  # restored on errors too


# Module-level names distributed.py may bind: imports, functions, classes, and these constants.
_CONSTANTS = {"T", "BUCKET_BYTES", "LOCAL"}


def test_distributed_has_no_mutable_module_state():
    """Issue #13: the shard is passed explicitly. A module global such as the old ``_SHARD`` (or a
    ``global`` statement that rebinds one) would make the losses depend on hidden state again."""
    path = REPO / "src" / "certkd" / "distributed.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    assigned = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
        for t in targets:
            assigned.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
    assert assigned <= _CONSTANTS, f"module-level state in distributed.py: {sorted(assigned - _CONSTANTS)}"
    rebinding = [n.lineno for n in ast.walk(tree) if isinstance(n, (ast.Global, ast.Nonlocal))]
    assert not rebinding, f"global/nonlocal statements in distributed.py at lines {rebinding}"
    assert dataclasses.is_dataclass(D.LOCAL) and D.Shard.__dataclass_params__.frozen  # LOCAL is immutable
    assert D.DistContext.__dataclass_params__.frozen


def test_convert_batchnorm_keeps_state_and_single_process_behaviour():
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4))
    net = D.convert_batchnorm(copy.deepcopy(ref))
    assert isinstance(net[1], nn.BatchNorm2d) and isinstance(net[4], nn.BatchNorm1d)  # IBP/CROWN rules apply
    assert type(net[1]) is D.SyncBatchNorm2d and type(net[4]) is D.SyncBatchNorm1d
    assert net.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(6, 1, 4, 4)
    assert torch.equal(net(x), ref(x))  # outside a sharded step: nn.BatchNorm itself
    for a, b in zip(net.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)
    out, mean, var = net[1].forward_with_stats(net[0](x))
    v, m = torch.var_mean(net[0](x), [0, 2, 3], unbiased=False)
    assert torch.equal(mean, m) and torch.equal(var, v)


WORKER = r'''
import torch
from torch import nn
torch.set_default_dtype(torch.float64)
from certkd import distributed as D
from certkd.bounds.ibp import interval_bounds
from certkd.losses import certified as L
from certkd.losses.regularizers import warmup_regularizer

ctx = D.setup("cpu")
assert ctx is not None and ctx.world_size == 2
N = 5  # uneven: rank 0 holds 3 samples, rank 1 holds 2


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(48, 5), nn.BatchNorm1d(5), nn.ReLU())


def step(model, lo, hi, point, sharded):
    with D.sharded_batch(ctx if sharded else None, lo.shape[0], N if sharded else lo.shape[0], model) as shard:
        b = interval_bounds(model, lo, hi, point=point)   # train-mode BN: statistics of the point's batch
        out = model(point)                                 # a normal train-mode forward
        loss = shard.mean(b.upper - b.lower) * shard.mean(out ** 2) + 0.1 * shard.sum(b.point_output)
        noise = shard.uniform_like(point)
    assert all(m.shard is D.LOCAL for m in model.modules() if hasattr(m, "shard"))  # unbound after the step
    return loss, b, out, noise


torch.manual_seed(1)
x = torch.randn(N, 2, 4, 4)
point = x + 0.05 * torch.randn_like(x)
lo, hi = x - 0.1, x + 0.1
ref, net = make(), D.convert_batchnorm(make())
torch.manual_seed(2)
l_ref, b_ref, out_ref, u_ref = step(ref, lo, hi, point, False)
l_ref.backward()
torch.manual_seed(2)
s = slice(ctx.rank, None, ctx.world_size)
loss, b, out, u = step(net, lo[s], hi[s], point[s], True)
loss.backward()
D.average_gradients(ctx, net.parameters())
close = lambda a, b, what: torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=what)
close(loss, l_ref, "loss")
close(b.lower, b_ref.lower[s], "IBP lower"); close(b.upper, b_ref.upper[s], "IBP upper")
close(out, out_ref[s], "forward"); close(u, u_ref[s], "attack noise")
for (name, p), q in zip(net.named_parameters(), ref.parameters()):
    close(p.grad, q.grad, "grad " + name)
for (name, t), r in zip(net.state_dict().items(), ref.state_dict().values()):
    close(t, r, "buffer " + name)
logs = D.reduce_logs(ctx, {"acc": float(ctx.rank)}, lo[s].shape[0], N)
close(torch.tensor(logs["acc"]), torch.tensor(2 / 5), "logs")

# An explicit shard, no context manager: a loss given the shard of a 2-rank world is the global
# batch's mean (computed by hand over all N rows), given nothing it is this rank's mean.
torch.manual_seed(3)
lb, d = torch.randn(N, 4), torch.randn(N, 4)
shard = D.Shard(rank=ctx.rank, world_size=2, local_n=len(range(ctx.rank, N, 2)), global_n=N)
per_sample = torch.log1p(torch.exp(-lb).sum(1))  # difference_loss by hand
close(L.ibp_loss(lb[s], shard=shard), per_sample.sum() / N, "explicit shard: global mean")
close(L.ibp_loss(lb[s]), per_sample[s].sum() / len(per_sample[s]), "no shard: this rank's mean")
close(L.exp_ibp_loss(lb[s], d[s], 0.5, shard), L.exp_ibp_loss(lb, d, 0.5), "Exp-IBP: power of global means")
pre = [(torch.randn(N, 6), torch.rand(N, 6))]
close(warmup_regularizer([(c[s], r[s]) for c, r in pre], torch.tensor(0.1), shard=shard),
      warmup_regularizer(pre, torch.tensor(0.1)), "regulariser: ratios of global means")
torch.optim.Adam(net.parameters())  # the first optimiser imports torch._dynamo (see D._import_before_init)
assert ctx.owns_group
D.shutdown(ctx)
# the group's gloo threads end with it: none is left for interpreter finalisation to tear down (abort -6)
import os
tasks = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in tasks]
assert not [n for n in names if "gloo" in n], names
open(f"rank{ctx.rank}.ok", "w").close()  # a file per rank: the ranks' stdout lines can interleave
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(tmp_path: Path, source: str) -> None:
    """Run the worker ``source`` under ``torchrun --nproc_per_node 2`` (gloo, one thread each) in tmp_path;
    every rank must exit cleanly and write ``rank<r>.ok``."""
    script = tmp_path / "worker.py"
    script.write_text(source)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + [p for p in [env.get("PYTHONPATH")] if p])
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(_free_port()), str(script)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "terminate called" not in res.stderr, res.stdout[-3000:] + res.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("rank*.ok")) == ["rank0.ok", "rank1.ok"]


def test_two_ranks_equal_one_batch(tmp_path):
    """Sync BN (forward, IBP with a carried point, running statistics), global means and sums
    with their gradients, attack noise and averaged gradients equal the full batch in one process."""
    run_two_ranks(tmp_path, WORKER)
