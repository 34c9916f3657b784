"""Export a trained model and its local-robustness properties for external verifiers.

VNN-COMP tools (α,β-CROWN, NNV, nnenum, Marabou, ...) take a network as ONNX and a
property as VNN-LIB, listed in an ``instances.csv``. This module writes all three:

* :func:`export_onnx` — the whole :class:`~certkd.models.CertifiableNet` in eval mode.
  The ``Normalize`` layer is part of the graph, so the ONNX input is in pixel units
  [0, 1], exactly like the model's own input; BatchNorm layers are folded into the
  preceding Conv/Linear (in float64), so the graph holds only Sub, Div, Conv, Relu,
  Flatten and Gemm. Input ``"input"`` (1, C, H, W), output ``"logits"`` (1, K).
* :func:`write_vnnlib` — the standard local-robustness property: the L∞ box around x
  clipped to [0, 1] (inputs ``X_0..X_{d-1}``, C,H,W order) and the unsafe region
  "some other class scores at least as high as the label", ``(or (and (>= Y_j Y_y)) ...)``.
* :func:`read_vnnlib` — a strict reader for that fragment of VNN-LIB (used by the tests
  and handy for checking a file by hand).
* :func:`export_run` — everything for ``limit`` test points of a run: the fixed-seed,
  class-stratified subset that ``certkd verify --limit`` checks (:mod:`certkd.data.subsets`).

Bounds are written so that the box a verifier parses (in float32 or float64) contains the
certified box: each bound is a float32 value, rounded outward, printed with enough digits
that it parses back exactly.
"""
from __future__ import annotations

import copy
import csv
import inspect
import io
import math
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from certkd.choices import eps_error
from certkd.errors import CertkdError
from certkd.graph import UnsupportedLayerError
from certkd.graph import fold_batchnorm as graph_fold
from certkd.graph import from_module
from certkd.runs import atomic_write_bytes, atomic_write_text, ensure_writable_dir
from certkd.verification.vnnlib import parse_vnnlib, read_property

PathLike = Union[str, os.PathLike]
DEFAULT_OPSET = 13
INPUT_NAME, OUTPUT_NAME = "input", "logits"

__all__ = ["check_onnx", "export_onnx", "export_run", "fold_batchnorm", "onnx_bytes", "read_vnnlib", "vnnlib_box",
           "vnnlib_text", "write_vnnlib"]


# ---------------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------------

def fold_batchnorm(layers: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm that directly follows a Conv2d/Linear into that layer.

    The result computes the same function as ``layers.eval()`` (up to float rounding; the
    fold itself is done in float64, by :func:`certkd.graph.fold_batchnorm`). BatchNorms that
    cannot be folded are kept as they are. A chain comes back as an ``nn.Sequential`` (copies
    of the layers); a network with branches as a :class:`certkd.graph.Network`.
    """
    net = graph_fold(from_module(layers), any_mode=True)
    chain = all(node.inputs == (i,) for i, node in enumerate(net.nodes[1:]))
    if chain:
        return nn.Sequential(*(copy.deepcopy(node.rule.module) for node in net.nodes[1:]))
    return copy.deepcopy(net)


class _Exportable(nn.Module):
    """The model's graph with BatchNorm folded; what the ONNX graph is traced from (each node's
    rule class ``forward`` is what gets traced)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
        try:
            self.body = fold_batchnorm(model)
        except UnsupportedLayerError:  # any other module: exported as is (BatchNorm in inference mode)
            self.body = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _normalise_shape(model: nn.Module, input_shape: Optional[Sequence[int]]) -> Tuple[int, ...]:
    if input_shape is None:
        spec = getattr(model, "spec", None)
        if spec is None:
            raise ValueError("input_shape is required for models without a certkd ModelSpec")
        input_shape = (spec.in_channels, spec.input_size, spec.input_size)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1,) + shape
    if len(shape) != 4 or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be (C, H, W) or (N, C, H, W) with positive sizes, "
                         f"got {tuple(input_shape)}")
    return shape


