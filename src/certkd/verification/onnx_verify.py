"""Verify any supported network (ONNX file or ``nn.Module``) against a property (``docs/verify_onnx.md``).

Stages, stopping at the first that decides (all within one deadline):

1. **Attack**: multi-restart PGD on the property (:func:`certkd.attacks.spec_pgd.spec_pgd`).
2. **Bounds**: IBP, CROWN, α-CROWN on every conjunct row at once. The network gets one extra
   Linear node ``z = [0, −(A y − b)]`` (every conjunct of every disjunct, one row each), so
   "class 0 wins" is exactly "every margin g = A y − b is positive": the engines' label
   specification C(0) bounds the margins. A disjunct is refuted once one of its conjuncts'
   lower bound exceeds ``margin_tol`` (see :mod:`certkd.verification.vnnlib` for why).
3. **Branch and bound** (:func:`certkd.verification.bab.bab_verify`, exact MILP at its leaves) on
   the disjuncts still open, each represented by its conjunct with the best α-CROWN bound: proving
   that conjunct positive everywhere refutes the disjunct (sound; incomplete for conjunctions).

Answers: ``unsat`` (every disjunct refuted), ``sat`` (a counterexample that torch *and*
onnxruntime confirm in float32: inside the box, compared in float64, and violating the property
on both forwards; an unconfirmed candidate is never reported as sat), ``timeout`` or
``unknown`` (an engine gave up, or a candidate did not confirm). Bounds use the float32 box
rounded outward, the attack the float32 box rounded inward.
"""
from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from certkd.errors import CertkdError
from certkd.graph.network import Network, Node
from certkd.verification.vnnlib import Property, matrix_property, read_property, robustness_property

RESULTS = ("sat", "unsat", "timeout", "unknown")


@dataclass
class VerifyResult:
    """status: one of :data:`RESULTS`; stage: what decided; x (d,) float32 and y (K,) the
    onnxruntime outputs of a confirmed counterexample (sat only); note: why undecided."""

    status: str
    time_s: float
    stage: str = ""
    x: Optional[np.ndarray] = None
    y: Optional[np.ndarray] = None
    note: str = ""

    def text(self) -> str:
        """The competition's result file: ``sat`` and ``((X_0 v) ... (Y_0 v) ...)``, or one word."""
        if self.status != "sat":
            return self.status + "\n"
        parts = [f"(X_{i} {float(v)!r})" for i, v in enumerate(self.x)]
        parts += [f"(Y_{i} {float(v)!r})" for i, v in enumerate(self.y)]
        return "sat\n(" + "\n ".join(parts) + ")\n"


# --------------------------------------------------------------------------------------- helpers

def _f32_box(prop: Property, shape: Sequence[int]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(outer lo, outer hi, inner lo, inner hi), each (1, *shape) float32: the outer box contains
    the property's box, every float32 point of the inner one lies in it."""
    lo, hi = prop.lower, prop.upper
    lo32, hi32 = lo.astype(np.float32), hi.astype(np.float32)
    out_lo = np.where(lo32 > lo, np.nextafter(lo32, np.float32(-np.inf)), lo32)
    out_hi = np.where(hi32 < hi, np.nextafter(hi32, np.float32(np.inf)), hi32)
    in_lo = np.where(lo32 < lo, np.nextafter(lo32, np.float32(np.inf)), lo32)
    in_hi = np.where(hi32 > hi, np.nextafter(hi32, np.float32(-np.inf)), hi32)
    in_hi = np.maximum(in_hi, in_lo)  # a degenerate coordinate: the candidate then fails the check
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).reshape(1, *shape)
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
    lin = nn.Linear(k, rows.shape[0] + 1)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
        lin.weight[1:] = torch.tensor(-rows, dtype=torch.float32)
        lin.bias[1:] = torch.tensor(offsets, dtype=torch.float32)
    nodes.append(Node("spec", _rule(lin, "spec"), (src,)))
    return Network(nodes).eval()


def _rule(module: nn.Module, name: str):
    from certkd.graph.convert import make_rule
    return make_rule(module, name)


