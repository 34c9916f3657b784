"""Hostile VNN-LIB files and property arguments (issue #19): one-line CertkdErrors, bounded time and memory."""
import time
import tracemalloc

import numpy as np
import pytest

from certkd.errors import CertkdError
from certkd.verification.vnnlib import (MAX_CONSTRAINTS, Constraint, ParseTimeout, Property, matrix_property,
                                        parse_vnnlib, read_property, robustness_property)

HEAD = "".join(f"(declare-const X_{i} Real)\n" for i in range(2)) + "".join(f"(declare-const Y_{i} Real)\n" for i in range(3)) \
    + "(assert (<= X_0 1))\n(assert (>= X_0 0))\n(assert (and (<= X_1 2) (>= X_1 -1)))\n"


def _one_line_error(call, fragment: str, exc=CertkdError) -> str:
    with pytest.raises(exc) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg and fragment in msg, msg
    return msg


def _timed(call):
    """(result, CPU seconds of this process): CPU time, not wall time, so that other jobs on the machine
    do not count (the limits below are about the parser's own work)."""
    t = time.process_time()
    out = call()
    return out, time.process_time() - t


def _peak_mb(call) -> float:
    tracemalloc.start()
    try:
        try:
            call()
        except (CertkdError, ValueError):   # the error is checked elsewhere; here only the memory
            pass
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


# 1. nesting ---------------------------------------------------------------------------------------

def test_nesting_400_deep_is_a_one_line_error(tmp_path):
    """Used to raise RecursionError."""
    path = tmp_path / "deep.vnnlib"
    path.write_text(HEAD + "(assert " + "(and " * 400 + "(>= Y_0 Y_1)" + ")" * 400 + ")\n")
    msg = _one_line_error(lambda: read_property(path), "nested more than 100 levels")
    assert msg.startswith(f"{path}:9: ")
    # the error goes through a deep walk nowhere: 100 000 levels cost no more
    _one_line_error(lambda: parse_vnnlib(HEAD + "(assert " + "(" * 100_000 + ")" * 100_001, "d"), "nested")


def test_nesting_up_to_the_bound_is_read_exactly():
    """100 levels in all are read (98 negations of Y_0 inside (assert (>= ...))); 101 are refused."""
    def text(n):
        return HEAD + "(assert (>= " + "(- " * n + "Y_0" + ")" * n + " 1))\n"
    p = parse_vnnlib(text(98))
    (A, b), = p.matrices
    assert A.tolist() == [[-1.0, 0.0, 0.0]] and b.tolist() == [-1.0]   # Y_0 >= 1  <=>  -Y_0 <= -1
    _one_line_error(lambda: parse_vnnlib(text(99), "p"), "p:9: parentheses nested more than 100 levels deep")


# 2. disjunctions --------------------------------------------------------------------------------------

def _ors(n):
    return HEAD + "(assert (or (>= Y_0 Y_1) (>= Y_2 Y_1)))\n" * n


def test_multiplied_out_disjunctions_past_the_guard_fail_fast():
    """16 assertions (or a b) used to take 18 s and 800 MB (65,536 disjuncts), 24 never finished."""
    for n in (16, 24, 200):
        (msg, dt) = _timed(lambda: _one_line_error(lambda: parse_vnnlib(_ors(n), "p"), "multiplied out is"))
        assert dt < 1.0, dt
        assert f"limit of {MAX_CONSTRAINTS:,} constraints" in msg and "8,192 disjuncts with 106,496 constraints" in msg
        assert msg.startswith("p:21: output assertions 1 to 13")
    assert _peak_mb(lambda: parse_vnnlib(_ors(24), "p")) < 5


@pytest.mark.parametrize("op", ["or", "and"])
def test_one_assertion_past_the_guard_is_refused_before_building_it(op):
    n = MAX_CONSTRAINTS + 1
    text = HEAD + f"(assert ({op} " + " ".join(f"(>= Y_0 {i})" for i in range(n)) + "))\n"
    msg = _one_line_error(lambda: parse_vnnlib(text, "p"), "p:9: the output condition multiplied out is ")
    assert f"{n:,} constraints in all" in msg and f"limit of {MAX_CONSTRAINTS:,} constraints" in msg