def _import_onnx():
    try:
        import onnx
    except ImportError:
        raise CertkdError("exporting needs the onnx package: pip install 'certkd[verify]' (or pip install onnx)") from None
    return onnx


def onnx_bytes(model: nn.Module, input_shape: Optional[Sequence[int]] = None, *, dynamic_batch: bool = False,
               opset: int = DEFAULT_OPSET) -> bytes:
    """Serialise ``model`` (a copy, on CPU, in eval mode) to ONNX bytes; see :func:`export_onnx`."""
    onnx = _import_onnx()

    shape = _normalise_shape(model, input_shape)
    net = _Exportable(model).eval()
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        # Before opset 14, BatchNormalization has no training_mode attribute and some runtimes
        # (onnx's reference evaluator) read the exported `momentum` as "use batch statistics".
        opset = max(opset, 15)
    dummy = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    kwargs: Dict[str, Any] = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset,
                                  do_constant_folding=True, export_params=True)
    if dynamic_batch:
        kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the TorchScript exporter: no onnxscript needed, a plain static graph
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(net, (dummy,), buf, **kwargs)
    proto = onnx.load_from_string(buf.getvalue())
    proto.doc_string = ("certkd CertifiableNet; input: pixel values in [0, 1], shape (N, C, H, W), normalisation "
                        "included; output: logits (N, K)")
    spec = getattr(model, "spec", None)
    if spec is not None:
        meta = {"certkd.model": spec.name, "certkd.mean": ",".join(map(repr, spec.mean)),
                "certkd.std": ",".join(map(repr, spec.std)), "certkd.input_range": "0,1"}
        for k, v in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def export_onnx(model: nn.Module, path: PathLike, input_shape: Optional[Sequence[int]] = None, *,
                dynamic_batch: bool = False, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``model`` as ONNX to ``path`` (atomically) and return the path.

    Args:
        model: a CertifiableNet (or any module taking (N, C, H, W)); it is not modified —
            a CPU copy in eval mode with BatchNorm folded is exported.
        path: the .onnx file to write (parent directories are created).
        input_shape: (C, H, W) or (1, C, H, W); default: from ``model.spec``.
        dynamic_batch: make the batch dimension symbolic ("batch") instead of 1.
        opset: ONNX opset (13 by default, widely supported by verifiers).
    """
    data = onnx_bytes(model, input_shape, dynamic_batch=dynamic_batch, opset=opset)
    path = Path(path)
    atomic_write_bytes(path, data)
    return path


# ---------------------------------------------------------------------------------------------
# VNN-LIB writing
# ---------------------------------------------------------------------------------------------

def _two_sum(a: np.ndarray, b: float) -> Tuple[np.ndarray, np.ndarray]:
    """Error-free float64 addition: a + b == s + e exactly (Knuth's TwoSum)."""
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, e


def _f32_down(v: np.ndarray) -> np.ndarray:
    """Largest float32 <= v (float64 input)."""
    f = v.astype(np.float32)
    return np.where(f.astype(np.float64) > v, np.nextafter(f, np.float32(-np.inf)), f)


def _f32_up(v: np.ndarray) -> np.ndarray:
    """Smallest float32 >= v (float64 input)."""
    f = v.astype(np.float32)
    return np.where(f.astype(np.float64) < v, np.nextafter(f, np.float32(np.inf)), f)


def vnnlib_box(x, eps: float) -> Tuple[np.ndarray, np.ndarray]:
    """The float32 input box written to VNN-LIB for centre ``x`` and radius ``eps``.

    It contains both the exact box [max(x−ε, 0), min(x+ε, 1)] (x read as float32, ε as the
    given float, arithmetic in the reals) and certkd's own float32 ``linf_box(x, eps)``, so
    a proof on it covers every point certkd certifies. Shapes: x any -> (d,), (d,) float32.
    """
    from certkd.attacks.pgd import linf_box

    x32 = torch.as_tensor(np.asarray(x, dtype=np.float32)).reshape(-1)
    eps = float(eps)
    x64 = x32.numpy().astype(np.float64)
    lo, lo_err = _two_sum(x64, -eps)
    hi, hi_err = _two_sum(x64, eps)
    # Step off by one float64 ulp where the rounded sum lies inside the exact one.
    lo = np.where(lo_err < 0, np.nextafter(lo, -np.inf), lo)
    hi = np.where(hi_err > 0, np.nextafter(hi, np.inf), hi)
    lo32, hi32 = _f32_down(np.maximum(lo, 0.0)), _f32_up(np.minimum(hi, 1.0))
    t_lo, t_hi = linf_box(x32, eps)
    lo32 = np.maximum(np.minimum(lo32, t_lo.numpy()), np.float32(0.0))
    hi32 = np.minimum(np.maximum(hi32, t_hi.numpy()), np.float32(1.0))
    return lo32.astype(np.float32), hi32.astype(np.float32)


def _fmt(v) -> str:
    """A float32 value as a plain decimal (no exponent) that parses back exactly, as float32 and
    as float64: the shortest decimal that round-trips the value as a float64."""
    return np.format_float_positional(np.float64(np.float32(v)), unique=True, trim="0")


def _comment(text: str) -> str:
    return "; " + " ".join(str(text).split())


def vnnlib_text(x, label: int, eps: float, num_classes: int, comments: Sequence[str] = ()) -> str:
    """The VNN-LIB property of :func:`write_vnnlib` as a string."""
    label, num_classes, eps = int(label), int(num_classes), float(eps)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} is not a class index in [0, {num_classes})")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    lo, hi = vnnlib_box(x, eps)
    if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(lo <= hi)):
        raise ValueError("x must hold finite pixel values in [0, 1]")
    d = lo.shape[0]
    lines = [_comment(c) for c in comments]
    lines += [_comment(f"local robustness: {d} inputs (C,H,W order, pixel units), {num_classes} outputs, "
                       f"label {label}, eps {eps!r}"), ""]
    lines += [f"(declare-const X_{i} Real)" for i in range(d)]
    lines.append("")
    lines += [f"(declare-const Y_{j} Real)" for j in range(num_classes)]
    lines += ["", _comment("input box: [max(x - eps, 0), min(x + eps, 1)]")]
    for i in range(d):
        lines.append(f"(assert (<= X_{i} {_fmt(hi[i])}))")
        lines.append(f"(assert (>= X_{i} {_fmt(lo[i])}))")
    lines += ["", _comment(f"unsafe: some class j != {label} scores at least as high as the label"), "(assert (or"]
    lines += [f"    (and (>= Y_{j} Y_{label}))" for j in range(num_classes) if j != label]
    lines.append("))")
    return "\n".join(lines) + "\n"