class _Checker:
    """Confirms candidates with a float32 torch forward and onnxruntime."""

    def __init__(self, net: Network, prop: Property, shape: Sequence[int], onnx_source):
        self.net, self.prop, self.shape = net, prop, tuple(shape)
        self.session, self.why = None, ""
        try:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = opts.inter_op_num_threads = 1
            self.session = ort.InferenceSession(onnx_source, opts, providers=["CPUExecutionProvider"])
            self.input_name = self.session.get_inputs()[0].name
            self.ort_shape = [d if isinstance(d, int) and d > 0 else 1 for d in self.session.get_inputs()[0].shape]
        except Exception as e:  # no onnxruntime, or the model could not be exported/loaded
            self.why = f"onnxruntime unavailable: {str(e).splitlines()[0] if str(e) else type(e).__name__}"

    def __call__(self, x: Tensor) -> Tuple[bool, Optional[np.ndarray], str]:
        """(confirmed, onnxruntime outputs, why not)."""
        x32 = x.detach().float().reshape(-1).numpy()
        if not self.prop.contains(x32):
            return False, None, "candidate outside the box"
        with torch.no_grad():
            y_t = self.net(torch.from_numpy(x32).reshape(1, *self.shape)).reshape(-1).numpy()
        if not self.prop.violated_by(y_t):
            return False, None, "candidate does not violate the property in a float32 torch forward"
        if self.session is None:
            return False, None, self.why
        y_o = self.session.run(None, {self.input_name: x32.reshape(self.ort_shape)})[0].reshape(-1)
        if not self.prop.violated_by(y_o):
            return False, None, "candidate does not violate the property under onnxruntime"
        return True, y_o, ""


def _onnx_bytes_of(net: Network, shape: Sequence[int]) -> bytes:
    import inspect

    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros((1,) + tuple(shape)),), buf, opset_version=13, **kwargs)
    return buf.getvalue()


# --------------------------------------------------------------------------------------- main

