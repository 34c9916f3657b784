"""The property a VNN-LIB file states: an input box and a DNF of linear output constraints.

See :mod:`certkd.verification.vnnlib` and ``docs/verify_onnx.md`` for the semantics. Every
:class:`Property` is checked when built (also when built by the Python API): the box must be
finite with lower <= upper, there must be at least one disjunct, and the DNF must stay within
:data:`MAX_CONSTRAINTS` constraints and :data:`MAX_CELLS` matrix entries; its matrices are built
in one vectorised pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from certkd.verification.vnnlib_sexpr import VnnlibError

#: Most constraints (rows of all disjuncts' A together) a property may hold after the output
#: assertions are multiplied out: 16 assertions ``(or a b)`` make 65,536 disjuncts of 16 rows.
MAX_CONSTRAINTS = 100_000
#: Most numbers in the matrices A (constraints × outputs): 80 MB of float64.
MAX_CELLS = 10_000_000


@dataclass
class Constraint:
    """One atomic output constraint ``a · y <= b`` (``a`` as {output index: coefficient}).

    ``pair`` is (j, k) when the comparison is exactly ``Y_j >= Y_k`` (robustness form).
    """

    a: Dict[int, float]
    b: float
    text: str
    line: int
    pair: Optional[Tuple[int, int]] = None


def size_problem(n_disjuncts: int, n_constraints: int, num_outputs: int,
                 what: str = "the output condition") -> Optional[str]:
    """Why a DNF of this size is refused (past :data:`MAX_CONSTRAINTS` or :data:`MAX_CELLS`), or None."""
    if n_constraints > MAX_CONSTRAINTS:
        return (f"{what} multiplied out is {n_disjuncts:,} disjuncts with {n_constraints:,} constraints in all, "
                f"past certkd's limit of {MAX_CONSTRAINTS:,} constraints; split the property into several files")
    if n_constraints * num_outputs > MAX_CELLS:
        return (f"{what} multiplied out is {n_constraints:,} constraints over {num_outputs:,} outputs, "
                f"{n_constraints * num_outputs:,} matrix entries, past certkd's limit of {MAX_CELLS:,}; "
                f"split the property into several files")
    return None


def check_size(n_disjuncts: int, n_constraints: int, num_outputs: int) -> None:
    """Raise VnnlibError (one line) if :func:`size_problem` refuses the DNF."""
    why = size_problem(n_disjuncts, n_constraints, num_outputs)
    if why is not None:
        raise VnnlibError(why)


def _box(lower, upper) -> Tuple[np.ndarray, np.ndarray]:
    """The bounds as flat float64 arrays (d,), refused unless same shape, finite and lower <= upper."""
    try:
        lo, hi = np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise VnnlibError(f"the input bounds must be arrays of numbers ({str(e).splitlines()[0]})") from None
    if lo.shape != hi.shape:
        raise VnnlibError(f"the lower bound has shape {tuple(lo.shape)} but the upper bound {tuple(hi.shape)}; "
                          f"give both the same shape")
    lo, hi = lo.reshape(-1), hi.reshape(-1)
    if lo.size == 0:
        raise VnnlibError("the input box has no inputs (empty lower and upper bounds)")
    for name, v in (("lower", lo), ("upper", hi)):
        bad = ~np.isfinite(v)
        if bad.any():
            i = int(np.argmax(bad))
            raise VnnlibError(f"input {i} has {name} bound {float(v[i])!r}; the bounds must be finite numbers")
    if np.any(lo > hi):
        i = int(np.argmax(lo > hi))
        raise VnnlibError(f"empty input box: input {i} has lower bound {float(lo[i])!r} > upper bound {float(hi[i])!r}")
    return lo, hi


@dataclass
class Property:
    """An input box and the violation condition as a DNF of linear constraints over Y.

    lower, upper: (d,) float64 input bounds (flattened C-order, X_i order); refused (VnnlibError)
        unless of one shape, finite, and lower <= upper.
    disjuncts: list of conjunctions, each a list of :class:`Constraint` (at least one disjunct).
    num_outputs: K, the number of declared outputs.
    matrices: per disjunct d, (A_d (m_d, K), b_d (m_d,)) float64 (views into ``rows``/``offsets``).
    rows, offsets, owner: all disjuncts' constraints stacked: (R, K), (R,), and (R,) the disjunct
        each row belongs to.
    """

    lower: np.ndarray
    upper: np.ndarray
    disjuncts: List[List[Constraint]]
    num_outputs: int
    source: str = ""
    matrices: List[Tuple[np.ndarray, np.ndarray]] = field(default_factory=list, repr=False)
    rows: np.ndarray = field(init=False, repr=False)
    offsets: np.ndarray = field(init=False, repr=False)
    owner: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.lower, self.upper = _box(self.lower, self.upper)
        k = self.num_outputs
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise VnnlibError(f"num_outputs must be a positive integer, got {k!r}")
        self.num_outputs = k = int(k)
        self.disjuncts = [list(c) for c in self.disjuncts]
        if not self.disjuncts:
            raise VnnlibError("the property has no disjuncts (an empty specification): there is nothing to verify")
        lens = np.fromiter((len(c) for c in self.disjuncts), dtype=np.int64, count=len(self.disjuncts))
        n = int(lens.sum())
        check_size(len(self.disjuncts), n, k)
        cons = [c for conj in self.disjuncts for c in conj]
        r_idx, c_idx, vals = [], [], []
        for r, c in enumerate(cons):
            r_idx.extend([r] * len(c.a))
            c_idx.extend(c.a)
            vals.extend(c.a.values())
        try:
            c_idx = np.asarray(c_idx) if c_idx else np.zeros(0, dtype=np.int64)
            vals = np.asarray(vals, dtype=np.float64)
            b = np.fromiter((c.b for c in cons), dtype=np.float64, count=n)
        except (TypeError, ValueError, OverflowError) as e:
            raise VnnlibError(f"constraint coefficients must be numbers over output indices ({e})") from None
        if c_idx.dtype.kind not in "iu":
            raise VnnlibError(f"constraint coefficients must be keyed by output indices (int), got {c_idx.dtype}")
        if c_idx.size and (c_idx.min() < 0 or c_idx.max() >= k):
            j = int(c_idx[(c_idx < 0) | (c_idx >= k)][0])
            raise VnnlibError(f"a constraint refers to output Y_{j} but the property has {k} outputs")
        if not (np.isfinite(vals).all() and np.isfinite(b).all()):
            raise VnnlibError("a constraint has a coefficient or bound that is not a finite number")
        A = np.zeros((n, k))
        np.add.at(A, (np.asarray(r_idx, dtype=np.int64), c_idx), vals)
        self.rows, self.offsets = A, b
        self.owner = np.repeat(np.arange(len(lens)), lens)
        ends = np.cumsum(lens).tolist()
        self.matrices = [(A[s:e], b[s:e]) for s, e in zip([0] + ends[:-1], ends)]

    def margins(self, y: np.ndarray) -> List[np.ndarray]:
        """Per disjunct, (..., m_d) margins g = A y − b of outputs y (..., K) (float64)."""
        y = np.asarray(y, dtype=np.float64)
        return [y @ A.T - b for A, b in self.matrices]

    def violated_by(self, y: np.ndarray) -> bool:
        """Whether the outputs y (K,) satisfy some disjunct (every conjunct's margin <= 0)."""
        g = np.asarray(y, dtype=np.float64).reshape(-1) @ self.rows.T - self.offsets
        broken = np.zeros(len(self.disjuncts), dtype=bool)
        np.logical_or.at(broken, self.owner, ~(g <= 0))
        return bool((~broken).any())

    def contains(self, x: np.ndarray) -> bool:
        """Whether the point x (d,) lies in the box (compared in float64)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        return x.shape == self.lower.shape and bool(np.all(x >= self.lower) and np.all(x <= self.upper))


def robustness_property(lower: np.ndarray, upper: np.ndarray, label: int, num_classes: int) -> Property:
    """The local-robustness violation ``OR_{j≠y} Y_j >= Y_y`` on the box [lower, upper] (any shape, flattened).

    Raises VnnlibError (one line) for a bad box (see :class:`Property`), fewer than 2 classes or a
    label out of range.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise VnnlibError(f"robustness needs at least 2 classes, got num_classes={num_classes!r}")
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < num_classes:
        raise VnnlibError(f"label {label!r} out of range for {num_classes} classes")
    label, num_classes = int(label), int(num_classes)
    disjuncts = [[Constraint({label: 1.0, j: -1.0}, 0.0, f"(>= Y_{j} Y_{label})", 0, (j, label))]
                 for j in range(num_classes) if j != label]
    return Property(lower, upper, disjuncts, num_classes, source=f"robustness of class {label}")


def matrix_property(lower: np.ndarray, upper: np.ndarray, C: np.ndarray) -> Property:
    """The property ``C y > 0`` (each row of C (S, K) must stay positive): violation ``OR_i C_i · y <= 0``.

    Raises VnnlibError (one line) for a bad box, or a C that is not a finite, non-empty 2-D matrix.
    """
    try:
        C = np.asarray(C, dtype=np.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise VnnlibError(f"the specification matrix C must be numbers ({str(e).splitlines()[0]})") from None
    if C.ndim != 2 or C.shape[0] == 0 or C.shape[1] == 0:
        raise VnnlibError(f"the specification matrix C must be 2-D (S, K) with S, K >= 1, got shape {C.shape}")
    if not np.isfinite(C).all():
        raise VnnlibError("the specification matrix C has entries that are NaN or infinite")
    disjuncts = [[Constraint({j: float(v) for j, v in enumerate(row) if v != 0.0}, 0.0, f"row {i} of C", 0)]
                 for i, row in enumerate(C)]
    return Property(lower, upper, disjuncts, C.shape[1], source="C y > 0")




__all__ = ["MAX_CELLS", "MAX_CONSTRAINTS", "Constraint", "Property", "check_size", "matrix_property",
           "robustness_property", "size_problem"]
