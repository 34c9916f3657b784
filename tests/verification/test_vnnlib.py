"""VNN-LIB reader (certkd.verification.vnnlib): published files, linear constraints, DNF semantics."""
import glob
import os
import time

import numpy as np
import pytest

from certkd.verification.vnnlib import matrix_property, parse_vnnlib, read_property, robustness_property

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "vnncomp2021")
FILES = sorted(glob.glob(os.path.join(DATA, "mnistfc", "*.vnnlib")) + glob.glob(os.path.join(DATA, "oval21", "vnnlib", "*.vnnlib")))

HEAD = "".join(f"(declare-const X_{i} Real)\n" for i in range(2)) + "".join(f"(declare-const Y_{i} Real)\n" for i in range(3)) \
    + "(assert (<= X_0 1))\n(assert (>= X_0 0))\n(assert (and (<= X_1 2) (>= X_1 -1)))\n"


@pytest.mark.skipif(not FILES, reason="VNN-COMP 2021 data not present")
def test_published_files_parse_in_seconds():
    worst = 0.0
    for f in FILES:
        t = time.perf_counter()
        prop = read_property(f)
        worst = max(worst, time.perf_counter() - t)
        assert prop.num_outputs == 10 and len(prop.disjuncts) == 9
        assert all(len(c) == 1 and c[0].pair is not None for c in prop.disjuncts)
        assert prop.lower.size in (784, 3072) and np.all(prop.lower <= prop.upper)
    assert worst < 5.0, f"slowest file took {worst:.2f} s"


def test_linear_constraints_and_dnf():
    text = HEAD + "(assert (or (and (>= Y_0 Y_1) (<= (+ Y_2 (* 2 Y_1)) 3)) (and (>= (- Y_0 0.5) Y_2))))\n"
    p = parse_vnnlib(text)
    assert p.lower.tolist() == [0, -1] and p.upper.tolist() == [1, 2]
    (A0, b0), (A1, b1) = p.matrices
    # Y_0 >= Y_1  <=>  Y_1 - Y_0 <= 0 ;  Y_2 + 2 Y_1 <= 3 ;  Y_0 - 0.5 >= Y_2 <=> Y_2 - Y_0 <= -0.5
    assert A0.tolist() == [[-1, 1, 0], [0, 2, 1]] and b0.tolist() == [0, 3]
    assert A1.tolist() == [[-1, 0, 1]] and b1.tolist() == [-0.5]
    assert p.violated_by(np.array([2.0, 1.0, 0.5]))       # first disjunct: both conjuncts hold
    assert not p.violated_by(np.array([0.0, 1.0, 0.0]))   # Y_0 < Y_1, and Y_0 - 0.5 < Y_2
    assert p.violated_by(np.array([1.0, 5.0, 0.0]))       # second disjunct only
    assert p.contains(np.array([0.5, 2.0])) and not p.contains(np.array([0.5, 2.1]))


def test_several_output_asserts_are_conjoined():
    p = parse_vnnlib(HEAD + "(assert (or (>= Y_1 Y_0) (>= Y_2 Y_0)))\n(assert (<= Y_0 1))\n")
    assert [len(c) for c in p.disjuncts] == [2, 2]


@pytest.mark.parametrize("body,fragment", [
    ("(assert (>= Y_1 X_0))", "mixes inputs X and outputs Y"),
    ("(assert (> Y_1 Y_0))", "unknown or unsupported operator"),
    ("(assert (or (or (>= Y_1 Y_0))))", "unknown or unsupported operator"),
    ("(assert (>= (* Y_1 Y_0) 0))", "needs a number"),
    ("(assert (>= Y_1 Y_1))", "does not depend on Y"),
])
def test_refused_clearly(body, fragment):
    with pytest.raises(ValueError) as e:
        parse_vnnlib(HEAD + body + "\n", "p.vnnlib")
    assert fragment in str(e.value) and str(e.value).startswith("p.vnnlib:")


def test_robustness_and_matrix_properties():
    p = robustness_property(np.zeros(2), np.ones(2), 1, 3)
    assert p.violated_by(np.array([1.0, 1.0, 0.0])) and not p.violated_by(np.array([0.0, 1.0, 0.5]))
    m = matrix_property(np.zeros(2), np.ones(2), np.array([[0.0, 1.0, -1.0], [0.0, 1.0, 0.0]]))
    assert not m.violated_by(np.array([0.0, 1.0, 0.5])) and m.violated_by(np.array([0.0, 1.0, 1.0]))
