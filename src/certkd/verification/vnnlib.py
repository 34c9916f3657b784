"""VNN-LIB properties: a strict reader and the property they state (``docs/verify_onnx.md``).

A VNN-LIB file states the *violation* of a property: an input box over ``X_0..X_{d-1}`` and an
output condition over ``Y_0..Y_{K-1}``; ``sat`` means some input in the box satisfies the
condition (a counterexample), ``unsat`` that none does (the property holds).

The output condition is read as a disjunction of conjunctions of linear constraints (DNF)::

    violated(y)  <=>  OR_d  AND_k  a_{d,k} · y <= b_{d,k}

Each atomic comparison is normalised to ``a · y <= b``; its *margin* is ``g(y) = a·y − b``:
the constraint holds iff ``g <= 0``. To prove ``unsat`` every disjunct must be refuted on the
whole box; a conjunction holds at x only if all its conjuncts hold at the *same* x, so a
disjunct is refuted as soon as one of its conjuncts is violated everywhere: ``min_x g > 0`` for
some k (a lower bound of ``g_{d,k}(f(x))`` over the box that is > 0 suffices). That is sound
(if incomplete: the conjuncts could each be satisfiable, but never jointly).

Accepted: ``(declare-const X_i Real)`` / ``(declare-const Y_j Real)`` (indices 0..n−1, once
each); input bounds ``(<= X_i c)`` / ``(>= X_i c)`` (either order, or several in one ``and``),
exactly one lower and one upper bound per input; output assertions of comparisons ``<=`` /
``>=`` between linear expressions over Y (numbers, ``Y_j``, ``+``, ``-``, ``*`` by a number),
conjunctions ``(and ...)`` and one ``(or ...)`` of them. Several output assertions are
conjoined (distributed into one DNF). Anything else is refused with ``file:line: reason``.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

PathLike = Union[str, os.PathLike]

_TOKEN = re.compile(r"\(|\)|[^\s();]+")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_VAR = re.compile(r"([XY])_(0|[1-9]\d*)")


# ------------------------------------------------------------------------------------ s-expressions

class _Atom(str):
    """A token with the line it came from."""

    line: int

    def __new__(cls, text: str, line: int):
        obj = super().__new__(cls, text)
        obj.line = line
        return obj


class _List(list):
    line: int


def tokenise(text: str, where: str) -> List[_Atom]:
    """The tokens of ``text`` (comments dropped), each with its line number (line by line: fast)."""
    tokens: List[_Atom] = []
    for line, chunk in enumerate(text.split("\n"), 1):
        cut = chunk.find(";")
        if cut >= 0:
            chunk = chunk[:cut]
        tokens.extend(_Atom(tok, line) for tok in _TOKEN.findall(chunk))
    return tokens


def parse_sexprs(tokens: List[_Atom], where: str) -> List[_List]:
    """Nested lists of the top-level forms."""
    stack: List[_List] = []
    top: List[Any] = []
    for tok in tokens:
        if tok == "(":
            new = _List()
            new.line = tok.line
            stack.append(new)
        elif tok == ")":
            if not stack:
                raise ValueError(f"{where}:{tok.line}: unmatched ')'")
            done = stack.pop()
            (stack[-1] if stack else top).append(done)
        else:
            if not stack:
                raise ValueError(f"{where}:{tok.line}: {tok!r} outside of parentheses")
            stack[-1].append(tok)
    if stack:
        raise ValueError(f"{where}:{stack[-1].line}: '(' is never closed")
    return top


def _text(node) -> str:
    return f"({' '.join(_text(c) for c in node)})" if isinstance(node, list) else str(node)


# ------------------------------------------------------------------------------------ the property

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


@dataclass
class Property:
    """An input box and the violation condition as a DNF of linear constraints over Y.

    lower, upper: (d,) float64 input bounds (flattened C-order, X_i order).
    disjuncts: list of conjunctions, each a list of :class:`Constraint`.
    num_outputs: K, the number of declared outputs.
    """

    lower: np.ndarray
    upper: np.ndarray
    disjuncts: List[List[Constraint]]
    num_outputs: int
    source: str = ""
    matrices: List[Tuple[np.ndarray, np.ndarray]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.matrices = []
        for conj in self.disjuncts:
            A = np.zeros((len(conj), self.num_outputs))
            for i, c in enumerate(conj):
                for j, v in c.a.items():
                    A[i, j] += v
            self.matrices.append((A, np.array([c.b for c in conj], dtype=np.float64)))

    def margins(self, y: np.ndarray) -> List[np.ndarray]:
        """Per disjunct, (..., m_d) margins g = A y − b of outputs y (..., K) (float64)."""
        y = np.asarray(y, dtype=np.float64)
        return [y @ A.T - b for A, b in self.matrices]

    def violated_by(self, y: np.ndarray) -> bool:
        """Whether the outputs y (K,) satisfy some disjunct (every conjunct's margin <= 0)."""
        return any(bool(np.all(g <= 0)) for g in self.margins(np.asarray(y).reshape(-1)))

    def contains(self, x: np.ndarray) -> bool:
        """Whether the point x (d,) lies in the box (compared in float64)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        return x.shape == self.lower.shape and bool(np.all(x >= self.lower) and np.all(x <= self.upper))


# ------------------------------------------------------------------------------------ reader

class _Reader:
    """State while reading one file: declarations, input bounds and the DNF so far."""

    def __init__(self, where: str):
        self.where = where
        self.declared: Dict[str, set] = {"X": set(), "Y": set()}
        self.lower: Dict[int, float] = {}
        self.upper: Dict[int, float] = {}
        self.dnf: List[List[Constraint]] = [[]]
        self.n_output_asserts = 0

    def fail(self, node, msg: str):
        raise ValueError(f"{self.where}:{getattr(node, 'line', '?')}: {msg}")

    # atoms -----------------------------------------------------------------------------------
    def var(self, tok) -> Optional[Tuple[str, int]]:
        if isinstance(tok, _List):
            return None
        m = _VAR.fullmatch(tok)
        if m is None:
            return None
        kind, idx = m.group(1), int(m.group(2))
        if idx not in self.declared[kind]:
            self.fail(tok, f"variable {tok} is used before it is declared")
        return kind, idx

    def number(self, tok) -> Optional[float]:
        if isinstance(tok, _List) or _NUMBER.fullmatch(tok) is None:
            return None
        v = float(tok)
        if not math.isfinite(v):
            self.fail(tok, f"number {tok} is out of range")
        return v

    def comparison(self, node) -> Tuple[str, Any, Any]:
        if not isinstance(node, _List) or not node:
            self.fail(node, f"expected a comparison, got {node!r}")
        op = node[0]
        if isinstance(op, _List) or op not in ("<=", ">="):
            self.fail(node, f"unknown or unsupported operator {op!r} (expected <= or >=)")
        if len(node) != 3:
            self.fail(node, f"'{op}' takes exactly 2 arguments, got {len(node) - 1}")
        return op, node[1], node[2]

    @staticmethod
    def mentions(node, kind: str) -> bool:
        if isinstance(node, _List):
            return any(_Reader.mentions(c, kind) for c in node)
        m = _VAR.fullmatch(node)
        return m is not None and m.group(1) == kind

    # inputs ----------------------------------------------------------------------------------
    def input_bound(self, node) -> None:
        op, a, b = self.comparison(node)
        va, vb, na, nb = self.var(a), self.var(b), self.number(a), self.number(b)
        if va is not None and va[0] == "X" and nb is not None:
            idx, value, is_upper = va[1], nb, op == "<="
        elif vb is not None and vb[0] == "X" and na is not None:
            idx, value, is_upper = vb[1], na, op == ">="
        else:
            self.fail(node, f"expected an input bound (X_i against a number), got ({op} {_text(a)} {_text(b)})")
        target = self.upper if is_upper else self.lower
        if idx in target:
            self.fail(node, f"X_{idx} has two {'upper' if is_upper else 'lower'} bounds")
        target[idx] = value

    def input_assert(self, body) -> None:
        if body[0] == "and":
            if len(body) < 2:
                self.fail(body, "empty (and)")
            for c in body[1:]:
                self.input_bound(c)
        else:
            self.input_bound(body)

    # outputs ---------------------------------------------------------------------------------
    def linear(self, node) -> Tuple[Dict[int, float], float]:
        """A linear expression over Y: ({j: coefficient}, constant)."""
        v, n = self.var(node), self.number(node)
        if n is not None:
            return {}, n
        if v is not None:
            if v[0] != "Y":
                self.fail(node, f"input {node} in an output constraint")
            return {v[1]: 1.0}, 0.0
        if not isinstance(node, _List) or not node or isinstance(node[0], _List) or node[0] not in ("+", "-", "*") \
                or len(node) < 2:
            self.fail(node, f"expected a linear expression over Y, got {_text(node)}")
        parts = [self.linear(c) for c in node[1:]]
        op = node[0]
        if op == "*":
            consts = [p for p in parts if not p[0]]
            if len(parts) != 2 or not consts:
                self.fail(node, f"(*) needs a number and an expression, got {_text(node)}")
            (coef, const), k = (parts[1], parts[0][1]) if not parts[0][0] else (parts[0], parts[1][1])
            return {j: c * k for j, c in coef.items()}, const * k
        sign = [1.0] + [(-1.0 if op == "-" else 1.0)] * (len(parts) - 1)
        if op == "-" and len(parts) == 1:
            sign = [-1.0]
        out: Dict[int, float] = {}
        const = 0.0
        for s, (coef, c) in zip(sign, parts):
            for j, v in coef.items():
                out[j] = out.get(j, 0.0) + s * v
            const += s * c
        return out, const

    def output_constraint(self, node) -> Constraint:
        op, a, b = self.comparison(node)
        (ca, ka), (cb, kb) = self.linear(a), self.linear(b)
        lo, hi = (ca, ka), (cb, kb)
        if op == ">=":  # a >= b  <=>  b − a <= 0
            lo, hi = hi, lo
        coef = dict(lo[0])
        for j, v in hi[0].items():
            coef[j] = coef.get(j, 0.0) - v
        coef = {j: v for j, v in coef.items() if v != 0.0}
        if not coef:
            self.fail(node, f"output constraint {_text(node)} does not depend on Y")
        pair = None
        va, vb = self.var(a), self.var(b)
        if va is not None and vb is not None and va[0] == vb[0] == "Y":
            pair = (va[1], vb[1]) if op == ">=" else (vb[1], va[1])
        return Constraint(coef, hi[1] - lo[1], _text(node), getattr(node, "line", 0), pair)

    def conjunction(self, node) -> List[Constraint]:
        if isinstance(node, _List) and node and node[0] == "and":
            if len(node) < 2:
                self.fail(node, "empty (and)")
            return [self.output_constraint(c) for c in node[1:]]
        return [self.output_constraint(node)]

    def output_assert(self, body) -> None:
        self.n_output_asserts += 1
        if body[0] == "or":
            if len(body) < 2:
                self.fail(body, "empty (or)")
            disjuncts = [self.conjunction(c) for c in body[1:]]
        else:
            disjuncts = [self.conjunction(body)]
        self.dnf = [a + b for a in self.dnf for b in disjuncts]

    # forms -----------------------------------------------------------------------------------
    def declare(self, form) -> None:
        if len(form) != 3 or isinstance(form[1], _List) or isinstance(form[2], _List):
            self.fail(form, "expected (declare-const NAME Real)")
        m = _VAR.fullmatch(form[1])
        if m is None:
            self.fail(form, f"unsupported variable name {form[1]!r} (expected X_i or Y_j)")
        if form[2] != "Real":
            self.fail(form, f"{form[1]} must be declared Real, got {form[2]!r}")
        kind, idx = m.group(1), int(m.group(2))
        if idx in self.declared[kind]:
            self.fail(form, f"{form[1]} is declared twice")
        self.declared[kind].add(idx)

    def assertion(self, form) -> None:
        if len(form) != 2 or not isinstance(form[1], _List) or not form[1]:
            self.fail(form, "expected (assert (OP ...))")
        body = form[1]
        has_x, has_y = self.mentions(body, "X"), self.mentions(body, "Y")
        if has_x and has_y:
            self.fail(body, "an assertion mixes inputs X and outputs Y (not supported)")
        if has_x:
            self.input_assert(body)
        elif has_y:
            self.output_assert(body)
        else:
            self.fail(body, "an assertion mentions no variable X_i or Y_j")

    def form(self, form) -> None:
        if not isinstance(form, _List) or not form or isinstance(form[0], _List):
            self.fail(form, "expected (declare-const ...) or (assert ...)")
        if form[0] == "declare-const":
            self.declare(form)
        elif form[0] == "assert":
            self.assertion(form)
        else:
            self.fail(form, f"unknown command {form[0]!r} (expected declare-const or assert)")

    def result(self) -> Property:
        where = self.where
        for kind in ("X", "Y"):
            n = len(self.declared[kind])
            if n == 0:
                raise ValueError(f"{where}: no {kind}_ variables declared")
            if self.declared[kind] != set(range(n)):
                missing = min(set(range(n)) - self.declared[kind])
                raise ValueError(f"{where}: {kind}_ indices must be 0..{n - 1} without gaps "
                                 f"({kind}_{missing} is missing)")
        d = len(self.declared["X"])
        for name, bounds in (("lower", self.lower), ("upper", self.upper)):
            if len(bounds) != d:
                missing = min(set(range(d)) - set(bounds))
                raise ValueError(f"{where}: X_{missing} has no {name} bound")
        if self.n_output_asserts == 0:
            raise ValueError(f"{where}: no output assertion (the unsafe region over Y) found")
        lo = np.array([self.lower[i] for i in range(d)], dtype=np.float64)
        hi = np.array([self.upper[i] for i in range(d)], dtype=np.float64)
        if np.any(lo > hi):
            i = int(np.argmax(lo > hi))
            raise ValueError(f"{where}: empty input box, X_{i} has lower bound {lo[i]!r} > upper bound {hi[i]!r}")
        return Property(lo, hi, self.dnf, len(self.declared["Y"]), source=where)


def parse_vnnlib(text: str, where: str = "<vnnlib>") -> Property:
    """Read VNN-LIB text (see the module doc). Raises ValueError ``where:line: reason``."""
    reader = _Reader(where)
    for form in parse_sexprs(tokenise(text, where), where):
        reader.form(form)
    return reader.result()


def read_property(path: PathLike) -> Property:
    """Read a VNN-LIB file into a :class:`Property`. Raises ValueError on anything unsupported."""
    where = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text ({e})") from None
    return parse_vnnlib(text, where)


def robustness_property(lower: np.ndarray, upper: np.ndarray, label: int, num_classes: int) -> Property:
    """The local-robustness violation ``OR_{j≠y} Y_j >= Y_y`` on the box [lower, upper] (flat)."""
    disjuncts = [[Constraint({label: 1.0, j: -1.0}, 0.0, f"(>= Y_{j} Y_{label})", 0, (j, label))]
                 for j in range(num_classes) if j != label]
    return Property(np.asarray(lower, np.float64).reshape(-1), np.asarray(upper, np.float64).reshape(-1),
                    disjuncts, num_classes, source=f"robustness of class {label}")


def matrix_property(lower: np.ndarray, upper: np.ndarray, C: np.ndarray) -> Property:
    """The property ``C y > 0`` (each row must stay positive): violation ``OR_i C_i · y <= 0``."""
    C = np.asarray(C, dtype=np.float64)
    disjuncts = [[Constraint({j: float(v) for j, v in enumerate(row) if v != 0.0}, 0.0, f"row {i} of C", 0)]
                 for i, row in enumerate(C)]
    return Property(np.asarray(lower, np.float64).reshape(-1), np.asarray(upper, np.float64).reshape(-1),
                    disjuncts, C.shape[1], source="C y > 0")


__all__ = ["Constraint", "Property", "matrix_property", "parse_sexprs", "parse_vnnlib", "read_property",
           "robustness_property", "tokenise"]
