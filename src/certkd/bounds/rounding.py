"""A bound on the floating-point rounding error of a network's forward pass (``docs/verify_onnx.md`` §5).

Bounds (IBP, CROWN, BaB) are computed for the network in exact arithmetic on its stored weights.
onnxruntime (or torch) evaluates it in floating point, in an order and with fused multiply-adds
that no file specifies. :func:`rounding_error_bound` gives, for every output, a bound ``e`` with

    |fl(f(x)) − f(x)| ≤ e   for every x in the box and every evaluation order,

under the standard model of floating-point arithmetic (each operation is exact up to a relative
error ``u``, the unit roundoff: 2⁻²⁴ for float32, 2⁻⁵³ for float64) plus ``tiny`` of absolute error
per operation for underflow. A node that computes an affine map row ``y_i = Σ_j M_ij x_j + b_i``
with ``k_i`` nonzero terms (the bias counts as one) is charged Higham's bound for a sum of products,
``γ_{k_i + 2} · (Σ_j |M_ij| m_j + |b_i|)`` with ``γ_k = k·u / (1 − k·u)`` and ``m`` a bound on
``|x|`` over the box (from IBP); the two extra operations cover coefficients that the runtime
computes itself before the sum (a division by a BatchNorm's ``sqrt(var + eps)``, a normalisation's
``1/std``). A row that copies or negates one input (a reshape, a flatten, a transpose) is exact.
Errors of the inputs propagate through ``|M|``; an elementwise activation that a rule declares
exact with a Lipschitz constant (``Layer.exact_lipschitz``: 1 for ReLU) passes them on scaled by
that constant. A rule with neither gives an infinite bound (nothing is certified through it).

The walk uses each rule's ``affine`` (the MILP's sparse matrices: which terms each row sums, built
once per network and input shape) and ``interval`` methods (the products with |M|, and the
magnitudes), so it needs no layer-specific code. What it builds is cached per network until the
network's weights or buffers change (compared by value, so in-place edits are seen).
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from certkd.graph.network import Network

#: unit roundoff and the absolute error allowed per operation for underflow (flush-to-zero included)
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}
TINY = {torch.float32: 2.0 ** -126, torch.float64: 2.0 ** -1022}
_EXTRA_OPS = 2



class _Prepared:
    """What a network's bounds reuse across boxes: a float64 CPU copy (also the snapshot of its weights)
    and the affine parts per input shape."""

    def __init__(self, net: Network):
        self.net64 = copy.deepcopy(net).double().cpu()
        self.parts: Dict[Tuple[int, ...], list] = {}

    def fresh(self, net: Network) -> bool:
        """Whether ``net``'s weights and buffers still equal the copy's (float32 → float64 is exact)."""
        now, then = net.state_dict(), self.net64.state_dict()
        if now.keys() != then.keys():
            return False
        for k, t in now.items():
            t = t.detach().cpu()
            t = t.double() if t.is_floating_point() else t
            if t.shape != then[k].shape or not torch.equal(t, then[k]):
                return False
        return True


    def __deepcopy__(self, memo) -> None:  # a copied network starts without one (its weights may change)
        return None

    def __reduce__(self):  # nor does a pickled one carry it
        return (type(None), ())


_CACHE_ATTR = "_certkd_rounding"


def _prepared(net: Network) -> _Prepared:
    """The network's own :class:`_Prepared`, kept on it (no module-level cache) until its weights change:
    a run's many boxes pay the copy and the affine parts once."""
    prep = net.__dict__.get(_CACHE_ATTR)
    if prep is None or not prep.fresh(net):
        prep = net.__dict__[_CACHE_ATTR] = _Prepared(net)
    return prep


def _gamma(k: np.ndarray, u: float) -> np.ndarray:
    ku = k * u
    return np.where(ku < 0.5, ku / np.maximum(1.0 - ku, 0.5), np.inf)


def _affine_parts(prep: _Prepared, input_shape: Tuple[int, ...]) -> list:
    """Per node: None (input or non-affine), or (|b|, terms per row, exact-copy rows); [-1]: the shapes."""
    cache, net = prep.parts, prep.net64
    if input_shape in cache:
        return cache[input_shape]
    shapes = net.shapes(input_shape)
    parts: list = [None]
    for node in net.nodes[1:]:
        try:
            mats, bias = node.rule.affine([shapes[j] for j in node.inputs], shapes[len(parts)])
        except Exception:  # not affine (an activation), or no MILP rule
            parts.append(None)
            continue
        mats = [m.tocsr() for m in mats]
        bias = np.abs(np.asarray(bias, dtype=np.float64).reshape(-1))
        terms = sum(np.diff(m.indptr) for m in mats) + (bias != 0)
        # a row with one coefficient ±1 and no bias copies (or negates) its input: no rounding
        single = terms == 1
        copies = np.zeros_like(single)
        if single.any():
            mags = np.zeros(len(terms))
            for m in mats:
                np.maximum.at(mags, np.repeat(np.arange(m.shape[0]), np.diff(m.indptr)), np.abs(m.data))
            copies = single & (mags == 1.0) & (bias == 0)
        parts.append((bias, terms.astype(np.float64), copies))  # the matrices are not kept: see _abs_apply
    parts.append(shapes)
    cache[input_shape] = parts
    return parts