def test_disjunctions_within_the_guard_are_multiplied_out_exactly():
    p = parse_vnnlib(_ors(12))
    assert len(p.disjuncts) == 4096 and p.rows.shape == (12 * 4096, 3)
    # disjunct 1 takes the first choice in assertions 1..11 and the second in assertion 12
    A, b = p.matrices[1]
    assert A.tolist() == [[-1.0, 1.0, 0.0]] * 11 + [[0.0, 1.0, -1.0]] and b.tolist() == [0.0] * 12


def test_one_or_of_20000_disjuncts_is_fast_and_exact(tmp_path):
    """Used to take 11 s end to end; the stacked rows/offsets/owner let callers avoid 20,000 small matrices."""
    path = tmp_path / "wide.vnnlib"
    path.write_text(HEAD + "(assert (or " + " ".join(f"(>= Y_{i % 3} {i})" for i in range(20000)) + "))\n")
    p, dt = _timed(lambda: read_property(path, num_inputs=2, num_outputs=3))
    assert dt < 2.0, dt
    assert len(p.disjuncts) == len(p.matrices) == 20000
    assert p.rows.shape == (20000, 3) and p.owner.tolist() == list(range(20000))
    # Y_j >= i  <=>  -Y_j <= -i
    expected = np.zeros((20000, 3))
    expected[np.arange(20000), np.arange(20000) % 3] = -1.0
    assert np.array_equal(p.rows, expected) and np.array_equal(p.offsets, -np.arange(20000.0))
    A, b = p.matrices[12345]
    assert A.tolist() == [[-1.0, 0.0, 0.0]] and b.tolist() == [-12345.0]
    assert p.violated_by(np.array([0.0, 0.0, 19999.0])) and not p.violated_by(np.array([-1.0, -1.0, -1.0]))


def test_many_single_assertions_stay_linear():
    """20,000 one-constraint assertions conjoin into one disjunct of 20,000 rows without quadratic copying."""
    body = "".join(f"(assert (<= Y_{i % 3} {i}))\n" for i in range(20000))
    p, dt = _timed(lambda: parse_vnnlib(HEAD + body))
    assert dt < 2.0, dt
    assert len(p.disjuncts) == 1 and p.matrices[0][0].shape == (20000, 3)
    assert p.matrices[0][1][-1] == 19999.0


# 3. sizes against the network -------------------------------------------------------------------------

def _declarations(path, n):
    with open(path, "w") as f:
        f.writelines(f"(declare-const X_{i} Real)\n" for i in range(n))
        f.write("(declare-const Y_0 Real)\n(assert (>= Y_0 0))\n")


def test_declarations_beyond_the_network_fail_at_the_first_one(tmp_path):
    """A 30 MB file declaring 10^6 inputs took 27 s and 3.2 GB before its error."""
    path = tmp_path / "big.vnnlib"
    _declarations(path, 10**6)
    assert path.stat().st_size > 25e6
    msg, dt = _timed(lambda: _one_line_error(lambda: read_property(path, num_inputs=784, num_outputs=10),
                                             "declares X_784 but the network has 784 inputs"))
    assert dt < 1.0 and msg.startswith(f"{path}:785: ")
    assert _peak_mb(lambda: read_property(path, num_inputs=784)) < 5
    _one_line_error(lambda: parse_vnnlib(HEAD, "p", num_outputs=2), "p:5: declares Y_2 but the network has 2 outputs")
    _one_line_error(lambda: parse_vnnlib(HEAD + "(assert (>= Y_0 Y_1))", "p", num_inputs=3),
                    "p: declares 2 inputs X_0..X_1 but the network has 3")
    _one_line_error(lambda: parse_vnnlib(HEAD, "p", num_inputs=0), "num_inputs must be a positive integer")
    assert parse_vnnlib(HEAD + "(assert (>= Y_0 Y_1))", num_inputs=2, num_outputs=3).lower.tolist() == [0, -1]


def test_tokenising_a_big_file_keeps_memory_low(tmp_path):
    """Without the network's sizes the file is streamed: 50,000 declarations took over 140 MB, now a few."""
    path = tmp_path / "decl.vnnlib"
    _declarations(path, 50_000)
    assert _peak_mb(lambda: read_property(path)) < 30
    _one_line_error(lambda: read_property(path), "X_0 has no lower bound")


# 4. deadline ----------------------------------------------------------------------------------------

