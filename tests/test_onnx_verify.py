"""from_onnx, certkd.verify_model and `certkd verify --onnx/--instances` (issue #12)."""
import csv
import glob
import io
import os
import re
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from certkd.errors import CertkdError  # noqa: E402
from certkd.graph import from_onnx  # noqa: E402
from certkd.verification.api import verify_model  # noqa: E402
from certkd.verification.onnx_verify import spec_network  # noqa: E402
from certkd.verification.vnnlib import read_property, robustness_property  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "vnncomp2021")
NETS = sorted(glob.glob(os.path.join(DATA, "mnistfc", "*.onnx")) + glob.glob(os.path.join(DATA, "oval21", "nets", "*.onnx")))


def _ort(path_or_bytes, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _export(model: nn.Module, shape) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.rand(1, *shape),), buf, opset_version=13, dynamo=False)
    return buf.getvalue()


def _compare(tmp_path, data: bytes, shape, n=4):
    p = tmp_path / "m.onnx"
    p.write_bytes(data)
    net = from_onnx(p)
    assert tuple(net.input_shape) == tuple(shape)
    for seed in range(n):
        x = torch.rand(1, *shape, generator=torch.Generator().manual_seed(seed)).numpy()
        with torch.no_grad():
            got = net(torch.from_numpy(x)).numpy()
        assert np.abs(got - _ort(str(p), x)).max() <= 1e-5
    return net


@pytest.mark.skipif(not NETS, reason="VNN-COMP 2021 data not present")
@pytest.mark.parametrize("path", NETS, ids=[os.path.basename(p) for p in NETS])
def test_published_networks_match_onnxruntime(path):
    net = from_onnx(path)
    for seed in range(3):
        x = torch.rand(1, *net.input_shape, generator=torch.Generator().manual_seed(seed)).numpy()
        with torch.no_grad():
            got = net(torch.from_numpy(x)).numpy()
        assert np.abs(got - _ort(path, x)).max() <= 1e-5


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.mean = nn.Parameter(torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1), requires_grad=False)
        self.std = nn.Parameter(torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1), requires_grad=False)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AvgPool2d(2)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        x = self.bn(self.conv((x - self.mean) / self.std))
        x = x + self.body(x)
        return self.fc(self.drop(torch.flatten(self.pool(torch.relu(x)), 1)))


def test_torch_export_round_trip_residual_avgpool_normalisation(tmp_path):
    torch.manual_seed(0)
    m = _Residual()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    net = _compare(tmp_path, _export(m, (3, 8, 8)), (3, 8, 8))
    kinds = {type(n.rule).__name__ for n in net.nodes}
    assert {"Add", "Conv2d", "ScaleShift", "Linear"} <= kinds


def test_matmul_add_and_reshape_round_trip(tmp_path):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(12, 6))
            self.b = nn.Parameter(torch.randn(6))

        def forward(self, x):
            return torch.relu(x.reshape(x.shape[0], 12) @ self.w + self.b) * 2.0 - 1.0

    torch.manual_seed(1)
    _compare(tmp_path, _export(M(), (3, 4)), (3, 4))


def test_certkd_export_round_trip(tmp_path):
    from certkd.export import onnx_bytes
    from certkd.models.layers import Normalize

    torch.manual_seed(2)
    m = nn.Sequential(Normalize((0.5,), (0.25,)), nn.Conv2d(1, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Flatten(), nn.Linear(4 * 3 * 3, 10)).eval()
    _compare(tmp_path, onnx_bytes(m, (1, 1, 8, 8)), (1, 8, 8))


def test_unsupported_operator_is_one_line(tmp_path):
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Softplus", ["x"], ["y"], name="act7")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    p = tmp_path / "s.onnx"
    onnx.save(helper.make_model(g), str(p))
    with pytest.raises(CertkdError) as e:
        from_onnx(p)
    msg = str(e.value)
    assert "Softplus" in msg and "act7" in msg and "\n" not in msg


def _small_net():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)).eval()


def _milp_status(model, x, label, lo, hi):
    from certkd.verification.milp import milp_verify
    return milp_verify(model, x, label, lower=lo, upper=hi, timeout=60).status


@pytest.mark.parametrize("eps,want", [(0.002, "unsat"), (2.0, "sat")])
def test_verify_model_agrees_with_milp(eps, want):
    model = _small_net()
    x = torch.tensor([0.3, -0.2, 0.5, 0.1])
    label = int(model(x[None]).argmax())
    lo, hi = x - eps, x + eps
    res = verify_model(model, lo, hi, label, timeout=60)
    assert res.status == want
    milp = _milp_status(model, x, label, lo, hi)
    assert milp == {"unsat": "verified", "sat": "falsified"}[want]
    if want == "sat":
        assert np.all(res.x >= lo.numpy()) and np.all(res.x <= hi.numpy())
        y = model(torch.from_numpy(res.x)[None])[0].detach().numpy()
        assert np.abs(y - res.y).max() <= 1e-5 and np.delete(y, label).max() >= y[label]
        text = res.text()
        assert text.startswith("sat\n((X_0 ") and len(re.findall(r"\(Y_\d+ ", text)) == 3