def write_vnnlib(path: PathLike, x, label: int, eps: float, num_classes: int,
                 comments: Sequence[str] = ()) -> Path:
    """Write the VNN-COMP local-robustness property of (x, label) at L∞ radius ``eps``.

    Args:
        path: the .vnnlib file (written atomically; parent directories are created).
        x: the input, any shape (e.g. (C, H, W) or (1, C, H, W)), pixel units; flattened in
            row-major (C, H, W) order to X_0..X_{d−1}, matching the ONNX input.
        label: the true class y; the unsafe region is ∨_{j≠y} Y_j >= Y_y.
        eps: L∞ radius in pixel units; the box is clipped to [0, 1].
        num_classes: K, the number of outputs Y_0..Y_{K−1}.
        comments: extra header lines (written as ``;`` comments).
    """
    if torch.is_tensor(x):
        x = x.detach().cpu().float().numpy()
    path = Path(path)
    atomic_write_text(path, vnnlib_text(x, label, eps, num_classes, comments))
    return path


# ---------------------------------------------------------------------------------------------
# VNN-LIB reading (strict)
# ---------------------------------------------------------------------------------------------

def read_vnnlib(path: PathLike) -> Tuple[np.ndarray, np.ndarray, List[List[Tuple[int, int]]]]:
    """Read a local-robustness VNN-LIB file strictly (:mod:`certkd.verification.vnnlib`).

    Only comparisons of two outputs (``Y_j >= Y_k`` / ``Y_k <= Y_j``) are accepted in the
    output assertions; :func:`certkd.verification.vnnlib.read_property` reads general linear
    constraints.

    Returns:
        (lower (d,), upper (d,), disjuncts): float64 bounds and the unsafe region as a list
        of disjuncts, each a list of pairs (j, y) meaning Y_j >= Y_y.
    Raises:
        ValueError: on anything else (syntax errors, undeclared or unbounded variables,
            unknown operators, constants in output constraints, an empty box, ...).
    """
    return _pairs(read_property(path))