def test_parsing_stops_at_the_deadline(tmp_path):
    path = tmp_path / "big.vnnlib"
    _declarations(path, 300_000)
    start = time.perf_counter()
    with pytest.raises(ParseTimeout) as e:
        read_property(path, deadline=start + 0.05)
    assert time.perf_counter() - start < 1.0
    assert isinstance(e.value, CertkdError) and not isinstance(e.value, ValueError)
    assert "ran past the time limit" in str(e.value)
    with pytest.raises(ParseTimeout):
        parse_vnnlib(HEAD + "(assert (>= Y_0 Y_1))", "p", deadline=time.perf_counter() - 1)
    assert parse_vnnlib(HEAD + "(assert (>= Y_0 Y_1))", deadline=time.perf_counter() + 60).num_outputs == 3


# 5. missing path ------------------------------------------------------------------------------------

def test_missing_or_unreadable_path_is_one_line(tmp_path):
    """Used to raise FileNotFoundError (a traceback from the Python API)."""
    missing = tmp_path / "nope.vnnlib"
    assert _one_line_error(lambda: read_property(missing), "VNN-LIB file not found") \
        == f"VNN-LIB file not found: {missing}"
    _one_line_error(lambda: read_property(tmp_path), "is a directory")
    (tmp_path / "latin1.vnnlib").write_bytes(b"; caf\xe9\n")
    _one_line_error(lambda: read_property(tmp_path / "latin1.vnnlib"), "not UTF-8 text")


# 6. the property's box ------------------------------------------------------------------------------

def test_reader_still_refuses_an_empty_box():
    text = HEAD.replace("(assert (>= X_0 0))", "(assert (>= X_0 2))") + "(assert (>= Y_0 Y_1))"
    _one_line_error(lambda: parse_vnnlib(text, "p"), "p: empty input box, X_0 has lower bound 2.0 > upper bound 1.0")


@pytest.mark.parametrize("lower,upper,fragment", [
    (np.ones(2), np.zeros(2), "empty input box: input 0 has lower bound 1.0 > upper bound 0.0"),
    (np.array([0.0, np.nan]), np.ones(2), "input 1 has lower bound nan"),
    (np.zeros(2), np.array([1.0, np.inf]), "input 1 has upper bound inf"),
    (np.zeros(3), np.ones(2), "the lower bound has shape (3,) but the upper bound (2,)"),
    (np.zeros((1, 2)), np.ones(2), "the lower bound has shape (1, 2) but the upper bound (2,)"),
    (np.zeros(0), np.zeros(0), "the input box has no inputs"),
    (["a", "b"], np.ones(2), "the input bounds must be arrays of numbers"),
])
def test_api_properties_refuse_bad_boxes(lower, upper, fragment):
    """robustness_property(ones, zeros, ...) used to build a property that then 'held'."""
    _one_line_error(lambda: robustness_property(lower, upper, 0, 3), fragment)
    _one_line_error(lambda: matrix_property(lower, upper, np.eye(3)), fragment)
    _one_line_error(lambda: Property(lower, upper, [[Constraint({0: 1.0}, 0.0, "", 0)]], 3), fragment)


def test_api_properties_refuse_bad_specifications():
    lo, hi = np.zeros(2), np.ones(2)
    _one_line_error(lambda: matrix_property(lo, hi, np.zeros((0, 3))), "must be 2-D (S, K) with S, K >= 1")
    _one_line_error(lambda: matrix_property(lo, hi, np.ones(3)), "must be 2-D")
    _one_line_error(lambda: matrix_property(lo, hi, np.array([[1.0, np.nan]])), "NaN or infinite")
    _one_line_error(lambda: robustness_property(lo, hi, 3, 3), "label 3 out of range for 3 classes")
    _one_line_error(lambda: robustness_property(lo, hi, 0, 1), "at least 2 classes")
    _one_line_error(lambda: Property(lo, hi, [], 3), "no disjuncts")
    _one_line_error(lambda: Property(lo, hi, [[Constraint({5: 1.0}, 0.0, "", 0)]], 3), "refers to output Y_5")
    _one_line_error(lambda: Property(lo, hi, [[Constraint({0: 1.0}, float("nan"), "", 0)]], 3), "not a finite")
    _one_line_error(lambda: parse_vnnlib(HEAD + "(assert (>= (* 1e300 (* 1e300 Y_0)) 0))", "p"), "overflows float64")
    # the valid forms still work, and flatten their bounds
    p = robustness_property(np.zeros((1, 2)), np.ones((1, 2)), 1, 3)
    assert p.lower.shape == (2,) and p.rows.tolist() == [[-1.0, 1.0, 0.0], [0.0, 1.0, -1.0]]
