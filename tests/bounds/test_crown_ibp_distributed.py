"""CROWN-IBP with sync BatchNorm over two ranks (gloo) equals the full batch in one process: the
backward pass uses the global batch statistics that the IBP pass used (certkd.bounds.crown_ibp)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_distributed import run_two_ranks  # noqa: E402  (the torchrun launcher of the tests)

WORKER = r'''
import torch
from torch import nn
torch.set_default_dtype(torch.float64)
from certkd import distributed as D
from certkd.bounds.crown_ibp import crown_ibp_bounds

ctx = D.setup("cpu")
assert ctx is not None and ctx.world_size == 2
N = 5  # uneven: rank 0 holds 3 samples, rank 1 holds 2


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(48, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4))


def step(model, lo, hi, point, y, sharded):
    with D.sharded_batch(ctx if sharded else None, lo.shape[0], N if sharded else lo.shape[0], model) as shard:
        lb, lb_ibp, _ = crown_ibp_bounds(model, lo, hi, y, point=point)
        loss = shard.mean(torch.log1p(torch.exp(-lb).sum(1)))
    return loss, lb, lb_ibp


torch.manual_seed(1)
x = torch.randn(N, 2, 4, 4)
y = torch.tensor([0, 1, 2, 3, 1])
lo, hi = x - 0.1, x + 0.1
ref, net = make(), D.convert_batchnorm(make())
l_ref, lb_ref, ibp_ref = step(ref, lo, hi, x, y, False)
l_ref.backward()
s = slice(ctx.rank, None, ctx.world_size)
loss, lb, lb_ibp = step(net, lo[s], hi[s], x[s], y[s], True)
loss.backward()
D.average_gradients(ctx, net.parameters())
close = lambda a, b, what: torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=what)
close(lb, lb_ref[s], "CROWN-IBP bound"); close(lb_ibp, ibp_ref[s], "IBP bound"); close(loss, l_ref, "loss")
assert (lb > lb_ibp + 1e-6).any()  # CROWN-IBP differs from IBP here, so the statistics matter
for (name, p), q in zip(net.named_parameters(), ref.parameters()):
    close(p.grad, q.grad, "grad " + name)
for (name, t), r in zip(net.state_dict().items(), ref.state_dict().values()):
    close(t, r, "buffer " + name)
D.shutdown(ctx)
open(f"rank{ctx.rank}.ok", "w").close()
'''


@pytest.mark.slow  # ~15 s: two torchrun processes
def test_two_ranks_equal_one_batch(tmp_path):
    run_two_ranks(tmp_path, WORKER)
