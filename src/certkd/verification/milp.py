"""Exact verification by mixed-integer linear programming (Tjeng et al., ICLR 2019; docs/method.md §10.3).

``milp_verify`` decides whether min over an L∞ box of min_{j≠y} (z_y − z_j) is positive, or
returns a counterexample; on small networks it is the referee for the incomplete verifiers.

Encoding
--------
* **Affine maps** (from the model's graph, :mod:`certkd.graph`; each layer's rule class gives
  its sparse matrix, and a map may read any earlier ReLU layer, which is how residual
  connections are encoded). Between two ReLUs, the layers (Normalize, Conv2d, eval-mode BatchNorm,
  Flatten, Linear, Identity/Dropout) are composed into one sparse affine map ``v ↦ M v + b`` in
  float64 on C-order flattened vectors (a Conv2d becomes its sparse matrix, built by index
  arithmetic; BatchNorm and Normalize are diagonal). Everything after the last ReLU, the head
  included, is composed into the map to the logits. A float64 forward through these maps is
  compared with the PyTorch forward before solving: a wrong encoding raises, it cannot answer.
* **Intermediate bounds** (the big-M constants), layer by layer:
  1. interval bounds propagated in float64 through the composed maps (:func:`_interval`: centre
     ``M c + b`` and radius ``|M| r`` of each map built from the graph's layer rules above;
     composing first makes them never looser than the layer-by-layer float32 IBP of
     :mod:`certkd.bounds.ibp`, up to rounding), widened by a relative 1e-9 plus 1e-8;
  2. intersected with optional caller-supplied bounds (e.g. CROWN, in float32), first widened by a
     relative 1e-6 against float32 rounding;
  3. with ``tighten="lp"`` (the default), each neuron still unstable in the second or a later ReLU
     layer is bounded by LP over the relaxation of the layers before it (Tjeng et al.'s
     progressive LP tightening; the second LP of a neuron is skipped once the first shows it
     stable). Each LP bound is made rigorous with the Neumaier–Shcherbina dual bound (see
     :class:`_LpRelaxation`), so solver tolerances cannot make it too tight.
  The post-activation box of each layer feeds the interval bounds of the next.
* **Variables.** Inputs in the pixel box; per ReLU neuron a pre-activation variable z tied to the
  previous layer by an equality. Stably inactive (u ≤ 0): no variable, post = 0. Stably active
  (l ≥ 0): post = z, no binary. Unstable (l < 0 < u): post h ∈ [0, u] and a binary a with the
  big-M constraints h ≥ z, h ≤ z − l(1 − a), h ≤ u·a, exact for z ∈ [l, u]. Variable bounds and
  big-M constants are padded by 1e-6 (+1e-7 relative) beyond the sound bounds, because HiGHS's
  presolve misjudges bounds narrower than its tolerances (e.g. zero-width boxes); padding only
  loosens the relaxation, the MILP optimum is unchanged (see ``_PAD_ABS``).
* **Property.** The minimum over j is split into K−1 problems ``min z_y − z_j`` (one per class,
  same constraints, different objective): simpler than one MILP with selection binaries for the
  minimum, and each relaxation is tighter. Classes go in increasing order of their clean margin
  (the likeliest counterexample first); the first confirmed counterexample stops everything.
* **Early termination.** With ``early_stop`` (the default) a class is not solved by MILP when its
  interval bound or its (rigorous) LP-relaxation bound already exceeds ``margin_tol``, and a MILP
  is interrupted (HiGHS MIP-interrupt callback) as soon as its dual bound exceeds ``margin_tol``;
  the reported margin is then a proven *lower bound* (min over classes of the bounds that proved
  them). With ``early_stop=False`` every class is solved to optimality (``mip_rel_gap`` 0,
  ``mip_abs_gap`` 1e-9) and the margin is the exact minimum, up to solver tolerances. In both
  modes a MILP stops (improving-solution callback) at the first solution with a negative objective
  that passes the float32 re-check below, which plays the role of an objective cutoff at 0.

Soundness rules
---------------
* ``"verified"`` only when, for every class, the float64 interval bound, the rigorous LP bound or
  HiGHS's MIP dual bound (``mip_dual_bound``; an LP optimum when no ReLU is unstable) exceeds
  ``margin_tol`` (default 1e-6): a safety margin for the MILP solver's feasibility/optimality
  tolerances (1e-7 primal/dual, 1e-6 integrality) and for the float32 arithmetic of the real
  network. Larger networks may warrant a larger ``margin_tol``. As a last guard, a proven margin
  above the clean point's float32 margin (beyond 1e-4 relative) is reported as inconsistent,
  never as verified.
* ``"falsified"`` only for a point that a **float32 PyTorch forward** confirms: the MILP
  solution's input, cast to float32 and clipped to the box, must give z_y − max_{j≠y} z_j ≤ 0.
  Candidates are checked in the improving-solution callback and at the end of each solve. A
  MILP "counterexample" that fails the check (a margin within the solver tolerances of 0)
  leaves the point undecided: status ``"timeout"`` with an explanatory ``note``.
* ``"timeout"``: the time limit ran out (HiGHS ``time_limit`` is set to what is left of the budget
  before each solve; LP tightening stops at the deadline), or the point could not be decided
  within the tolerances (see ``note``).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from certkd.attacks.pgd import eval_mode, linf_box
from certkd.graph.convert import from_module

_VERIFIED, _FALSIFIED, _TIMEOUT = "verified", "falsified", "timeout"


class EmptyDomainError(ValueError):
    """The caller's ``preactivation_bounds`` admit no point of the box.

    For bounds valid on the whole box this cannot happen (the input itself satisfies them), so it
    means the bounds describe a sub-domain (e.g. a branch-and-bound split) that is empty, or were
    not valid. The message contains "do not intersect".
    """


@dataclass
class MilpResult:
    """Outcome of :func:`milp_verify`.

    status: "verified" | "falsified" | "timeout" ("timeout" also covers points left undecided by
        numerical tolerances; ``note`` says which).
    margin: when verified, a proven lower bound of min_j (z_y − z_j) over the box (exact minimum
        with ``early_stop=False``); when falsified, the float32 margin of the counterexample (≤ 0);
        on timeout, the best proven lower bound of the margin found so far (≤ ``margin_tol``),
        or None when the bounds were found inconsistent (see ``note``).
    counterexample: pixel-space input (C, H, W), float32, inside the box, when falsified.
    time_s: wall time of the whole call. nodes: branch-and-bound nodes over all solves.
    note: why the point is undecided, or other remarks. num_binaries: unstable ReLUs encoded.
    """

    status: str
    margin: Optional[float]
    counterexample: Optional[Tensor]
    time_s: float
    nodes: Optional[int]
    note: str = ""
    num_binaries: int = 0


# --------------------------------------------------------------------------- network as affine maps

@dataclass
class _Affine:
    """v ↦ matrix @ v + bias on C-order flattened vectors (float64)."""

    matrix: sp.csr_matrix
    bias: np.ndarray

    def then(self, other: "_Affine") -> "_Affine":
        """other ∘ self."""
        return _Affine(sp.csr_matrix(other.matrix @ self.matrix), other.matrix @ self.bias + other.bias)

    def apply(self, v: np.ndarray) -> np.ndarray:
        return self.matrix @ v + self.bias


def _identity(n: int) -> _Affine:
    return _Affine(sp.identity(n, dtype=np.float64, format="csr"), np.zeros(n))


def _network_maps(model: nn.Module, in_shape: Tuple[int, ...]) -> Tuple[List[_Affine], _Affine]:
    """Affine maps to each ReLU's pre-activation, and the map to the logits, from the model's graph.

    Every map acts on the concatenation of the *sources* ``[x, h_0, …, h_{k−1}]`` (the input and
    the post-activations of the earlier ReLU layers), so residual connections, which read an
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
        if node.rule.is_relu:
            blocks.append(stacked(reps[node.inputs[0]]))
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
        raise ValueError(f"preactivation_bounds has {len(extra)} entries, the model has {len(blocks)} ReLUs")
    bounds: list = []
    plo, phi = lo, hi
    for k, blk in enumerate(blocks):
        z_point = blk.apply(point)
        point = np.concatenate([point, np.maximum(z_point, 0.0)])
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
        plo, phi = np.concatenate([plo, np.maximum(l, 0.0)]), np.concatenate([phi, np.maximum(u, 0.0)])
    return bounds, plo, phi