def _read_vnnlib_text(text: str, where: str = "<vnnlib>"):
    return _pairs(parse_vnnlib(text, where))


def _pairs(prop) -> Tuple[np.ndarray, np.ndarray, List[List[Tuple[int, int]]]]:
    dnf = []
    for conj in prop.disjuncts:
        for c in conj:
            if c.pair is None:
                raise ValueError(f"{prop.source}:{c.line}: expected a comparison of two outputs Y_j, Y_k, got {c.text}")
        dnf.append([c.pair for c in conj])
    return prop.lower, prop.upper, dnf


# ---------------------------------------------------------------------------------------------
# A whole run
# ---------------------------------------------------------------------------------------------

def _positive_float(value, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not (v > 0 and math.isfinite(v)):
        raise CertkdError(f"{what} must be a positive number, got {value}")
    return v


def _check_eps(value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not 0.0 < v <= 1.0:
        raise CertkdError(eps_error(value))
    return v


def check_onnx(data: bytes, model: nn.Module, x: torch.Tensor, rtol: float = 1e-4) -> float:
    """Run the ONNX graph on x (N, C, H, W) one point at a time with onnx's reference evaluator
    and compare with ``model``; returns the largest |difference| and raises RuntimeError when
    it exceeds ``rtol · (1 + max |logit|)`` (a bug in the export, not a user error)."""
    onnx = _import_onnx()
    from onnx.reference import ReferenceEvaluator

    session = ReferenceEvaluator(onnx.load_from_string(data))
    with torch.no_grad():
        want = model(x.to(torch.float32)).cpu().numpy()
    got = np.concatenate([session.run(None, {INPUT_NAME: x[i:i + 1].cpu().numpy()})[0] for i in range(len(x))])
    diff = float(np.abs(got - want).max())
    if not diff <= rtol * (1.0 + float(np.abs(want).max())):
        raise RuntimeError(f"the exported ONNX model disagrees with PyTorch (max |Δlogit| = {diff:.3g})")
    return diff


def export_run(run_path: PathLike, onnx_path: PathLike, vnnlib_dir: PathLike, eps: Optional[float] = None,
               limit: int = 100, data_dir: Optional[PathLike] = None, timeout: float = 60.0,
               check: bool = True) -> Dict[str, Any]:
    """Export a run as a VNN-COMP benchmark: ONNX model, one property per test point, instances.csv.

    The points are those ``certkd verify --limit`` checks: the fixed-seed, class-stratified
    subset :func:`certkd.data.subsets.stratified_indices` selects (every point when ``limit`` is
    at least the test-set size), in ascending test-index order. Writes ``onnx_path``,
    ``vnnlib_dir/prop_{i}.vnnlib`` for each selected test index i (a comment in the file names
    the index and the selection) and ``vnnlib_dir/instances.csv`` with rows
    ``onnx,vnnlib,timeout`` (no header, in the same order) whose paths are relative to the
    csv's folder.

    Args:
        run_path: run directory, checkpoint directory or release folder.
        onnx_path: the .onnx file to write.
        vnnlib_dir: folder for the properties and instances.csv (created if missing).
        eps: L∞ radius in pixel units, in (0, 1]; default: the run's training ε.
        limit: number of test points (>= 1); the same points as ``certkd verify --limit``.
        data_dir: dataset directory (default: the run's).
        timeout: per-instance timeout in seconds written to instances.csv.
        check: compare the ONNX graph with PyTorch on the first exported point before writing.
    Returns:
        A summary: paths, n, eps, ``indices`` (the exported test indices, in instances.csv
        order), ``points`` (:func:`certkd.data.subsets.describe_points`; its ``points``, ``n``
        and ``indices_sha256`` equal those a ``certkd verify --limit`` of the same N records under
        ``certifies``) and ``correct``, how many exported points the model classifies correctly
        (a misclassified point is a trivially violated property).
    Raises:
        CertkdError: bad eps/limit/timeout, unreadable run or data, unwritable outputs.
    """
    from certkd.checkpoints import load_model
    from certkd.data import load_dataset
    from certkd.data.subsets import describe_points, stratified_indices

    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise CertkdError(f"--limit must be an integer >= 1, got {limit}")
    limit = int(limit)
    timeout = _positive_float(timeout, "--timeout")
    if eps is not None:
        eps = _check_eps(eps)
    onnx_path, vnnlib_dir = Path(onnx_path), Path(vnnlib_dir)
    if onnx_path.is_dir():
        raise CertkdError(f"--onnx {onnx_path} is a directory; give a file name such as model.onnx")

    model = load_model(run_path, device="cpu")
    cfg = model.certkd_meta.get("config", {}) or {}
    if eps is None:
        if cfg.get("eps") is None:
            raise CertkdError(f"{run_path} stores no training eps; pass --eps")
        eps = _check_eps(cfg["eps"])
    _, test_set, info = load_dataset(cfg.get("dataset", "digits"), data_dir or cfg.get("data_dir"))
    spec = model.spec
    if info.input_size != spec.input_size or info.in_channels != spec.in_channels:
        raise CertkdError(f"model expects {spec.in_channels}×{spec.input_size}×{spec.input_size} inputs but the "
                          f"data is {info.in_channels}×{info.input_size}×{info.input_size}")
    index = stratified_indices(test_set.labels, limit)  # as certkd verify --limit: same points, same order
    points = describe_points(test_set.labels, index)
    n = int(index.shape[0])

    ensure_writable_dir(onnx_path.parent, "ONNX output folder", "--onnx path")
    ensure_writable_dir(vnnlib_dir, "--vnnlib-dir", "--vnnlib-dir")
    data = onnx_bytes(model)
    correct = 0
    with torch.no_grad():
        for start in range(0, n, 256):
            xb, yb = test_set.get(index[start:start + 256])
            correct += int((model(xb).argmax(1) == yb).sum())
    if check:
        check_onnx(data, model, test_set.get(index[:1])[0])

    csv_path = vnnlib_dir / "instances.csv"
    rel_onnx = _relative(onnx_path, vnnlib_dir)
    rows = []
    try:
        atomic_write_bytes(onnx_path, data)
        for i in index.tolist():
            x, y = test_set.get(torch.tensor([i]))
            prop = vnnlib_dir / f"prop_{i}.vnnlib"
            write_vnnlib(prop, x[0], int(y[0]), eps, spec.num_classes,
                         comments=[f"certkd export of {run_path}", f"test index {i}; exported: {points['points']}"])
            rows.append([rel_onnx, prop.name, f"{timeout:g}"])
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        atomic_write_text(csv_path, buf.getvalue())
    except OSError as e:
        raise CertkdError(f"cannot write {getattr(e, 'filename', None) or vnnlib_dir}: {e.strerror or e}") from None
    return {"onnx": str(onnx_path), "vnnlib_dir": str(vnnlib_dir), "instances": str(csv_path), "n": n,
            "indices": index.tolist(), "points": points, "eps": eps, "timeout": timeout,
            "num_classes": spec.num_classes,
            "input_shape": [1, spec.in_channels, spec.input_size, spec.input_size], "correct": correct}


def _relative(target: Path, base: Path) -> str:
    """``target`` relative to ``base`` with forward slashes (absolute if that is impossible)."""
    try:
        rel = os.path.relpath(target.resolve(), base.resolve())
    except ValueError:  # different drives on Windows
        return target.resolve().as_posix()
    return Path(rel).as_posix()
