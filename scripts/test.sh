#!/usr/bin/env bash
# Set up .venv if needed, then run the whole test suite (slow tests included).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
# Tests run one torch thread each (tests/conftest.py), so pytest-xdist spreads them over one worker per
# core, a test file per worker at a time (module fixtures are built once). CERTKD_TEST_WORKERS=0 runs
# them in this process (e.g. with --pdb).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -n "${CERTKD_TEST_WORKERS:-auto}" --dist loadfile "$@"