def _highspy():
    try:
        import highspy
    except ImportError as err:  # optional dependency (extra "verify")
        raise ImportError("MILP verification needs highspy: pip install 'certkd[verify]' (or highspy)") from err
    if not getattr(highspy, "_certkd_banner_done", False):
        _absorb_banner(highspy)
    return highspy


def _absorb_banner(highspy) -> None:
    """HiGHS prints a copyright banner to file descriptor 1 when the first instance is built.

    It would corrupt ``certkd verify``'s table (and any JSON a user pipes from stdout), and
    ``silent()`` can only be called after construction, so the first instance is built with
    fd 1 pointed at /dev/null.
    """
    import os
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    highspy._certkd_banner_done = True


def _run_highs(h) -> None:
    """``h.run()``; HiGHS's thread scheduler is process-wide and fixed by the first solve, so a solve
    asking for another thread count fails: then the scheduler is reset once and the solve retried."""
    highspy = _highspy()

    status = h.run()
    if status == highspy.HighsStatus.kError and h.getModelStatus() == highspy.HighsModelStatus.kNotset:
        highspy.Highs.resetGlobalScheduler(True)
        status = h.run()
    if status == highspy.HighsStatus.kError:
        raise RuntimeError(f"HiGHS failed: {h.modelStatusToString(h.getModelStatus())}")


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
    """Tighten the unstable neurons of ``blk`` by LP over the big-M relaxation of the layers before.

    The side that can show the neuron stable goes first, guessed from the sign of its value at the
    input (``guess``). Once a neuron is stable its other bound no longer matters to the encoding
    (no variable when inactive; post = z when active), only to the interval bounds of later
    layers, so its LP is skipped.
    """
    unstable = np.flatnonzero((l < 0) & (u > 0))
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
            if l[i] >= 0 or u[i] <= 0:
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


