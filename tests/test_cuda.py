"""CUDA checks (skipped without a GPU; run by benchmarks/gpu_check.sh): TF32 flags take effect, IBP and CROWN
bounds are sound and equal to the CPU float64 ones on CUDA, a training step on CUDA equals the CPU step, and
training on CUDA sets the TF32 flags as configured (evaluation always without TF32)."""
from __future__ import annotations

import pytest
import torch

import certkd.training.loop as loop
from certkd import precision, resolve_config, train
from certkd.attacks import PGD, linf_box
from certkd.bounds import interval_bounds
from certkd.bounds.crown import crown_bounds
from certkd.bounds.spec import logit_differences
from certkd.models import create_model, ibp_initialize
from certkd.training.step import Teacher, training_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def no_tf32():
    saved = precision.tf32_flags()
    precision.set_tf32_flags(False, False)
    yield
    precision.set_tf32_flags(*saved)


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


def _bn_model(c=3, size=32, seed=0):
    """A CNN7 (width 8, linear 32) with non-trivial BatchNorm statistics, IBP-initialised."""
    torch.manual_seed(seed)
    model = ibp_initialize(create_model("cnn7", c, size, 10, mean=(0.45,), std=(0.22,), width=8, linear=32))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.3)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


def test_cuda_tf32_flags_take_effect():
    """With TF32 off, matmuls and convolutions are IEEE float32 (relative error ~1e-6, not TF32's ~1e-4-1e-3)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(1024, 1024, device=CUDA, generator=g)
    b = torch.randn(1024, 1024, device=CUDA, generator=g)
    x = torch.randn(16, 64, 32, 32, device=CUDA, generator=g)
    w = torch.randn(64, 64, 3, 3, device=CUDA, generator=g)
    ref_mm = a.double() @ b.double()
    ref_conv = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    with precision.tf32(False):
        assert precision.tf32_flags() == (False, False)
        assert _rel_err(a @ b, ref_mm) < 1e-5
        assert _rel_err(torch.nn.functional.conv2d(x, w, padding=1), ref_conv) < 1e-4  # cuDNN may use Winograd
    if torch.cuda.get_device_capability()[0] >= 8:  # Ampere and later have TF32
        with precision.tf32(True):
            assert _rel_err(a @ b, ref_mm) > 1e-5, "TF32 on: expected a TF32 matmul (the flag had no effect)"
    assert precision.tf32_flags() == (False, False)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_cuda_ibp_bounds_equal_cpu_float64(mode):
    model = _bn_model()
    getattr(model, mode)()
    x = torch.rand(16, 3, 32, 32)
    lo, hi = linf_box(x, 2 / 255)
    ref = interval_bounds(model.double().features, lo.double(), hi.double(), point=x.double())
    model.float().to(CUDA)
    got = interval_bounds(model.features, lo.to(CUDA), hi.to(CUDA), point=x.to(CUDA))
    scale = ref.upper.abs().max()
    for a, r in ((got.lower, ref.lower), (got.upper, ref.upper), (got.point_output, ref.point_output)):
        assert ((a.cpu().double() - r).abs().max() / scale).item() < 1e-4
    assert (got.lower <= got.point_output + 1e-5).all() and (got.point_output <= got.upper + 1e-5).all()


def test_cuda_ibp_and_crown_sound_on_sampled_points():
    """Eval mode: h(x') of 256 random points x' per input (and the box corners' signs) lies in the IBP box, and
    the CROWN bounds of z_y − z_j are below their values at those points; both on CUDA."""
    model = _bn_model(c=1, size=16).eval().to(CUDA)
    x = torch.rand(4, 1, 16, 16, device=CUDA)
    y = torch.randint(0, 10, (4,), device=CUDA)
    lo, hi = linf_box(x, 0.03)
    ibp = interval_bounds(model.features, lo, hi)
    with torch.no_grad():
        lb = crown_bounds(model, lo, hi, y)
        assert torch.isfinite(lb).all()
        for k in range(8):
            u = torch.rand((64,) + tuple(lo.shape), device=CUDA)
            if k % 2:
                u = (u > 0.5).float()  # corners
            pts = (lo + (hi - lo) * u).reshape(-1, *lo.shape[1:])
            feats = model.features(pts).view(64, *ibp.lower.shape)
            assert (feats >= ibp.lower - 1e-5).all() and (feats <= ibp.upper + 1e-5).all()
            vals = logit_differences(model(pts), y.repeat(64)).view(64, 4, -1)
            assert (vals >= lb - 1e-4).all()
    ref = crown_bounds(model.cpu().double(), lo.cpu().double(), hi.cpu().double(), y.cpu())
    assert ((lb.cpu().double() - ref).abs().max() / ref.abs().max()).item() < 1e-4


def test_cuda_training_step_equals_cpu():
    """One CC-Dist step at α = 1 (bounds only, so no dependence on the attack's random start) on CUDA and on
    the CPU: same loss, distillation term and gradients up to float32 rounding."""
    torch.manual_seed(0)
    student = ibp_initialize(create_model("cnn-small", 1, 28, 10))
    teacher_net = create_model("cnn-small", 1, 28, 10).eval()
    cfg = resolve_config("mnist-0.1-cpu", {"method": "ibp-dist", "teacher": "t", "beta": 0.003})
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    out = {}
    for dev in ("cpu", "cuda"):
        s, t = (m.to(dev) for m in (student, teacher_net))
        s.zero_grad(set_to_none=True)
        loss, logs = training_loss(s, x.to(dev), y.to(dev), cfg, 0.1, False, PGD(1, 10.0), Teacher(model=t))
        loss.backward()
        out[dev] = (loss.item(), logs["dist"], [p.grad.detach().cpu().clone() for p in s.parameters()])
    (lc, dc, gc), (lg, dg, gg) = out["cpu"], out["cuda"]
    assert lg == pytest.approx(lc, rel=1e-4) and dg == pytest.approx(dc, rel=1e-4)
    for a, b in zip(gc, gg):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("allow", [False, True])
def test_cuda_training_sets_tf32_from_config(tmp_path, monkeypatch, allow):
    seen = {"step": set(), "eval": set(), "device": set()}
    step, evaluate = loop.training_loss, loop.evaluate_accuracy

    def spy_step(model, x, *a, **k):
        seen["step"].add(precision.tf32_flags())
        seen["device"].add(x.device.type)
        return step(model, x, *a, **k)

    def spy_eval(*a, **k):
        seen["eval"].add(precision.tf32_flags())
        return evaluate(*a, **k)

    monkeypatch.setattr(loop, "training_loss", spy_step)
    monkeypatch.setattr(loop, "evaluate_accuracy", spy_eval)
    cfg = resolve_config("digits-small", {"method": "cc-ibp", "epochs": 1, "eps_start": 1, "eps_length": 1,
                                          "eval_limit": 20, "allow_tf32": allow, "device": "cuda"})
    train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    assert seen == {"step": {(allow, allow)}, "eval": {(False, False)}, "device": {"cuda"}}
    assert precision.tf32_flags() == (False, False)
