"""The MILP encoding of a network (Tjeng et al., ICLR 2019; docs/method.md §10.3).

The network as composed sparse affine maps, the float64 interval bounds of the pre-activations,
their progressive LP tightening with rigorous (Neumaier–Shcherbina) LP bounds, and the MILP
assembly (each activation's rows from its rule's ``encode_milp``; ReLU: big-M). See the module
notes of :mod:`certkd.verification.milp` ("Encoding") for the construction and the soundness
argument; :func:`certkd.verification.milp.milp_verify` uses it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp
from torch import Tensor, nn

from certkd.graph.convert import from_module
from certkd.graph.layers import Activation
from certkd.verification.highs import _highs_lp, _highspy, _run_highs


class EmptyDomainError(ValueError):
    """The caller's ``preactivation_bounds`` admit no point of the box.

    For bounds valid on the whole box this cannot happen (the input itself satisfies them), so it
    means the bounds describe a sub-domain (e.g. a branch-and-bound split) that is empty, or were
    not valid. The message contains "do not intersect".
    """


# --------------------------------------------------------------------------- network as affine maps

@dataclass
class _Affine:
    """v ↦ matrix @ v + bias on C-order flattened vectors (float64); ``rule``: the activation this
    pre-activation map feeds (None for the map to the logits)."""

    matrix: sp.csr_matrix
    bias: np.ndarray
    rule: Optional[Activation] = None

    def then(self, other: "_Affine") -> "_Affine":
        """other ∘ self."""
        return _Affine(sp.csr_matrix(other.matrix @ self.matrix), other.matrix @ self.bias + other.bias)

    def apply(self, v: np.ndarray) -> np.ndarray:
        return self.matrix @ v + self.bias


def _identity(n: int) -> _Affine:
    return _Affine(sp.identity(n, dtype=np.float64, format="csr"), np.zeros(n))


def _network_maps(model: nn.Module, in_shape: Tuple[int, ...]) -> Tuple[List[_Affine], _Affine]:
    """Affine maps to each activation's pre-activation, and the map to the logits, from the model's graph.

    Every map acts on the concatenation of the *sources* ``[x, h_0, …, h_{k−1}]`` (the input and
    the post-activations of the earlier activation layers), so residual connections, which read an
    older source, need nothing special; in a chain network only the last source has non-zeros.
    Each node's rule class supplies its sparse float64 matrices (``Layer.affine``), composed here.
    """
    net = from_module(model)
    shapes = net.shapes(tuple(in_shape))
    sizes = [int(np.prod(shapes[0]))]
    # per node: {source: matrix from that source}, bias
    reps: Dict[int, Tuple[Dict[int, sp.csr_matrix], np.ndarray]] = {0: ({0: _identity(sizes[0]).matrix},
                                                                       np.zeros(sizes[0]))}
    blocks: List[_Affine] = []

    def stacked(rep) -> _Affine:
        mats, bias = rep
        rows = bias.size
        parts = [mats[s] if s in mats else sp.csr_matrix((rows, n)) for s, n in enumerate(sizes)]
        return _Affine(sp.csr_matrix(sp.hstack(parts, format="csr")), bias)

    consumers = net.consumers()
    for i, node in enumerate(net.nodes[1:], 1):
        if isinstance(node.rule, Activation):
            if not node.rule.splittable:
                raise node.rule.unsupported("the MILP (no exact encoding: it is not piecewise linear); "
                                            "use the bound engines, which answer unknown where they cannot decide")
            blocks.append(stacked(reps[node.inputs[0]]))
            blocks[-1].rule = node.rule
            n = int(np.prod(shapes[i]))
            sizes.append(n)
            reps[i] = ({len(sizes) - 1: _identity(n).matrix}, np.zeros(n))
        else:
            mats, bias = node.rule.affine([shapes[j] for j in node.inputs], shapes[i])
            out: Dict[int, sp.csr_matrix] = {}
            bias = np.asarray(bias, dtype=np.float64).copy()
            for m, j in zip(mats, node.inputs):
                src_mats, src_bias = reps[j]
                for s, x in src_mats.items():
                    out[s] = sp.csr_matrix(m @ x) if s not in out else sp.csr_matrix(out[s] + m @ x)
                bias = bias + m @ src_bias
            reps[i] = (out, bias)
        for j in node.inputs:  # drop what no later node reads
            if j != net.output and all(c <= i for c in consumers[j]):
                reps.pop(j, None)
    return blocks, stacked(reps[net.output])


# --------------------------------------------------------------------------- bounds

def _interval(blk: _Affine, plo: np.ndarray, phi: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """float64 interval bounds of blk(v) for v in [plo, phi], widened against rounding."""
    c, r = (phi + plo) / 2, (phi - plo) / 2
    zc = blk.apply(c)
    zr = abs(blk.matrix) @ r
    slack = 1e-9 * (np.abs(zc) + zr) + 1e-8
    return zc - zr - slack, zc + zr + slack


def _preactivation_bounds(blocks: Sequence[_Affine], lo: np.ndarray, hi: np.ndarray,
                          extra: Optional[Sequence[Tuple[Tensor, Tensor]]], tighten: str,
                          deadline: float, threads: int, point: np.ndarray) -> Tuple[list, np.ndarray, np.ndarray]:
    """Bounds of every pre-activation, layer by layer, and the box of the last post-activation.

    Maps act on the concatenated sources (see :func:`_network_maps`); the returned box is that of
    all sources. Each layer: float64 interval bounds from the previous layers' boxes, intersected with the
    caller's bounds (``extra``); with ``tighten="lp"`` the still-unstable neurons of layers ≥ 2
    are then bounded by LP over the relaxation of the layers before (see :func:`_lp_tighten`).
    """
    if extra is not None and len(extra) != len(blocks):
        raise ValueError(f"preactivation_bounds has {len(extra)} entries, the model has {len(blocks)} activation "
                         "layers")
    bounds: list = []
    plo, phi = lo, hi
    for k, blk in enumerate(blocks):
        z_point = blk.apply(point)
        point = np.concatenate([point, blk.rule.evaluate(z_point)])
        l, u = _interval(blk, plo, phi)
        if extra is not None:
            el = extra[k][0].detach().double().cpu().reshape(-1).numpy()
            eu = extra[k][1].detach().double().cpu().reshape(-1).numpy()
            if el.shape != l.shape or eu.shape != u.shape:
                raise ValueError(f"preactivation_bounds[{k}] has {el.size} entries, the layer has {l.size}")
            l = np.maximum(l, el - 1e-6 * (1 + np.abs(el)))
            u = np.minimum(u, eu + 1e-6 * (1 + np.abs(eu)))
            if np.any(l > u):
                raise EmptyDomainError(f"preactivation_bounds[{k}] do not intersect the interval bounds: "
                                       "they cannot be valid bounds for the whole box")
        if tighten == "lp" and k >= 1 and time.perf_counter() < deadline:
            l, u = _lp_tighten(blocks[:k], bounds, blk, l, u, lo, hi, deadline, threads, z_point)
        bounds.append((l, u))
        post_lo, post_hi = blk.rule.post_box(l, u)
        plo, phi = np.concatenate([plo, post_lo]), np.concatenate([phi, post_hi])
    return bounds, plo, phi


class _LpRelaxation:
    """The LP relaxation of an encoding (binaries in [0, 1]), for rigorous bounds on linear objectives.

    Each bound is made valid independently of the LP solver's tolerances (Neumaier–Shcherbina):
    for any row multipliers y, c·v = y·(Av) + (c − Aᵀy)·v, and both terms are bounded below over
    the finite row and column bounds; HiGHS's optimal duals only serve as a good choice of y.
    The only error left is float64 rounding in computing Aᵀy and the sums, covered by slacks far
    above it (1e-12 relative on each |A_ij y_i| entering c − Aᵀy, 1e-9 relative on the sum).
    """

    def __init__(self, enc: "_Encoding", threads: int):
        highspy = self._hs = _highspy()
        self.enc = enc
        self.h = highspy.Highs()
        self.h.silent()
        self.h.setOptionValue("threads", int(threads))
        self.h.passModel(_highs_lp(enc, np.zeros(enc.num_col), 0.0, relax=True))
        self.a_t = enc.rows.T.tocsr()
        self.abs_a_t = abs(self.a_t)
        self.col_mag = np.maximum(np.abs(enc.col_lower), np.abs(enc.col_upper))
        self.rl = np.where(np.isfinite(enc.row_lower), enc.row_lower, 0.0)
        self.ru = np.where(np.isfinite(enc.row_upper), enc.row_upper, 0.0)
        self.has_rl, self.has_ru = np.isfinite(enc.row_lower), np.isfinite(enc.row_upper)
        self._prev = np.zeros(0, np.int32)

    def lower_bound(self, cols: np.ndarray, vals: np.ndarray, deadline: float) -> float:
        """A rigorous lower bound of Σ vals·v[cols] over the relaxation (−inf if the LP fails)."""
        h = self.h
        cols = np.asarray(cols, np.int32)
        h.changeColsCost(self._prev.size, self._prev, np.zeros(self._prev.size))
        h.changeColsCost(cols.size, cols, np.asarray(vals, np.float64))
        self._prev = cols
        h.setOptionValue("time_limit", max(deadline - time.perf_counter(), 1e-3))
        _run_highs(h)
        if h.getModelStatus() != self._hs.HighsModelStatus.kOptimal:
            return -math.inf
        y = np.asarray(h.getSolution().row_dual, dtype=np.float64)
        y = np.where(((y > 0) & ~self.has_rl) | ((y < 0) & ~self.has_ru), 0.0, y)
        cost = np.zeros(self.enc.num_col)
        np.add.at(cost, cols, vals)
        d = cost - self.a_t @ y
        d_err = 1e-12 * (self.abs_a_t @ np.abs(y) + np.abs(cost))
        terms = np.concatenate([np.where(y > 0, y * self.rl, y * self.ru),
                                np.where(d > 0, d * self.enc.col_lower, d * self.enc.col_upper)])
        return float(terms.sum() - 1e-9 * np.abs(terms).sum() - d_err @ self.col_mag - 1e-12)


def _lp_tighten(prefix: Sequence[_Affine], prefix_bounds: list, blk: _Affine, l: np.ndarray, u: np.ndarray,
                lo: np.ndarray, hi: np.ndarray, deadline: float, threads: int,
                guess: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Tighten the loose neurons of ``blk`` (its rule's ``loose``) by LP over the relaxation of the
    MILP of the layers before.

    The side that can make the neuron exact (for a kink at 0: stable) goes first, guessed from the
    sign of its value at the input (``guess``). Once exact, its other bound no longer matters to the
    encoding, only to the interval bounds of later layers, so its LP is skipped.
    """
    unstable = np.flatnonzero(blk.rule.loose(l, u))
    if unstable.size == 0:
        return l, u
    relax = _LpRelaxation(_encode(prefix, prefix_bounds, lo, hi), threads)
    post = relax.enc.post_cols
    live = np.flatnonzero(post >= 0)
    mat = blk.matrix[unstable][:, live].tocsr()
    l, u = l.copy(), u.copy()
    for q, i in enumerate(unstable):
        row = slice(mat.indptr[q], mat.indptr[q + 1])
        cols, vals = post[live[mat.indices[row]]], mat.data[row]
        for side in ("upper", "lower") if guess[i] < 0 else ("lower", "upper"):
            if time.perf_counter() >= deadline:
                return l, u
            if side == "lower":
                l[i] = max(l[i], relax.lower_bound(cols, vals, deadline) + blk.bias[i])
            else:
                u[i] = min(u[i], -relax.lower_bound(cols, -vals, deadline) + blk.bias[i])
            if not blk.rule.loose(l[i], u[i]):
                break
    return l, u