def _abs_apply(rule, shapes: Sequence[Tuple[int, ...]], vectors: Sequence[np.ndarray]) -> np.ndarray:
    """Σ_i |M_i| v_i of an affine rule for two stacked vectors per input (v_i (2, n_i)) -> (2, m).

    The radius that the rule's ``interval`` gives a box of centre 0 and radius v is |M| v exactly for an
    affine map (a looser rule only loosens the bound): one float64 convolution instead of a product
    with the sparse matrix of a convolution, which is several times slower.
    """
    rs = [torch.from_numpy(v).reshape(2, *shape) for v, shape in zip(vectors, shapes)]
    cs = [torch.zeros_like(r) for r in rs]
    with torch.no_grad():
        if rule.arity == 1:
            _, r, _ = rule.interval(cs[0], rs[0])
        else:
            _, r, _ = rule.interval(tuple(cs), tuple(rs))
    return r.reshape(2, -1).numpy()


def _magnitudes(net64: Network, lower: Tensor, upper: Tensor) -> List[np.ndarray]:
    """max(|l|, |u|) of every node's output over the box, from IBP in float64, flattened (per sample).
    ``net64``: the float64 CPU copy."""
    lower, upper = lower.detach().cpu().double(), upper.detach().cpu().double()
    c = ((upper + lower) / 2).unsqueeze(0)
    r = ((upper - lower) / 2).unsqueeze(0)
    vals: List[Tuple[Tensor, Tensor]] = [(c, r)]
    with torch.no_grad():
        for node in net64.nodes[1:]:
            ins = [vals[j] for j in node.inputs]
            if node.rule.arity == 1:
                cc, rr, _ = node.rule.interval(ins[0][0], ins[0][1])
            else:
                cc, rr, _ = node.rule.interval(tuple(v[0] for v in ins), tuple(v[1] for v in ins))
            vals.append((cc, rr))
    # outward by a relative 1e-12: IBP in float64 is itself rounded
    return [((cc.abs() + rr) * (1 + 1e-12)).reshape(-1).numpy() for cc, rr in vals]


def rounding_error_bound(net: Network, lower: Tensor, upper: Tensor, dtype: torch.dtype,
                         input_shape: Optional[Sequence[int]] = None) -> np.ndarray:
    """Bound on |fl(net(x)) − net(x)| for x in [lower, upper], every output, evaluated in ``dtype``.

    Args:
        net: the network (any parameter dtype; the bound is computed in float64).
        lower, upper: the input box, per-sample shape (no batch dimension) or (1, *shape).
        dtype: the precision the network is evaluated in (torch.float32 or torch.float64).
        input_shape: per-sample input shape (default: ``lower``'s shape without a leading 1).
    Returns:
        (K,) float64, K the flattened output size; ``inf`` where a node has no error rule.
    """
    shape = tuple(input_shape) if input_shape is not None else tuple(lower.shape[1:] if lower.dim() > 1 and
                                                                       lower.shape[0] == 1 else lower.shape)
    lower, upper = lower.reshape(shape), upper.reshape(shape)
    u, tiny = UNIT_ROUNDOFF[dtype], TINY[dtype]
    prep = _prepared(net)
    parts = _affine_parts(prep, shape)
    mags = _magnitudes(prep.net64, lower, upper)
    errs: List[np.ndarray] = [np.zeros(int(np.prod(shape)) if shape else 1)]
    shapes = parts[-1]
    for i, node in enumerate(net.nodes[1:], 1):
        part = parts[i]
        if part is not None:
            bias, terms, copies = part
            size, prop = _abs_apply(prep.net64.nodes[i].rule, [shapes[j] for j in node.inputs],
                                    [np.stack([mags[j], errs[j]]) for j in node.inputs])
            k = terms + _EXTRA_OPS
            own = _gamma(k, u) * (size + bias) + k * tiny
            errs.append(prop + np.where(copies, 0.0, own))
            continue
        lip = getattr(node.rule, "exact_lipschitz", None)
        if lip is None or len(node.inputs) != 1:
            errs.append(np.full(mags[i].shape, np.inf))
            continue
        errs.append(float(lip) * errs[node.inputs[0]] + tiny)
    out = errs[-1]
    return np.where(np.isfinite(out), out, np.inf)


def margin_tolerance(err: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """|rows|·err: the bound on the error of each margin ``rows · y`` (rows (m, K), err (K,)) -> (m,)."""
    a = np.abs(rows)
    terms = np.zeros(np.broadcast_shapes(a.shape, err[None, :].shape))
    np.multiply(a, err[None, :], out=terms, where=a > 0)  # 0 · inf is 0 here: a zero coefficient adds no error
    return terms.sum(1)


__all__ = ["TINY", "UNIT_ROUNDOFF", "margin_tolerance", "rounding_error_bound"]