def _encode(blocks: Sequence[_Affine], bounds: list, lo: np.ndarray, hi: np.ndarray) -> _Encoding:
    """MILP of the network on the box [lo, hi]; neurons are classified by the (sound) ``bounds``."""
    col_lo: List[np.ndarray] = [lo]
    col_hi: List[np.ndarray] = [hi]
    integ: List[np.ndarray] = [np.zeros(lo.size, bool)]
    n_col = lo.size
    post = np.arange(lo.size)  # columns holding the sources [x, h_0, ...] (−1: constant 0)
    r_idx, c_idx, vals, r_lo, r_hi = [], [], [], [], []
    n_row = 0
    n_bin = 0

    def add_cols(lower, upper, is_int):
        nonlocal n_col
        idx = np.arange(n_col, n_col + lower.size)
        col_lo.append(np.asarray(lower, float))
        col_hi.append(np.asarray(upper, float))
        integ.append(np.full(lower.size, is_int))
        n_col += lower.size
        return idx

    def add_rows(rr, cc, vv, lower, upper):
        nonlocal n_row
        r_idx.append(np.asarray(rr) + n_row)
        c_idx.append(np.asarray(cc))
        vals.append(np.asarray(vv, float))
        r_lo.append(np.asarray(lower, float))
        r_hi.append(np.asarray(upper, float))
        n_row += len(lower)

    for blk, (l, u) in zip(blocks, bounds):
        n = l.size
        inactive, active = u <= 0, l >= 0
        unstable = ~inactive & ~active
        l, u = l - _PAD_ABS - _PAD_REL * np.abs(l), u + _PAD_ABS + _PAD_REL * np.abs(u)
        live = np.flatnonzero(~inactive)
        alive_prev = post >= 0
        z = np.full(n, -1)
        z[live] = add_cols(l[live], u[live], False)
        # z_i − Σ_j M_ij post_j = b_i for every neuron with a variable.
        m = blk.matrix[live][:, np.flatnonzero(alive_prev)].tocoo()
        prev_cols = post[alive_prev]
        k = live.size
        add_rows(np.concatenate([np.arange(k), m.row]), np.concatenate([z[live], prev_cols[m.col]]),
                 np.concatenate([np.ones(k), -m.data]), blk.bias[live], blk.bias[live])
        new_post = np.full(n, -1)
        new_post[active] = z[active]
        uns = np.flatnonzero(unstable)
        if uns.size:
            lu, uu, zu = l[uns], u[uns], z[uns]
            h = add_cols(np.zeros(uns.size), uu, False)
            a = add_cols(np.zeros(uns.size), np.ones(uns.size), True)
            new_post[uns] = h
            q = np.arange(uns.size)
            one = np.ones(uns.size)
            # h − z ≥ 0
            add_rows(np.concatenate([q, q]), np.concatenate([h, zu]), np.concatenate([one, -one]),
                     np.zeros(uns.size), np.full(uns.size, np.inf))
            # h − z − l·a ≤ −l   (a = 0 ⇒ h ≤ z − l, i.e. no constraint; a = 1 ⇒ h ≤ z)
            add_rows(np.concatenate([q, q, q]), np.concatenate([h, zu, a]), np.concatenate([one, -one, -lu]),
                     np.full(uns.size, -np.inf), -lu)
            # h − u·a ≤ 0
            add_rows(np.concatenate([q, q]), np.concatenate([h, a]), np.concatenate([one, -uu]),
                     np.full(uns.size, -np.inf), np.zeros(uns.size))
            n_bin += uns.size
        post = np.concatenate([post, new_post])

    rows = sp.csr_matrix((np.concatenate(vals) if vals else np.zeros(0),
                          (np.concatenate(r_idx) if r_idx else np.zeros(0, int),
                           np.concatenate(c_idx) if c_idx else np.zeros(0, int))), shape=(n_row, n_col))
    rows.sum_duplicates()
    return _Encoding(n_col, np.concatenate(col_lo), np.concatenate(col_hi), np.concatenate(integ), rows,
                     np.concatenate(r_lo) if r_lo else np.zeros(0), np.concatenate(r_hi) if r_hi else np.zeros(0),
                     post, lo.size, n_bin)


