"""Verify any supported network (ONNX file or ``nn.Module``) against a property (``docs/verify_onnx.md``).

Stages, stopping at the first that decides (all within one deadline):

1. **Attack**: the box's centre and corners, then multi-restart PGD on the property
   (:func:`certkd.attacks.spec_pgd.spec_pgd`).
2. **Bounds**: IBP, CROWN, α-CROWN on every conjunct row at once. The network gets one extra
   Linear node ``z = [0, −(A y − b)]`` (every conjunct of every disjunct, one row each), so
   "class 0 wins" is exactly "every margin g = A y − b is positive": the engines' label
   specification C(0) bounds the margins. A disjunct is refuted once one of its conjuncts'
   lower bound exceeds the tolerance (see :mod:`certkd.verification.vnnlib` for why).
3. **Branch and bound** (:func:`certkd.verification.bab.bab_verify`, exact MILP at its leaves) on
   the disjuncts still open, each represented by its conjunct with the best α-CROWN bound: proving
   that conjunct positive everywhere refutes the disjunct (sound; incomplete for conjunctions).

**Precision.** A network is verified in its own precision: a float64 network (a DOUBLE ONNX
model, or a float64 ``nn.Module``) gets a float64 box, attack, bounds and counterexample check;
a float32 one a float32 box, rounded outward for the bounds and inward for the attack.

**What unsat means** (``docs/verify_onnx.md`` §5). Every refuted margin has a lower bound above
``margin_tol`` in exact arithmetic on the stored weights. :func:`certkd.bounds.rounding.rounding_error_bound`
bounds how far onnxruntime's floating-point evaluation can be from that, in any evaluation order;
the result records it (``rounding_bound``) and whether every refuted margin clears twice that bound
(``float_proof``: once for onnxruntime's rounding, once for certkd's own arithmetic in the same
precision). With ``strict_rounding=True`` an unsat needs that, and a margin in between answers
``unknown``.

Answers: ``unsat`` (every disjunct refuted), ``sat`` (a counterexample inside the box that the
network's own evaluation confirms: onnxruntime for an ONNX file, the caller's module in its own
precision for an ``nn.Module``; an unconfirmed candidate is never reported as sat), ``timeout``
or ``unknown`` (an engine gave up, or a candidate did not confirm).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from certkd.errors import CertkdError
from certkd.precision import network_dtype
from certkd.graph.network import Network, Node
from certkd.verification.vnnlib import Property

RESULTS = ("sat", "unsat", "timeout", "unknown")


@dataclass
class VerifyResult:
    """status: one of :data:`RESULTS`; stage: what decided; x (d,) and y (K,) a confirmed
    counterexample and the outputs that confirmed it, in the network's precision (sat only);
    note: why undecided; rounding_bound / float_proof: see the module docstring."""

    status: str
    time_s: float
    stage: str = ""
    x: Optional[np.ndarray] = None
    y: Optional[np.ndarray] = None
    note: str = ""
    rounding_bound: Optional[float] = None  # max over the refuted margins of their rounding-error bound
    float_proof: Optional[bool] = None      # unsat only: every refuted margin clears twice that bound

    def text(self) -> str:
        """The competition's result file: ``sat`` and ``((X_0 v) ... (Y_0 v) ...)``, or one word."""
        if self.status != "sat":
            return self.status + "\n"
        parts = [f"(X_{i} {float(v)!r})" for i, v in enumerate(self.x)]
        parts += [f"(Y_{i} {float(v)!r})" for i, v in enumerate(self.y)]
        return "sat\n(" + "\n ".join(parts) + ")\n"


# --------------------------------------------------------------------------------------- helpers

