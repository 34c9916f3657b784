"""Speed work must not change the numbers: trained weights equal today's bit for bit (issue #20).

The reference digests in ``bit_reference.json`` were produced by ``bit_reference.py`` under the
tree before the speed work (its ``command`` field says how). A digest depends on the torch build
and CPU architecture as well as on the code, so the test skips where those differ from the
reference's: there the reference cannot say what today's code computes.
"""
import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bit_reference", Path(__file__).with_name("bit_reference.py"))
bit_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bit_reference)
environment, train_digests = bit_reference.environment, bit_reference.train_digests

REFERENCE = json.loads((Path(__file__).with_name("bit_reference.json")).read_text())


def test_weights_bit_identical_to_reference(tmp_path):
    if environment() != REFERENCE["environment"]:
        pytest.skip(f"reference made with {REFERENCE['environment']}, this is {environment()}")
    got = train_digests(tmp_path, tuple(REFERENCE["runs"]))
    diff = {k: (got.get(k), v) for k, v in REFERENCE["sha256"].items() if got.get(k) != v}
    assert not diff, f"weights differ from the reference (got, want): {diff}"