def _highs_lp(enc: _Encoding, cost: np.ndarray, offset: float, relax: bool = False):
    highspy = _highspy()

    lp = highspy.HighsLp()
    lp.num_col_ = enc.num_col
    lp.num_row_ = enc.rows.shape[0]
    lp.col_cost_ = cost
    lp.col_lower_ = enc.col_lower
    lp.col_upper_ = enc.col_upper
    lp.row_lower_ = enc.row_lower
    lp.row_upper_ = enc.row_upper
    lp.offset_ = float(offset)
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.start_ = enc.rows.indptr.astype(np.int32)
    lp.a_matrix_.index_ = enc.rows.indices.astype(np.int32)
    lp.a_matrix_.value_ = enc.rows.data
    lp.a_matrix_.num_col_ = enc.num_col
    lp.a_matrix_.num_row_ = enc.rows.shape[0]
    if enc.integer.any() and not relax:
        lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
                           for i in enc.integer]
    return lp


# --------------------------------------------------------------------------- float32 re-check

def _device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _forward(model: nn.Module, point: Tensor) -> Tensor:
    """float32 logits (K,) of one CPU point, on the model's device."""
    with torch.no_grad():
        return model(point.unsqueeze(0).to(_device(model)))[0].cpu()


def _float32_margin(model: nn.Module, point: Tensor, label: int) -> float:
    z = _forward(model, point)
    others = torch.cat([z[:label], z[label + 1:]])
    return float(z[label] - others.max())


# --------------------------------------------------------------------------- main entry