def _box(prop: Property, shape: Sequence[int], dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(outer lo, outer hi, inner lo, inner hi), each (1, *shape) in ``dtype``: the outer box contains
    the property's box, every point of the inner one lies in it (float64: both are the box itself)."""
    lo, hi = prop.lower, prop.upper
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).reshape(1, *shape).to(dtype)
    if dtype == torch.float64:
        return t(lo), t(hi), t(lo), t(hi)
    with np.errstate(over="ignore"):  # a bound beyond float32's range becomes ±inf outside, ±max inside
        lo32, hi32 = lo.astype(np.float32), hi.astype(np.float32)
    out_lo = np.where(lo32 > lo, np.nextafter(lo32, np.float32(-np.inf)), lo32)
    out_hi = np.where(hi32 < hi, np.nextafter(hi32, np.float32(np.inf)), hi32)
    in_lo = np.where(lo32 < lo, np.nextafter(lo32, np.float32(np.inf)), lo32)
    in_hi = np.where(hi32 > hi, np.nextafter(hi32, np.float32(-np.inf)), hi32)
    in_hi = np.maximum(in_hi, in_lo)  # a degenerate coordinate: the candidate then fails the check
    return t(out_lo), t(out_hi), t(in_lo), t(in_hi)


def spec_network(net: Network, rows: np.ndarray, offsets: np.ndarray, input_shape: Sequence[int]) -> Network:
    """``net`` followed by z = [0, −(rows·y − offsets)] (the margins as "class 0 − class j").

    rows: (m, K), offsets: (m,). The new network's robustness at label 0 is "every margin > 0".
    """
    out_shape = net.shapes(tuple(input_shape))[-1]
    nodes = list(net.nodes)
    src = net.output
    if len(out_shape) != 1:
        nodes.append(Node("spec.flatten", _rule(nn.Flatten(), "spec.flatten"), (src,)))
        src = len(nodes) - 1
    k = int(np.prod(out_shape))
    dtype = network_dtype(net)
    lin = nn.Linear(k, rows.shape[0] + 1, dtype=dtype)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
        lin.weight[1:] = torch.tensor(-rows, dtype=dtype)
        lin.bias[1:] = torch.tensor(offsets, dtype=dtype)
    nodes.append(Node("spec", _rule(lin, "spec"), (src,)))
    return Network(nodes).eval()


def _rule(module: nn.Module, name: str):
    from certkd.graph.convert import make_rule
    return make_rule(module, name)


class _Checker:
    """Confirms candidates by the network's own evaluation: onnxruntime for an ONNX file (in the
    model's input type), else ``reference`` (the caller's module) in its own precision."""

    def __init__(self, net: nn.Module, prop: Property, shape: Sequence[int], dtype: torch.dtype, onnx_source=None,
                 reference: Optional[nn.Module] = None):
        self.net, self.prop, self.shape, self.dtype = net, prop, tuple(shape), dtype
        self.reference = reference
        self.session, self.why = None, ""
        if onnx_source is None:
            return
        try:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = opts.inter_op_num_threads = 1
            self.session = ort.InferenceSession(onnx_source, opts, providers=["CPUExecutionProvider"])
            inp = self.session.get_inputs()[0]
            self.input_name = inp.name
            self.ort_shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
            self.ort_dtype = np.float64 if inp.type == "tensor(double)" else np.float32
        except Exception as e:  # no onnxruntime, or a model it cannot load
            self.why = f"onnxruntime unavailable: {str(e).splitlines()[0] if str(e) else type(e).__name__}"

    def __call__(self, x: Tensor) -> Tuple[bool, Optional[np.ndarray], str]:
        """(confirmed, the confirming outputs (K,), why not)."""
        xn = x.detach().to(self.dtype).reshape(-1).numpy()
        if not self.prop.contains(xn):
            return False, None, "candidate outside the box"
        if self.reference is not None:
            with torch.no_grad():
                y = self.reference(torch.from_numpy(xn).reshape(1, *self.shape)).reshape(-1).numpy()
            if not self.prop.violated_by(y):
                return False, None, "candidate does not violate the property in the module's own forward"
            return True, y, ""
        if self.session is None:
            return False, None, self.why or "no evaluation to confirm the candidate with"
        xo = xn.astype(self.ort_dtype)
        if not self.prop.contains(xo):
            return False, None, "candidate leaves the box in the model's input type"
        with np.errstate(all="ignore"):
            y = self.session.run(None, {self.input_name: xo.reshape(self.ort_shape)})[0].reshape(-1)
        if not self.prop.violated_by(y):
            return False, None, "candidate does not violate the property under onnxruntime"
        return True, y, ""


