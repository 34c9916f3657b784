#!/usr/bin/env python
"""Run every bad-input case of tests/test_bad_input.py, tests/test_hostile_inputs.py and
tests/test_cli_hostile.py through ``python -m certkd``; print a Markdown table.

Usage (from the repository root, with the venv active)::

    python scripts/bad_input_catalogue.py > docs/bad_inputs.md

Each case runs in a fresh temporary workspace (tiny untrained runs, fake MNIST files, a broken
YAML file, malicious pickles, tiny ONNX networks: see ``build_workspace``), with paths relative to it. The exit
status is 1 if any case does not end with exit code 2 and exactly one stderr line without a
traceback, or if a malicious pickle was ever unpickled.
"""
from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from generated_docs import mark, method_list  # noqa: E402

HEADER = """# Bad inputs and what certkd prints

Every user mistake below ends with exit code 2 and exactly one line on stderr naming the
problem and the fix, never a traceback (issues #6, #10, #19). The cases are the `CASES` catalogues of
`tests/test_bad_input.py`, `tests/test_hostile_inputs.py` and `tests/test_cli_hostile.py`, which assert
exactly this; paths are relative to a temporary workspace built by each file's `build_workspace` (tiny
untrained runs, fake MNIST files, a broken YAML file, malicious pickles, checkpoints with altered
metadata or weights, a tiny ONNX network with VNN-LIB properties and instances CSVs). Commands longer
than 160 characters are shortened in the middle (…).
Regenerate this file with `python scripts/bad_input_catalogue.py > docs/bad_inputs.md` (two to three
minutes on two CPU cores); its list of training methods, with `python scripts/generated_docs.py` (seconds).
"""


# Test modules with a ``CASES`` catalogue and the ``build_workspace(w)`` their cases refer to, in table order.
CATALOGUES = ("test_bad_input.py", "test_hostile_inputs.py", "test_cli_hostile.py")


def _load_catalogue(filename: str = "test_bad_input.py"):
    name = "certkd_cases_" + Path(filename).stem
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def _cell(text: str, width: Optional[int] = None) -> str:
    """``text`` for a table cell: pipes escaped, newlines marked, and shortened in the middle past ``width``
    characters if given (a --set value nested 5000 levels deep is 10000 characters)."""
    if width is not None and len(text) > width:
        text = text[: width // 2] + "…" + text[-width // 2:]
    return text.replace("|", "\\|").replace("\n", " ⏎ ")


def main() -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    rows, failures = [], []
    with tempfile.TemporaryDirectory(prefix="certkd-bad-input-") as tmp:
        for cat, case in [(cat, case) for cat in map(_load_catalogue, CATALOGUES) for case in cat.CASES]:
            w = Path(tmp) / f"case{len(rows):02d}"
            cat.build_workspace(w)
            argv = [a.replace("{w}/", "").replace("{w}", ".") for a in case.argv]
            proc = subprocess.run([sys.executable, "-m", "certkd"] + argv, cwd=w, capture_output=True, text=True,
                                  env=env, timeout=300)
            err = proc.stderr.strip()
            ok = (proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in proc.stdout + err
                  and case.problem in err and case.fix in err
                  and not (hasattr(cat, "MARKER") and (w / cat.MARKER).exists()))
            if not ok:
                failures.append(case.name)
            rows.append((case.name, "certkd " + " ".join(shlex.quote(a) for a in argv), proc.returncode, err))
            print(f"{'ok ' if ok else 'BAD'} {case.name}", file=sys.stderr)
    print(HEADER)
    print("| case | command | exit code | stderr |")
    print("|---|---|---|---|")
    for name, cmd, code, err in rows:
        # the list of methods is a generated section: scripts/generated_docs.py keeps it current in seconds
        err = _cell(err).replace(method_list(), mark("method-names", method_list()))
        print(f"| {_cell(name)} | `{_cell(cmd, 160)}` | {code} | {err} |")
    api = _load_catalogue("verification/test_verify_api.py")
    print("\n## Python API: `certkd.verify_model`\n")
    print("Each raises `certkd.CertkdError` with this one line (`m` is a small MLP with 4 inputs and 3 outputs;")
    print("the cases are `API_CASES` of `tests/verification/test_verify_api.py`).\n")
    print("| case | call | message |")
    print("|---|---|---|")
    for name, code, words in api.API_CASES:
        try:
            msg = api.api_case_message(code)
        except AssertionError as e:
            msg = f"BAD: {e}"
        if "\n" in msg or not all(w in msg for w in words) or msg.startswith("BAD"):
            failures.append(name)
        print(f"| {_cell(name)} | `{_cell(code)}` | {_cell(msg)} |")
    if failures:
        print(f"{len(failures)} cases misbehaved: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