def milp_verify(model: nn.Module, x: Tensor, label: int, eps: Optional[float] = None,
                lower: Optional[Tensor] = None, upper: Optional[Tensor] = None, *, timeout: float = 60.0,
                preactivation_bounds: Optional[Sequence[Tuple[Tensor, Tensor]]] = None, threads: int = 1,
                early_stop: bool = True, margin_tol: float = 1e-6, tighten: str = "lp") -> MilpResult:
    """Decide robustness of ``model`` at ``x`` (class ``label``) on an L∞ box by MILP.

    Args:
        model: a :class:`~certkd.models.CertifiableNet` (run in eval mode here; BN uses running stats).
        x: (C, H, W) pixel-space input (a leading batch dimension of 1 is accepted).
        label: true class y.
        eps: radius of the box ``linf_box(x, eps)`` (clipped to [0, 1]); or give ``lower``/``upper``.
        timeout: wall-clock budget in seconds for the whole call (HiGHS ``time_limit`` is set to
            what is left before each solve).
        preactivation_bounds: optional list, one (lower, upper) pair per ReLU in ``model.features``,
            of bounds on that ReLU's input (any shape with the layer's number of elements);
            intersected with the float64 interval bounds. Bounds valid on a sub-domain only (a
            branch-and-bound split) make the answer one about that sub-domain: "verified" then
            means no counterexample whose pre-activations satisfy them (a counterexample is
            always a real one, anywhere in the box), and an empty sub-domain raises
            :class:`EmptyDomainError`.
        threads: HiGHS threads.
        early_stop: stop each class as soon as its bound exceeds ``margin_tol`` (margin is then a
            lower bound); False solves every class to optimality (exact margin).
        margin_tol: safety margin; "verified" needs every class's proven bound > ``margin_tol``.
        tighten: "lp" (LP tightening of the intermediate bounds, see the module notes) or "none"
            (interval and caller-supplied bounds only).
    Returns:
        :class:`MilpResult`.
    Raises:
        EmptyDomainError: the ``preactivation_bounds`` admit no point of the box.
    """
    highspy = _highspy()
    start = time.perf_counter()
    deadline = start + float(timeout)
    x = x.detach().cpu()
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise ValueError("milp_verify takes a single input")
        x = x[0]
    label = int(label)
    if tighten not in ("lp", "none"):
        raise ValueError(f"tighten must be 'lp' or 'none', got {tighten!r}")
    if not margin_tol >= 0:
        raise ValueError("margin_tol must be >= 0")
    if lower is None or upper is None:
        if eps is None:
            raise ValueError("give eps or both lower and upper")
        lower, upper = linf_box(x, float(eps))
    lower = lower.detach().cpu().reshape(x.shape).to(torch.float32)
    upper = upper.detach().cpu().reshape(x.shape).to(torch.float32)
    if torch.any(lower > upper):
        raise ValueError("empty input box: lower > upper somewhere")

    def elapsed() -> float:
        return time.perf_counter() - start

    with eval_mode(model):
        point = torch.max(torch.min(x.to(torch.float32), upper), lower)
        clean = _float32_margin(model, point, label)
        if clean <= 0:
            return MilpResult(_FALSIFIED, clean, point.clone(), elapsed(), 0,
                              note="the input (clipped to the box) is already misclassified")

        blocks, head = _network_maps(model, tuple(x.shape))
        lo = lower.double().reshape(-1).numpy()
        hi = upper.double().reshape(-1).numpy()
        _check_encoding(model, blocks, head, point)
        bounds, flo, fhi = _preactivation_bounds(blocks, lo, hi, preactivation_bounds, tighten, deadline, threads,
                                                 point.double().reshape(-1).numpy())

        num_classes = head.matrix.shape[0]
        w = head.matrix.toarray()
        others = [j for j in range(num_classes) if j != label]
        diff_w = {j: w[label] - w[j] for j in others}
        diff_b = {j: float(head.bias[label] - head.bias[j]) for j in others}
        fc, fr = (fhi + flo) / 2, (fhi - flo) / 2
        ibp_lb = {j: float(diff_w[j] @ fc - np.abs(diff_w[j]) @ fr + diff_b[j]) - 1e-9 * (1 + abs(diff_b[j]))
                  for j in others}
        z_clean = _forward(model, point).double().numpy()
        order = sorted(others, key=lambda j: z_clean[label] - z_clean[j])

        enc = _encode(blocks, bounds, lo, hi)
        live = enc.post_cols >= 0
        relax: Optional[_LpRelaxation] = None
        best = dict(ibp_lb)  # best proven lower bound of min z_y − z_j per class
        nodes = 0
        undecided = []

        def result(status: str, note: str = "", margin: Optional[float] = None, cex: Optional[Tensor] = None,
                   suspect: bool = False):
            if status == _TIMEOUT and not suspect:
                margin = min(best.values())  # a valid lower bound of the margin, though not > margin_tol
            return MilpResult(status, margin, cex, elapsed(), nodes, note=note, num_binaries=enc.num_binaries)

        for j in order:
            if early_stop and best[j] > margin_tol:
                continue
            if early_stop and time.perf_counter() < deadline:  # the LP relaxation may already prove class j
                relax = relax or _LpRelaxation(enc, threads)
                lp_lb = relax.lower_bound(enc.post_cols[live], diff_w[j][live], deadline) + diff_b[j]
                best[j] = max(best[j], lp_lb)
                if best[j] > margin_tol:
                    continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return result(_TIMEOUT, "time limit reached")
            cost = np.zeros(enc.num_col)
            np.add.at(cost, enc.post_cols[live], diff_w[j][live])
            out = _solve_class(highspy, enc, cost, diff_b[j], model, lower, upper, label, remaining, threads,
                               early_stop, margin_tol)
            nodes += out["nodes"]
            if out["counterexample"] is not None:
                return result(_FALSIFIED, f"counterexample found for class {j}", out["cex_margin"],
                              out["counterexample"])
            if early_stop or out["timeout"]:
                best[j] = max(best[j], out["dual_bound"])
            else:
                best[j] = out["dual_bound"]  # exact mode: the optimum itself, not the best of several bounds
            if out["timeout"]:
                return result(_TIMEOUT, f"time limit reached on class {j}")
            if not best[j] > margin_tol:
                undecided.append((j, out))

        if undecided:
            j, out = undecided[0]
            return result(_TIMEOUT, f"class {j} undecided: proven bound {out['dual_bound']:.3g} <= margin_tol, best "
                                    f"objective {out['primal']:.3g}, and no float32-confirmed counterexample "
                                    f"(HiGHS: {out['status']}); the margin is within solver tolerances of 0")
        margin = min(best.values())
        if _inside(blocks, bounds, point) and margin > clean + 1e-4 * (1 + abs(clean)):
            return result(_TIMEOUT, f"inconsistent: proven margin {margin:.6g} exceeds the clean margin "
                                    f"{clean:.6g}", suspect=True)
        return result(_VERIFIED, margin=margin)