def _probes(in_lo: Tensor, in_hi: Tensor) -> Tensor:
    """The box's centre and its two extreme corners, (3, *shape): tried before PGD (PGD cannot start
    in a box whose width overflows)."""
    with np.errstate(all="ignore"):
        centre = in_lo / 2 + in_hi / 2
    return torch.cat([centre, in_lo, in_hi])


# --------------------------------------------------------------------------------------- main

def verify_network(net: Network, prop: Property, input_shape: Sequence[int], *, timeout: float = 60.0,
                   onnx_source=None, reference: Optional[nn.Module] = None, attack_restarts: int = 100,
                   attack_steps: int = 100, seed: int = 0, alpha_iterations: int = 20, margin_tol: float = 1e-6,
                   strict_rounding: bool = False, deadline: Optional[float] = None) -> VerifyResult:
    """Decide ``prop`` for ``net`` (per-sample input shape ``input_shape``) within ``timeout`` s.

    onnx_source: the ONNX file (path or bytes) whose onnxruntime evaluation confirms counterexamples;
    reference: else the module whose own forward does (default: ``net``). deadline: an absolute
    ``time.monotonic()`` time that ends the call earlier (when loading already used part of the
    time limit). strict_rounding: see the module docstring. attack_restarts = 0 turns the attack
    (probes and PGD) off, leaving the proof engines alone.
    """
    start = time.monotonic()
    deadline = min(start + float(timeout), deadline if deadline is not None else math.inf)
    shape = tuple(int(s) for s in input_shape)
    dtype = network_dtype(net)
    net = net.eval()
    out_shape = net.shapes(shape)[-1]
    if prop.lower.size != int(np.prod(shape)):
        raise CertkdError(f"the property has {prop.lower.size} inputs; the network takes {int(np.prod(shape))} "
                          f"(shape {shape})")
    if prop.num_outputs != int(np.prod(out_shape)):
        raise CertkdError(f"the property has {prop.num_outputs} outputs Y; the network has {int(np.prod(out_shape))}")
    done = lambda status, stage="", note="", x=None, y=None, **kw: VerifyResult(
        status, round(time.monotonic() - start, 4), stage, x, y, note, **kw)
    check = _Checker(net, prop, shape, dtype, onnx_source, None if onnx_source is not None else (reference or net))
    out_lo, out_hi, in_lo, in_hi = _box(prop, shape, dtype)
    notes: List[str] = []

    def candidate(x: Tensor, stage: str) -> Optional[VerifyResult]:
        ok, y, why = check(x)
        if ok:
            return done("sat", stage, x=x.detach().to(dtype).reshape(-1).numpy(), y=y)
        notes.append(f"{stage}: {why}")
        return None

    # 1. attack: centre and corners, then PGD
    from certkd.attacks.spec_pgd import Disjuncts, property_values, spec_pgd

    mats = Disjuncts([(torch.tensor(A, dtype=dtype), torch.tensor(b, dtype=dtype)) for A, b in prop.matrices])

    if attack_restarts > 0:
        probes = _probes(in_lo, in_hi)
        with torch.no_grad(), np.errstate(all="ignore"):
            values = property_values(net(probes).reshape(len(probes), -1), mats).min(dim=1).values
        for i in torch.argsort(torch.nan_to_num(values, nan=math.inf)).tolist():
            if not float(values[i]) <= 0:
                break
            res = candidate(probes[i:i + 1], "attack")
            if res is not None:
                return res
    finite = bool(torch.isfinite(in_hi - in_lo).all())
    if attack_restarts > 0 and finite:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            x_adv, v = spec_pgd(net, in_lo, in_hi, mats, restarts=attack_restarts, steps=attack_steps,
                                generator=gen, deadline=deadline)
        if v <= 0:
            res = candidate(x_adv, "attack")
            if res is not None:
                return res
    if time.monotonic() > deadline:
        return done("timeout", "attack", "; ".join(notes))

    # 2. bounds on every conjunct row: row r belongs to disjunct owner[r]
    rows = np.concatenate([A for A, _ in prop.matrices])
    offsets = np.concatenate([b for _, b in prop.matrices])
    owner = np.concatenate([np.full(len(b), d) for d, (_, b) in enumerate(prop.matrices)])
    if not bool(torch.isfinite(out_lo).all() and torch.isfinite(out_hi).all()):
        return done("unknown", "bounds", "; ".join(notes + ["the box is unbounded in the network's precision"]))
    try:
        err = _row_rounding(net, out_lo, out_hi, dtype, shape, rows)
        enough = float(np.max(margin_tol + (2 * err if strict_rounding else 0.0)))
        best = _bounds(net, out_lo, out_hi, rows, offsets, alpha_iterations, deadline, enough)
    except CertkdError:
        raise
    except Exception as e:  # an engine refused this network: one line, no answer
        return done("unknown", "bounds", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    # refute a row only above its tolerance; float_proof: above twice its rounding bound too
    tol = margin_tol + (2 * err if strict_rounding else np.zeros_like(err))
    proven = margin_tol + 2 * err

    def unsat(stage: str, used: np.ndarray, bounds: np.ndarray) -> VerifyResult:
        return done("unsat", stage, rounding_bound=float(err[used].max()) if len(used) else 0.0,
                    float_proof=bool((bounds > proven[used]).all()))

    stage = "ibp"
    for stage_name, lb in best:
        stage = stage_name
        used = _refuting_rows(lb > tol, lb, owner, len(prop.matrices))
        if len(used) == len(prop.matrices):
            return unsat(stage, used, lb[used])
    if time.monotonic() > deadline:
        return done("timeout", stage, "; ".join(notes))

    # 3. BaB on the open disjuncts, each by its row with the best bound
    lb = best[-1][1]
    closed = _refuting_rows(lb > tol, lb, owner, len(prop.matrices))
    open_rows = [int(np.nonzero(owner == d)[0][np.argmax(lb[owner == d])]) for d in range(len(prop.matrices))
                 if d not in set(owner[closed].tolist())]
    bab_tol = float(tol[open_rows].max())
    status, note, x = _branch_and_bound(net, rows[open_rows], offsets[open_rows], shape, (in_lo, in_hi),
                                        (out_lo, out_hi), deadline, bab_tol)
    if x is not None:
        out = candidate(x, "bab")
        if out is not None:
            return out
        return done("unknown", "bab", "; ".join(notes))
    if status == "unsat":  # BaB proved every open row above bab_tol
        used = np.concatenate([closed, np.asarray(open_rows, dtype=int)])
        bounds = np.concatenate([lb[closed], np.full(len(open_rows), bab_tol)])
        res = unsat("bab", used, bounds)
        res.float_proof = res.float_proof or bool((bab_tol >= proven[open_rows]).all() and
                                                  (lb[closed] > proven[closed]).all())
        return res
    return done(status, "bab", note)


def _refuting_rows(hit: np.ndarray, lb: np.ndarray, owner: np.ndarray, n_disjuncts: int) -> np.ndarray:
    """Per refuted disjunct, its refuting row with the largest lower bound."""
    out = []
    for d in range(n_disjuncts):
        mine = np.nonzero((owner == d) & hit)[0]
        if len(mine):
            out.append(int(mine[np.argmax(lb[mine])]))
    return np.asarray(out, dtype=int)


def _row_rounding(net: Network, lo: Tensor, hi: Tensor, dtype: torch.dtype, shape: Tuple[int, ...],
                  rows: np.ndarray) -> np.ndarray:
    """Bound on the rounding error of every margin row (m,), for the network evaluated in ``dtype``."""
    from certkd.bounds.rounding import margin_tolerance, rounding_error_bound

    err_y = rounding_error_bound(net, lo[0], hi[0], dtype, shape)
    return margin_tolerance(err_y, rows)


def _branch_and_bound(net: Network, rows: np.ndarray, offsets: np.ndarray, shape: Tuple[int, ...],
                      in_box: Tuple[Tensor, Tensor], out_box: Tuple[Tensor, Tensor], deadline: float,
                      margin_tol: float) -> Tuple[str, str, Optional[Tensor]]:
    """BaB proving every margin row (rows (m, K), offsets (m,)) above ``margin_tol`` on the box.

    Each row stands for one open disjunct (refuting one conjunct refutes the disjunct, so this is
    sound; incomplete when only the conjunction is infeasible). Returns (status, note, candidate
    counterexample (1, *shape) or None); status is 'unsat', 'timeout' or 'unknown' without a candidate.
    """
    from certkd.verification.bab import bab_verify

    in_lo, in_hi = in_box
    red = spec_network(net, rows, offsets, shape)
    centre = ((in_lo + in_hi) / 2)[0]
    try:
        res = bab_verify(red, centre, 0, out_box[0][0], out_box[1][0],
                         timeout=max(deadline - time.monotonic(), 1e-3), deadline=deadline, margin_tol=margin_tol)
    except Exception as e:
        return "unknown", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", None
    if res.status == "verified":
        return "unsat", "", None
    if res.status == "falsified" and res.counterexample is not None:
        x = res.counterexample.reshape(1, *shape).to(in_lo.dtype)
        return "unknown", res.note, torch.max(torch.min(x, in_hi), in_lo)
    if time.monotonic() >= deadline - 1e-3:
        return "timeout", res.note, None
    return "unknown", res.note, None  # undecided with time left: a tie within tolerances, a domain limit


def _bounds(net: Network, lo: Tensor, hi: Tensor, rows: np.ndarray, offsets: np.ndarray, alpha_iterations: int,
            deadline: float, enough: float = 0.0):
    """[(stage, lower bounds of the margins rows·y − offsets (m,))] for IBP, CROWN, α-CROWN (each ∩ the
    previous; α-CROWN only while some bound is at most ``enough``). The rows are the engines'
    specification matrix C, so m rows cost an (m, K) matrix, not an (m, m) one."""
    from certkd.bounds.crown import alpha_crown_bounds, crown_bounds
    from certkd.bounds.ibp import ibp_spec_lower_bounds

    C = torch.tensor(rows, dtype=lo.dtype)
    off = offsets.astype(np.float64)
    finite = lambda t, fallback: torch.where(torch.isfinite(t), t, fallback)
    out = []
    with torch.no_grad():
        best = ibp_spec_lower_bounds(net, lo, hi, C)[0]
    best = finite(best, torch.full_like(best, -np.inf))
    out.append(("ibp", best.numpy().astype(np.float64) - off))
    if time.monotonic() > deadline:
        return out
    lb = crown_bounds(net, lo, hi, C=C.unsqueeze(0))[0]
    best = torch.maximum(best, finite(lb, best))
    out.append(("crown", best.numpy().astype(np.float64) - off))
    if alpha_iterations > 0 and time.monotonic() < deadline and float((best.double().numpy() - off).min()) <= enough:
        lb = alpha_crown_bounds(net, lo, hi, C=C.unsqueeze(0), iterations=alpha_iterations, deadline=deadline)[0]
        lb = lb.detach()
        best = torch.maximum(best, finite(lb, best))
        out.append(("alpha-crown", best.numpy().astype(np.float64) - off))
    return out


__all__ = ["RESULTS", "VerifyResult", "spec_network", "verify_network"]
