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

Guards, so that a hostile file fails fast with one line instead of exhausting time or memory:
nesting deeper than :data:`MAX_DEPTH`; a DNF of more than :data:`MAX_CONSTRAINTS` constraints
in all once the output assertions are multiplied out (checked before building it), or whose
matrices would hold more than :data:`MAX_CELLS` numbers; given the network's sizes, any
declaration beyond them (checked as the file streams by); and an optional deadline
(:class:`ParseTimeout`). All errors are :class:`VnnlibError` (a CertkdError and a ValueError).
"""
from __future__ import annotations

import math
import os
import re
from typing import Dict, Iterable, List, Optional, Tuple, Union

import numpy as np

from certkd.verification.vnnlib_property import (MAX_CELLS, MAX_CONSTRAINTS, Constraint, Property, check_size,
                                                 matrix_property, robustness_property, size_problem)
from certkd.verification.vnnlib_sexpr import (MAX_DEPTH, Node, ParseTimeout, SList, VnnlibError, check_deadline,
                                              iter_forms, mentions, node_text, parse_sexprs, text_lines)

PathLike = Union[str, os.PathLike]

_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_VAR = re.compile(r"([XY])_(0|[1-9]\d*)")


# ------------------------------------------------------------------------------------ reader

class _Reader:
    """State while reading one file: declarations, input bounds and the output assertions so far."""

    def __init__(self, where: str, num_inputs: Optional[int], num_outputs: Optional[int],
                 deadline: Optional[float]):
        self.where = where
        self.limit = {"X": num_inputs, "Y": num_outputs}
        self.deadline = deadline
        self.declared: Dict[str, set] = {"X": set(), "Y": set()}
        self.lower: Dict[int, float] = {}
        self.upper: Dict[int, float] = {}
        self.outputs: Dict[str, int] = {}                  # declared output name -> index
        self.asserts: List[List[List[Constraint]]] = []   # per output assertion, its disjuncts
        self.n_disjuncts, self.n_constraints = 1, 0        # of the DNF once multiplied out
        self.line = 0                                      # of the list being read, for atoms' errors

    def fail(self, node, msg: str):
        raise VnnlibError(f"{self.where}:{getattr(node, 'line', self.line)}: {msg}")

    # atoms -----------------------------------------------------------------------------------
    def var(self, tok) -> Optional[Tuple[str, int]]:
        if isinstance(tok, SList):
            return None
        m = _VAR.fullmatch(tok)
        if m is None:
            return None
        kind, idx = m.group(1), int(m.group(2))
        if idx not in self.declared[kind]:
            self.fail(tok, f"variable {tok} is used before it is declared")
        return kind, idx

    def number(self, tok) -> Optional[float]:
        if isinstance(tok, SList) or _NUMBER.fullmatch(tok) is None:
            return None
        v = float(tok)
        if not math.isfinite(v):
            self.fail(tok, f"number {tok} is out of range")
        return v

    def comparison(self, node) -> Tuple[str, Node, Node]:
        if not isinstance(node, SList) or not node:
            self.fail(node, f"expected a comparison, got {node_text(node)}")
        self.line = node.line
        op = node[0]
        if isinstance(op, SList) or op not in ("<=", ">="):
            self.fail(node, f"unknown or unsupported operator {node_text(op)!r} (expected <= or >=)")
        if len(node) != 3:
            self.fail(node, f"'{op}' takes exactly 2 arguments, got {len(node) - 1}")
        return op, node[1], node[2]

    # inputs ----------------------------------------------------------------------------------
    def input_bound(self, node) -> None:
        op, a, b = self.comparison(node)
        va, vb, na, nb = self.var(a), self.var(b), self.number(a), self.number(b)
        if va is not None and va[0] == "X" and nb is not None:
            idx, value, is_upper = va[1], nb, op == "<="
        elif vb is not None and vb[0] == "X" and na is not None:
            idx, value, is_upper = vb[1], na, op == ">="
        else:
            self.fail(node, f"expected an input bound (X_i against a number), got {node_text(node)}")
        target = self.upper if is_upper else self.lower
        if idx in target:
            self.fail(node, f"X_{idx} has two {'upper' if is_upper else 'lower'} bounds")
        target[idx] = value

    def input_assert(self, body: SList) -> None:
        if body[0] == "and":
            if len(body) < 2:
                self.fail(body, "empty (and)")
            for c in body[1:]:
                self.input_bound(c)
        else:
            self.input_bound(body)

    # outputs ---------------------------------------------------------------------------------
    def linear(self, node) -> Tuple[Dict[int, float], float]:
        """A linear expression over Y: ({j: coefficient}, constant). Recursion is bounded by MAX_DEPTH."""
        if node.__class__ is str and node in self.outputs:   # fast path: a declared Y_j
            return {self.outputs[node]: 1.0}, 0.0
        n = self.number(node)
        if n is not None:
            return {}, n
        v = self.var(node)
        if v is not None:
            if v[0] != "Y":
                self.fail(node, f"input {node} in an output constraint")
            return {v[1]: 1.0}, 0.0
        if not isinstance(node, SList) or not node or isinstance(node[0], SList) or node[0] not in ("+", "-", "*") \
                or len(node) < 2:
            self.fail(node, f"expected a linear expression over Y, got {node_text(node)}")
        self.line = node.line
        parts = [self.linear(c) for c in node[1:]]
        op = node[0]
        if op == "*":
            consts = [p for p in parts if not p[0]]
            if len(parts) != 2 or not consts:
                self.fail(node, f"(*) needs a number and an expression, got {node_text(node)}")
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
        line = node.line
        (ca, ka), (cb, kb) = self.linear(a), self.linear(b)
        lo, hi = ((cb, kb), (ca, ka)) if op == ">=" else ((ca, ka), (cb, kb))   # a >= b  <=>  b − a <= 0
        coef = dict(lo[0])
        for j, v in hi[0].items():
            coef[j] = coef.get(j, 0.0) - v
        coef = {j: v for j, v in coef.items() if v != 0.0}
        if not coef:
            self.fail(node, f"output constraint {node_text(node)} does not depend on Y")
        if not all(math.isfinite(v) for v in coef.values()) or not math.isfinite(hi[1] - lo[1]):
            self.fail(node, f"output constraint {node_text(node)} overflows float64")
        pair = None
        if not isinstance(a, SList) and not isinstance(b, SList) and a[:2] == b[:2] == "Y_":
            ja, jb = int(a[2:]), int(b[2:])
            pair = (ja, jb) if op == ">=" else (jb, ja)
        return Constraint(coef, hi[1] - lo[1], node_text(node), line, pair)

    def conjunction(self, node) -> List[Constraint]:
        if isinstance(node, SList) and node and node[0] == "and":
            if len(node) < 2:
                self.fail(node, "empty (and)")
            return [self.output_constraint(c) for c in node[1:]]
        return [self.output_constraint(node)]

    def output_assert(self, body: SList) -> None:
        if body[0] == "or" and len(body) < 2:
            self.fail(body, "empty (or)")
        branches = body[1:] if body[0] == "or" else [body]
        # the size once conjoined with the DNF so far (every old disjunct pairs with every new one),
        # counted from the tree and checked before any constraint is built
        total = sum(len(c) - 1 if isinstance(c, SList) and c and c[0] == "and" else 1 for c in branches)
        n_d = self.n_disjuncts * len(branches)
        n_c = self.n_constraints * len(branches) + self.n_disjuncts * total
        m = len(self.asserts) + 1
        why = size_problem(n_d, n_c, max(len(self.declared["Y"]), 1),
                           "the output condition" if m == 1 else f"output assertions 1 to {m} (conjoined)")
        if why is not None:
            self.fail(body, why)
        disjuncts = []
        for i, c in enumerate(branches):
            if i % 1024 == 1023:
                check_deadline(self.deadline, self.where)
            disjuncts.append(self.conjunction(c))
        self.n_disjuncts, self.n_constraints = n_d, n_c
        self.asserts.append(disjuncts)

    # forms -----------------------------------------------------------------------------------
    def declare(self, form: SList) -> None:
        if len(form) != 3 or isinstance(form[1], SList) or isinstance(form[2], SList):
            self.fail(form, "expected (declare-const NAME Real)")
        m = _VAR.fullmatch(form[1])
        if m is None:
            self.fail(form, f"unsupported variable name {node_text(form[1])!r} (expected X_i or Y_j)")
        if form[2] != "Real":
            self.fail(form, f"{form[1]} must be declared Real, got {node_text(form[2])!r}")
        kind, idx = m.group(1), int(m.group(2))
        limit = self.limit[kind]
        if limit is not None and idx >= limit:
            self.fail(form, f"declares {form[1]} but the network has {limit} {'inputs' if kind == 'X' else 'outputs'} "
                            f"({kind}_0..{kind}_{limit - 1})")
        if idx in self.declared[kind]:
            self.fail(form, f"{form[1]} is declared twice")
        self.declared[kind].add(idx)
        if kind == "Y":
            self.outputs[form[1]] = idx

    def assertion(self, form: SList) -> None:
        if len(form) != 2 or not isinstance(form[1], SList) or not form[1]:
            self.fail(form, "expected (assert (OP ...))")
        body = form[1]
        has_x, has_y = mentions(body, "X"), mentions(body, "Y")
        if has_x and has_y:
            self.fail(body, "an assertion mixes inputs X and outputs Y (not supported)")
        if has_x:
            self.input_assert(body)
        elif has_y:
            self.output_assert(body)
        else:
            self.fail(body, "an assertion mentions no variable X_i or Y_j")

    def form(self, form: SList) -> None:
        self.line = form.line
        if not form or isinstance(form[0], SList):
            self.fail(form, "expected (declare-const ...) or (assert ...)")
        if form[0] == "declare-const":
            self.declare(form)
        elif form[0] == "assert":
            self.assertion(form)
        else:
            self.fail(form, f"unknown command {node_text(form[0])!r} (expected declare-const or assert)")

    def result(self) -> Property:
        where = self.where
        for kind, what in (("X", "inputs"), ("Y", "outputs")):
            n = len(self.declared[kind])
            if n == 0:
                raise VnnlibError(f"{where}: no {kind}_ variables declared")
            if max(self.declared[kind]) != n - 1:   # n distinct indices >= 0 with max n - 1 are 0..n-1
                missing = next(i for i in range(n) if i not in self.declared[kind])
                raise VnnlibError(f"{where}: {kind}_ indices must be 0..{n - 1} without gaps "
                                  f"({kind}_{missing} is missing)")
            if self.limit[kind] is not None and n != self.limit[kind]:
                raise VnnlibError(f"{where}: declares {n} {what} {kind}_0..{kind}_{n - 1} but the network has "
                                  f"{self.limit[kind]}")
        d = len(self.declared["X"])
        for name, bounds in (("lower", self.lower), ("upper", self.upper)):
            if len(bounds) != d:
                missing = next(i for i in range(d) if i not in bounds)
                raise VnnlibError(f"{where}: X_{missing} has no {name} bound")
        if not self.asserts:
            raise VnnlibError(f"{where}: no output assertion (the unsafe region over Y) found")
        lo = np.fromiter((self.lower[i] for i in range(d)), dtype=np.float64, count=d)
        hi = np.fromiter((self.upper[i] for i in range(d)), dtype=np.float64, count=d)
        if np.any(lo > hi):
            i = int(np.argmax(lo > hi))
            raise VnnlibError(f"{where}: empty input box, X_{i} has lower bound {float(lo[i])!r} > upper bound {float(hi[i])!r}")
        k = len(self.declared["Y"])
        why = size_problem(self.n_disjuncts, self.n_constraints, k)
        if why is not None:
            raise VnnlibError(f"{where}: {why}")
        # multiplied out within the guard; each list in dnf is its own, so extending is safe (and
        # keeps many one-constraint assertions linear instead of quadratic)
        dnf: List[List[Constraint]] = [[]]
        for disjuncts in self.asserts:
            check_deadline(self.deadline, where)
            if len(disjuncts) == 1:
                for conj in dnf:
                    conj.extend(disjuncts[0])
            else:
                dnf = [a + b for a in dnf for b in disjuncts]
        check_deadline(self.deadline, where)
        try:
            return Property(lo, hi, dnf, k, source=where)
        except VnnlibError as e:
            raise VnnlibError(f"{where}: {e}") from None


def _read(lines: Iterable[str], where: str, num_inputs: Optional[int], num_outputs: Optional[int],
          deadline: Optional[float]) -> Property:
    for name, v in (("num_inputs", num_inputs), ("num_outputs", num_outputs)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
            raise VnnlibError(f"{name} must be a positive integer or None, got {v!r}")
    check_deadline(deadline, where)
    reader = _Reader(where, None if num_inputs is None else int(num_inputs),
                     None if num_outputs is None else int(num_outputs), deadline)
    for n, form in enumerate(iter_forms(lines, where, deadline)):
        if n % 256 == 255:
            check_deadline(deadline, where)
        reader.form(form)
    return reader.result()


def parse_vnnlib(text: str, where: str = "<vnnlib>", num_inputs: Optional[int] = None,
                 num_outputs: Optional[int] = None, deadline: Optional[float] = None) -> Property:
    """Read VNN-LIB text (see the module doc).

    Args:
        num_inputs, num_outputs: the network's sizes, if known: the first declaration of an
            ``X_i``/``Y_j`` beyond them is refused at once, and the counts must match.
        deadline: a ``time.monotonic()`` value; past it, :class:`ParseTimeout`.
    Raises:
        VnnlibError (a CertkdError and a ValueError): ``where:line: reason``, one line.
    """
    return _read(text_lines(text), where, num_inputs, num_outputs, deadline)


def read_property(path: PathLike, num_inputs: Optional[int] = None, num_outputs: Optional[int] = None,
                  deadline: Optional[float] = None) -> Property:
    """Read a VNN-LIB file into a :class:`Property`, streaming it line by line.

    Arguments as :func:`parse_vnnlib`. Raises VnnlibError (one line) on a missing or unreadable
    file and on anything unsupported; :class:`ParseTimeout` past ``deadline``.
    """
    where = str(path)
    try:
        with open(path, "r", encoding="utf-8") as f:
            return _read((line.rstrip("\n") for line in f), where, num_inputs, num_outputs, deadline)
    except FileNotFoundError:
        raise VnnlibError(f"VNN-LIB file not found: {where}") from None
    except IsADirectoryError:
        raise VnnlibError(f"VNN-LIB path is a directory, not a file: {where}") from None
    except UnicodeDecodeError as e:
        raise VnnlibError(f"{where}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise VnnlibError(f"cannot read VNN-LIB file {where}: {e.strerror or e}") from None


__all__ = ["MAX_CELLS", "MAX_CONSTRAINTS", "MAX_DEPTH", "Constraint", "ParseTimeout", "Property", "VnnlibError",
           "check_size", "matrix_property", "parse_sexprs", "parse_vnnlib", "read_property", "robustness_property"]