# --------------------------------------------------------------------------- MILP assembly

@dataclass
class _Encoding:
    num_col: int
    col_lower: np.ndarray
    col_upper: np.ndarray
    integer: np.ndarray  # bool per column
    rows: sp.csr_matrix
    row_lower: np.ndarray
    row_upper: np.ndarray
    post_cols: np.ndarray  # columns of all sources [x, h_0, ...] (−1: constant 0)
    num_inputs: int
    num_binaries: int


# Padding of the variable bounds and big-M constants. With bounds only ~1e-8 wide (e.g. a
# zero-width input box), HiGHS's presolve declares feasible LPs infeasible; bounds wider than its
# tolerances avoid that. Padding never changes the MILP's optimum: with integral binaries every z
# is an exact function of the input, inside its unpadded bounds; it only loosens the relaxation.
_PAD_ABS, _PAD_REL = 1e-6, 1e-7


class _Builder:
    """Columns (variables) and sparse rows of an encoding, appended in order."""

    def __init__(self, lo: np.ndarray, hi: np.ndarray):
        self.col_lo: List[np.ndarray] = [lo]
        self.col_hi: List[np.ndarray] = [hi]
        self.integ: List[np.ndarray] = [np.zeros(lo.size, bool)]
        self.n_col, self.n_row = lo.size, 0
        self.r_idx: list = []
        self.c_idx: list = []
        self.vals: list = []
        self.r_lo: list = []
        self.r_hi: list = []

    def add_cols(self, lower, upper, is_int: bool) -> np.ndarray:
        """New columns in [lower, upper] (integer or not): their indices."""
        idx = np.arange(self.n_col, self.n_col + lower.size)
        self.col_lo.append(np.asarray(lower, float))
        self.col_hi.append(np.asarray(upper, float))
        self.integ.append(np.full(lower.size, is_int))
        self.n_col += lower.size
        return idx

    def add_rows(self, rr, cc, vv, lower, upper) -> None:
        """Rows lower ≤ Σ vv·v[cc] ≤ upper; rr numbers the new rows from 0 (one entry per coefficient)."""
        self.r_idx.append(np.asarray(rr) + self.n_row)
        self.c_idx.append(np.asarray(cc))
        self.vals.append(np.asarray(vv, float))
        self.r_lo.append(np.asarray(lower, float))
        self.r_hi.append(np.asarray(upper, float))
        self.n_row += len(lower)