def _inside(blocks: Sequence[_Affine], bounds: list, point: Tensor) -> bool:
    """Whether the point's pre-activations lie within ``bounds`` (up to the encoding's padding).

    Always true for bounds valid on the box; caller bounds of a sub-domain may exclude the point,
    and then the minimum over the sub-domain may exceed the point's own margin.
    """
    v = point.double().reshape(-1).numpy()
    for blk, (l, u) in zip(blocks, bounds):
        z = blk.apply(v)
        if np.any(z < l - _PAD_ABS - _PAD_REL * np.abs(l)) or np.any(z > u + _PAD_ABS + _PAD_REL * np.abs(u)):
            return False
        v = np.concatenate([v, np.maximum(z, 0.0)])
    return True


def _check_encoding(model: nn.Module, blocks: Sequence[_Affine], head: _Affine, point: Tensor) -> None:
    """Compare a float64 forward through the composed maps with the PyTorch forward."""
    v = point.double().reshape(-1).numpy()
    for blk in blocks:
        v = np.concatenate([v, np.maximum(blk.apply(v), 0.0)])
    z = head.apply(v)
    ref = _forward(model, point).double().numpy()
    if not np.allclose(z, ref, rtol=1e-3, atol=1e-3):
        raise RuntimeError(f"MILP encoding disagrees with the model: max |Δlogit| = {np.abs(z - ref).max():.3g}")