def verify_network(net: Network, prop: Property, input_shape: Sequence[int], *, timeout: float = 60.0,
                   onnx_source=None, attack_restarts: int = 100, attack_steps: int = 100, seed: int = 0,
                   alpha_iterations: int = 20, margin_tol: float = 1e-6) -> VerifyResult:
    """Decide ``prop`` for ``net`` (per-sample input shape ``input_shape``) within ``timeout`` s.

    onnx_source: the ONNX file (path or bytes) onnxruntime confirms counterexamples with;
    None exports ``net`` with torch.onnx for that.
    """
    start = time.perf_counter()
    deadline = start + float(timeout)
    shape = tuple(int(s) for s in input_shape)
    net = net.eval()
    out_shape = net.shapes(shape)[-1]
    if prop.lower.size != int(np.prod(shape)):
        raise CertkdError(f"the property has {prop.lower.size} inputs; the network takes {int(np.prod(shape))} "
                          f"(shape {shape})")
    if prop.num_outputs != int(np.prod(out_shape)):
        raise CertkdError(f"the property has {prop.num_outputs} outputs Y; the network has {int(np.prod(out_shape))}")
    done = lambda status, stage="", note="", x=None, y=None: VerifyResult(
        status, round(time.perf_counter() - start, 4), stage, x, y, note)
    if onnx_source is None:
        try:
            onnx_source = _onnx_bytes_of(net, shape)
        except Exception as e:
            onnx_source = f"<export failed: {e}>"
    check = _Checker(net, prop, shape, onnx_source)
    out_lo, out_hi, in_lo, in_hi = _f32_box(prop, shape)
    mats = [(torch.tensor(A, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)) for A, b in prop.matrices]
    notes: List[str] = []

    def candidate(x: Tensor, stage: str) -> Optional[VerifyResult]:
        ok, y, why = check(x)
        if ok:
            return done("sat", stage, x=x.detach().float().reshape(-1).numpy(), y=y)
        notes.append(f"{stage}: {why}")
        return None

    # 1. attack
    from certkd.attacks.spec_pgd import spec_pgd

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x_adv, v = spec_pgd(net, in_lo, in_hi, mats, restarts=attack_restarts, steps=attack_steps, generator=gen,
                            deadline=deadline)
    if v <= 0:
        res = candidate(x_adv, "attack")
        if res is not None:
            return res
    if time.perf_counter() > deadline:
        return done("timeout", "attack")

    # 2. bounds on every conjunct row: row r belongs to disjunct owner[r]
    rows = np.concatenate([A for A, _ in prop.matrices])
    offsets = np.concatenate([b for _, b in prop.matrices])
    owner = np.concatenate([np.full(len(b), d) for d, (_, b) in enumerate(prop.matrices)])
    try:
        snet = spec_network(net, rows, offsets, shape)
        best = _bounds(snet, out_lo, out_hi, alpha_iterations, deadline)
    except CertkdError:
        raise
    except Exception as e:  # an engine refused this network: one line, no answer
        return done("unknown", "bounds", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    stage = "ibp"
    for stage_name, lb in best:
        stage = stage_name
        refuted = {int(owner[r]) for r in np.nonzero(lb > margin_tol)[0]}
        if len(refuted) == len(prop.matrices):
            return done("unsat", stage)
    if time.perf_counter() > deadline:
        return done("timeout", stage)

    # 3. BaB on the open disjuncts
    status, note, x = _branch_and_bound(net, prop, rows, offsets, owner, best[-1][1], shape, (in_lo, in_hi),
                                        (out_lo, out_hi), deadline, margin_tol)
    if x is not None:
        out = candidate(x, "bab")
        if out is not None:
            return out
        return done("unknown", "bab", "; ".join(notes))
    return done(status, "bab", note)


def _branch_and_bound(net: Network, prop: Property, rows: np.ndarray, offsets: np.ndarray, owner: np.ndarray,
                      lb: np.ndarray, shape: Tuple[int, ...], in_box: Tuple[Tensor, Tensor],
                      out_box: Tuple[Tensor, Tensor], deadline: float, margin_tol: float
                      ) -> Tuple[str, str, Optional[Tensor]]:
    """BaB on every disjunct the bounds left open, each by its conjunct with the best lower bound (refuting
    one conjunct refutes the disjunct, so this is sound; it is incomplete when only the conjunction is
    infeasible). Returns (status, note, candidate counterexample (1, *shape) or None); status is 'unsat',
    'timeout' or 'unknown' when no candidate came back."""
    open_rows = []
    for d in range(len(prop.matrices)):
        mine = np.nonzero(owner == d)[0]
        if not bool((lb[mine] > margin_tol).any()):
            open_rows.append(int(mine[np.argmax(lb[mine])]))
    from certkd.verification.bab import bab_verify

    in_lo, in_hi = in_box
    red = spec_network(net, rows[open_rows], offsets[open_rows], shape)
    centre = ((in_lo + in_hi) / 2)[0]
    try:
        res = bab_verify(red, centre, 0, out_box[0][0], out_box[1][0],
                         timeout=max(deadline - time.perf_counter(), 1e-3), margin_tol=margin_tol)
    except Exception as e:
        return "unknown", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", None
    if res.status == "verified":
        return "unsat", "", None
    if res.status == "falsified" and res.counterexample is not None:
        return "unknown", res.note, torch.max(torch.min(res.counterexample.reshape(1, *shape).float(), in_hi), in_lo)
    if time.perf_counter() >= deadline - 1e-3 or "domain limit" not in res.note:
        return "timeout", res.note, None
    return "unknown", res.note, None


def _bounds(snet: Network, lo: Tensor, hi: Tensor, alpha_iterations: int, deadline: float):
    """[(stage, lower bounds of the margins (m,))] for IBP, CROWN, α-CROWN (each ∩ the previous)."""
    from certkd.bounds import ibp_logit_difference_bounds
    from certkd.bounds.crown import alpha_crown_bounds, crown_bounds

    y = torch.zeros(1, dtype=torch.long)
    out = []
    with torch.no_grad():
        best = ibp_logit_difference_bounds(snet, lo, hi, y)[0][0]
    best = torch.where(torch.isfinite(best), best, torch.full_like(best, -np.inf))
    out.append(("ibp", best.numpy().astype(np.float64)))
    if time.perf_counter() > deadline:
        return out
    lb = crown_bounds(snet, lo, hi, y)[0]
    best = torch.maximum(best, torch.where(torch.isfinite(lb), lb, best))
    out.append(("crown", best.numpy().astype(np.float64)))
    if alpha_iterations > 0 and time.perf_counter() < deadline and float(best.min()) <= 0:
        lb = alpha_crown_bounds(snet, lo, hi, y, iterations=alpha_iterations, deadline=deadline)[0].detach()
        best = torch.maximum(best, torch.where(torch.isfinite(lb), lb, best))
        out.append(("alpha-crown", best.numpy().astype(np.float64)))
    return out


def verify_model(model: Union[str, nn.Module], lower=None, upper=None, spec=None, *, timeout: float = 60.0,
                 input_shape: Optional[Sequence[int]] = None, **kwargs) -> VerifyResult:
    """Verify ``model`` on the box [lower, upper] against ``spec``.

    Args:
        model: an ONNX path, or an ``nn.Module`` / ``nn.Sequential`` of supported layers
            (``docs/adding_a_layer.md``).
        lower, upper: the input box, per-sample shape (no batch dimension), or None to take it
            from a :class:`Property` spec.
        spec: a true label (int: robustness, every other class must score lower), a matrix C
            (S, K) (every row of C·y must stay > 0), a :class:`Property`, or a VNN-LIB path.
        timeout: seconds for the whole call; input_shape: per-sample shape (default: the ONNX
            input's, or ``lower.shape``); kwargs: see :func:`verify_network`.
    Returns:
        :class:`VerifyResult`. Raises CertkdError (one line) for unsupported models or specs.
    """
    from certkd.graph import from_module, from_onnx

    source = None
    if isinstance(spec, (str, bytes)) or hasattr(spec, "__fspath__"):
        spec = read_property(spec)
    if input_shape is None and lower is None and isinstance(spec, Property):
        input_shape = None if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__") \
            else (spec.lower.size,)
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        net = from_onnx(model, input_shape)
        shape = net.input_shape
        source = str(model)
    elif isinstance(model, nn.Module):
        net = from_module(model)
        shape = tuple(input_shape) if input_shape is not None else \
            (tuple(torch.as_tensor(lower).shape) if lower is not None else None)
        if shape is None:
            raise CertkdError("verify_model needs input_shape (or lower) for an nn.Module")
    else:
        raise CertkdError(f"model must be an ONNX path or an nn.Module, got {type(model).__name__}")
    flat = lambda t: np.asarray(torch.as_tensor(t).detach().cpu().double().reshape(-1).numpy())
    if isinstance(spec, Property):
        prop = spec if lower is None else Property(flat(lower), flat(upper), spec.disjuncts, spec.num_outputs,
                                                   spec.source)
    else:
        if lower is None or upper is None:
            raise CertkdError("verify_model needs lower and upper unless spec is a VNN-LIB property")
        k = int(np.prod(net.shapes(tuple(shape))[-1]))
        if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
            if not 0 <= int(spec) < k:
                raise CertkdError(f"label {spec} out of range for {k} outputs")
            prop = robustness_property(flat(lower), flat(upper), int(spec), k)
        elif spec is not None and np.asarray(torch.as_tensor(spec)).ndim == 2:
            prop = matrix_property(flat(lower), flat(upper), np.asarray(torch.as_tensor(spec), dtype=np.float64))
        else:
            raise CertkdError("spec must be a label (int), a matrix C (S, K) or a VNN-LIB Property")
    return verify_network(net, prop, shape, timeout=timeout, onnx_source=source, **kwargs)


def verify_instance(onnx_path, vnnlib_path, timeout: float = 60.0, **kwargs) -> VerifyResult:
    """One VNN-COMP instance: read both files and verify (errors -> CertkdError, one line)."""
    try:
        prop = read_property(vnnlib_path)
    except (OSError, ValueError) as e:
        raise CertkdError(f"cannot read VNN-LIB property: {e}") from None
    return verify_model(onnx_path, None, None, prop, timeout=timeout, **kwargs)


__all__ = ["RESULTS", "VerifyResult", "spec_network", "verify_instance", "verify_model", "verify_network"]