def _encode(blocks: Sequence[_Affine], bounds: list, lo: np.ndarray, hi: np.ndarray) -> _Encoding:
    """MILP of the network on the box [lo, hi]; neurons are classified by the (sound) ``bounds``."""
    b = _Builder(lo, hi)
    post = np.arange(lo.size)  # columns holding the sources [x, h_0, ...] (−1: constant 0)
    n_bin = 0
    for blk, (l, u) in zip(blocks, bounds):
        n = l.size
        lp, up = l - _PAD_ABS - _PAD_REL * np.abs(l), u + _PAD_ABS + _PAD_REL * np.abs(u)
        alive_prev = post >= 0
        prev_cols = post[alive_prev]

        def pre(mask: np.ndarray, blk=blk, lp=lp, up=up, alive_prev=alive_prev, prev_cols=prev_cols) -> np.ndarray:
            # z_i − Σ_j M_ij post_j = b_i for every neuron with a variable.
            live = np.flatnonzero(mask)
            z = np.full(n, -1)
            z[live] = b.add_cols(lp[live], up[live], False)
            m = blk.matrix[live][:, np.flatnonzero(alive_prev)].tocoo()
            k = live.size
            b.add_rows(np.concatenate([np.arange(k), m.row]), np.concatenate([z[live], prev_cols[m.col]]),
                       np.concatenate([np.ones(k), -m.data]), blk.bias[live], blk.bias[live])
            return z

        new_post, binaries = blk.rule.encode_milp(b, pre, l, u, lp, up)
        n_bin += binaries
        post = np.concatenate([post, new_post])

    rows = sp.csr_matrix((np.concatenate(b.vals) if b.vals else np.zeros(0),
                          (np.concatenate(b.r_idx) if b.r_idx else np.zeros(0, int),
                           np.concatenate(b.c_idx) if b.c_idx else np.zeros(0, int))), shape=(b.n_row, b.n_col))
    rows.sum_duplicates()
    return _Encoding(b.n_col, np.concatenate(b.col_lo), np.concatenate(b.col_hi), np.concatenate(b.integ), rows,
                     np.concatenate(b.r_lo) if b.r_lo else np.zeros(0),
                     np.concatenate(b.r_hi) if b.r_hi else np.zeros(0),
                     post, lo.size, n_bin)