def _solve_class(highspy, enc: _Encoding, cost: np.ndarray, offset: float, model: nn.Module, lower: Tensor,
                 upper: Tensor, label: int, time_limit: float, threads: int, early_stop: bool,
                 margin_tol: float) -> dict:
    h = highspy.Highs()
    h.silent()
    h.setOptionValue("threads", int(threads))
    h.setOptionValue("time_limit", max(float(time_limit), 1e-3))
    h.setOptionValue("random_seed", 0)
    if not early_stop:
        h.setOptionValue("mip_rel_gap", 0.0)
        h.setOptionValue("mip_abs_gap", 1e-9)
    h.passModel(_highs_lp(enc, cost, offset))
    n_in = enc.num_inputs
    found = {"counterexample": None, "cex_margin": None}
    checked = set()

    def check(sol) -> bool:
        cand = torch.as_tensor(np.asarray(sol[:n_in], dtype=np.float64), dtype=torch.float32).reshape(lower.shape)
        cand = torch.max(torch.min(cand, upper), lower)
        key = cand.numpy().tobytes()
        if key in checked:
            return False
        checked.add(key)
        m = _float32_margin(model, cand, label)
        if m <= 0:
            found["counterexample"], found["cex_margin"] = cand, m
            return True
        return False

    def on_solution(e):
        if e.data_out.objective_function_value < 0 and found["counterexample"] is None:
            if check(e.data_out.mip_solution):
                e.interrupt()

    def on_interrupt(e):
        if found["counterexample"] is not None:
            e.interrupt()
        elif early_stop and e.data_out.mip_dual_bound > margin_tol:
            e.interrupt()

    h.cbMipImprovingSolution.subscribe(on_solution)
    h.cbMipInterrupt.subscribe(on_interrupt)
    _run_highs(h)
    status = h.getModelStatus()
    if status in (highspy.HighsModelStatus.kInfeasible, highspy.HighsModelStatus.kUnboundedOrInfeasible):
        h.setOptionValue("presolve", "off")  # presolve's tolerances can misjudge nearly fixed bounds
        h.setOptionValue("time_limit", max(float(time_limit) - h.getRunTime(), 1e-3))
        _run_highs(h)
        status = h.getModelStatus()
    info = h.getInfo()
    has_sol = int(info.primal_solution_status) == int(highspy.kSolutionStatusFeasible)
    primal = info.objective_function_value if has_sol else math.inf
    if found["counterexample"] is None and has_sol and primal < 0:
        check(h.getSolution().col_value)
    dual = info.mip_dual_bound
    if not enc.integer.any():  # pure LP (no unstable ReLU): only an optimum bounds the objective
        dual = info.objective_function_value if status == highspy.HighsModelStatus.kOptimal else -math.inf
    if status in (highspy.HighsModelStatus.kInfeasible, highspy.HighsModelStatus.kUnboundedOrInfeasible):
        raise EmptyDomainError("the MILP is infeasible: the preactivation_bounds do not intersect the set "
                               "reachable from the box (an empty sub-domain, or invalid bounds)")
    dual = float(dual) if dual is not None and math.isfinite(dual) else -math.inf
    # Stopped early (time limit, or an interrupt that did not come from a decision): undecided,
    # unless the bound reached by then already proves the class.
    stopped = status in (highspy.HighsModelStatus.kTimeLimit, highspy.HighsModelStatus.kInterrupt)
    timed_out = stopped and found["counterexample"] is None and not dual > margin_tol
    return {"counterexample": found["counterexample"], "cex_margin": found["cex_margin"],
            "dual_bound": dual,
            "primal": float(primal), "nodes": int(max(info.mip_node_count, 0)), "timeout": timed_out,
            "status": h.modelStatusToString(status)}
