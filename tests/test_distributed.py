"""certkd.distributed: plain behaviour in one process; global statistics over ranks (gloo).

End-to-end equality of torchrun training with one process is in tests/training/test_distributed.py.
"""
from __future__ import annotations

import copy
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


def test_helpers_are_plain_outside_a_sharded_step(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert D.setup("cpu") is None and not D.active()
    t = torch.randn(7, 3)
    assert torch.equal(D.batch_mean(t), t.mean()) and torch.equal(D.batch_sum(t), t.sum())
    x = torch.zeros(4, 1, 2, 2)
    assert torch.equal(D.uniform_like(x, torch.Generator().manual_seed(3)),
                       torch.rand(x.shape, generator=torch.Generator().manual_seed(3)))
    with D.sharded_batch(None, 4, 8):  # a single process has no shard
        assert not D.active()
    D.average_gradients(None, [nn.Parameter(torch.ones(2))])  # no-op


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
import contextlib, torch
from torch import nn
torch.set_default_dtype(torch.float64)
from certkd import distributed as D
from certkd.bounds.ibp import interval_bounds

ctx = D.setup("cpu")
assert ctx is not None and ctx.world_size == 2
N = 5  # uneven: rank 0 holds 3 samples, rank 1 holds 2


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(48, 5), nn.BatchNorm1d(5), nn.ReLU())


def step(model, lo, hi, point, shard):
    with D.sharded_batch(ctx, lo.shape[0], N) if shard else contextlib.nullcontext():
        b = interval_bounds(model, lo, hi, point=point)   # train-mode BN: statistics of the point's batch
        out = model(point)                                 # a normal train-mode forward
        loss = D.batch_mean(b.upper - b.lower) * D.batch_mean(out ** 2) + 0.1 * D.batch_sum(b.point_output)
        noise = D.uniform_like(point)
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
torch.optim.Adam(net.parameters())  # the first optimiser imports torch._dynamo (see D._import_before_init)
D.shutdown()
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


def test_two_ranks_equal_one_batch(tmp_path):
    """Sync BN (forward, IBP with a carried point, running statistics), global means and sums
    with their gradients, attack noise and averaged gradients equal the full batch in one process."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + [p for p in [env.get("PYTHONPATH")] if p])
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                          "127.0.0.1", "--master_port", str(_free_port()), str(script)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "terminate called" not in res.stderr, res.stdout[-3000:] + res.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("rank*.ok")) == ["rank0.ok", "rank1.ok"]