def test_verify_model_matrix_spec_and_conjunctions():
    model = _small_net()
    x = torch.tensor([0.3, -0.2, 0.5, 0.1])
    y = model(x[None])[0].detach()
    label = int(y.argmax())
    C = torch.zeros(2, 3)
    others = [j for j in range(3) if j != label]
    for r, j in enumerate(others):
        C[r, label], C[r, j] = 1.0, -1.0
    assert verify_model(model, x - 0.002, x + 0.002, C, timeout=30).status == "unsat"
    # a conjunction: (Y_j >= Y_label) and (Y_label >= 1e9): the second conjunct is never true
    prop = robustness_property((x - 0.5).numpy(), (x + 0.5).numpy(), label, 3)
    from certkd.verification.vnnlib import Constraint, Property
    big = Constraint({label: -1.0}, -1e9, "(>= Y_l 1e9)", 0)
    prop = Property(prop.lower, prop.upper, [c + [big] for c in prop.disjuncts], 3)
    assert verify_model(model, None, None, prop, timeout=30).status == "unsat"


def test_verify_model_refuses_unsupported_module():
    model = nn.Sequential(nn.Linear(4, 3), nn.Softplus())
    with pytest.raises(CertkdError) as e:
        verify_model(model, torch.zeros(4), torch.ones(4), 0, timeout=5)
    assert "Softplus" in str(e.value)


def test_spec_network_margins():
    model = _small_net()
    net = from_onnx_free(model)
    rows = np.array([[1.0, -1.0, 0.0], [0.0, 2.0, 1.0]])
    offs = np.array([0.5, -1.0])
    s = spec_network(net, rows, offs, (4,))
    x = torch.rand(5, 4)
    with torch.no_grad():
        z, y = s(x), model(x)
    g = y.double().numpy() @ rows.T - offs
    assert np.allclose((z[:, :1] - z[:, 1:]).numpy(), g, atol=1e-5)


def from_onnx_free(model):
    from certkd.graph import from_module
    return from_module(model)


def _write_instance(tmp_path, name, eps):
    """net.onnx (the small net) and NAME.vnnlib: robustness on the box x ± eps (not clipped)."""
    model = _small_net()
    x = torch.tensor([0.3, -0.2, 0.5, 0.1])
    label = int(model(x[None]).argmax())
    (tmp_path / "net.onnx").write_bytes(_export(model, (4,)))
    lines = [f"(declare-const X_{i} Real)" for i in range(4)] + [f"(declare-const Y_{j} Real)" for j in range(3)]
    for i, v in enumerate(x.tolist()):
        lines += [f"(assert (<= X_{i} {v + eps!r}))", f"(assert (>= X_{i} {v - eps!r}))"]
    lines.append("(assert (or " + " ".join(f"(and (>= Y_{j} Y_{label}))" for j in range(3) if j != label) + "))")
    (tmp_path / f"{name}.vnnlib").write_text("\n".join(lines) + "\n")
    return f"{name}.vnnlib"


def test_cli_single_instance_format(tmp_path):
    from certkd.cli import cli
    v = _write_instance(tmp_path, "big", 2.0)
    out = tmp_path / "res.txt"
    r = CliRunner().invoke(cli, ["verify", "--onnx", str(tmp_path / "net.onnx"), "--vnnlib", str(tmp_path / v),
                                 "--timeout", "30", "--out", str(out)])
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert r.output.startswith(text)
    assert text.startswith("sat\n")
    if text.startswith("sat"):
        assert re.fullmatch(r"sat\n\(\(X_0 \S+\)\n( \(X_\d \S+\)\n){3}( \(Y_\d \S+\)\n){2} \(Y_2 \S+\)\)\n", text)
        vals = [float(t) for t in re.findall(r"\(X_\d (\S+)\)", text)]
        prop = read_property(tmp_path / v)
        assert prop.contains(np.array(vals, dtype=np.float32))


def test_cli_instances_resume(tmp_path):
    from certkd.cli import cli
    a, b = _write_instance(tmp_path, "a", 0.001), _write_instance(tmp_path, "b", 2.0)
    (tmp_path / "instances.csv").write_text(f"net.onnx,{a},20\nnet.onnx,{b},20\n")
    out = tmp_path / "out" / "results.csv"
    args = ["verify", "--instances", str(tmp_path / "instances.csv"), "--out", str(out)]
    r = CliRunner().invoke(cli, args + ["--limit", "1"])
    assert r.exit_code == 0, r.output
    rows = list(csv.reader(out.open()))
    assert len(rows) == 1 and rows[0][1:3] == ["net.onnx", a] and rows[0][4] == "unsat"
    rows[0][5] = "123.0"  # a sentinel: a resumed run must keep this row as it is
    with out.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "resuming: 1 of 2" in r.output and "| result | count |" in r.output
    rows = list(csv.reader(out.open()))
    assert len(rows) == 2 and rows[0][5] == "123.0" and rows[1][2] == b and len(rows[1]) == 6
    assert rows[1][4] == "sat"
    if rows[1][4] == "sat":
        from certkd.verification.instances import cex_path
        assert cex_path(out, "net.onnx", b).read_text().startswith("sat\n((X_0 ")
        assert cex_path(out, "net.onnx", b).name.startswith("net__b__")


def test_cli_refuses_mixed_modes(tmp_path):
    from certkd.cli import cli
    r = CliRunner().invoke(cli, ["verify", "--onnx", "x.onnx"])
    assert r.exit_code != 0 and "Traceback" not in r.output
