"""The README's "Using it" section runs top to bottom as written, at reduced size.

Its shell blocks (except the GPU one: ``torchrun`` and ``--devices cuda:…``) run in order in one bash
process, then its Python block, in an empty folder whose ``../shared/data/mnist`` holds a tiny fake
MNIST and whose ``.venv/bin/activate`` puts this interpreter's ``certkd`` on PATH. Reduced size only:
every ``certkd train`` / ``teacher`` gets ``--epochs 1`` (sweeps ``--set epochs=1``), ``verify`` and
``export`` ``--limit 8``, ``verify`` ``--timeout 1``. Nothing else is changed: a command that fails
as written fails here.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bad_input import fake_mnist  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


def using_it_blocks():
    """[(language, code)] of the fenced blocks of the "## Using it" section, in order."""
    text = README.read_text()
    section = text.split("## Using it", 1)[1].split("\n## ", 1)[0]
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(bash|python)\n(.*?)```", section, re.S)]


def reduce_shell(code: str) -> str:
    lines, out = code.replace("\\\n", " ").splitlines(), []
    for line in lines:
        cmd = line.split("#", 1)[0].rstrip() if not line.lstrip().startswith("#") else ""
        if re.match(r"\s*certkd (train|teacher)\b", cmd):
            cmd = re.sub(r"--epochs \d+", "--epochs 1", cmd) if "--epochs" in cmd else cmd + " --epochs 1"
        elif re.match(r"\s*certkd sweep\b", cmd):
            cmd += " --set epochs=1"
        elif re.match(r"\s*certkd tune\b", cmd):
            cmd = re.sub(r"--trials \d+", "--trials 2", cmd) + " --set epochs=1"
        if re.match(r"\s*certkd (verify|export)\b", cmd):
            cmd = re.sub(r"--limit \d+", "--limit 8", cmd)
            cmd = re.sub(r"--timeout \d+", "--timeout 1", cmd)
        out.append(cmd)
    return "\n".join(out) + "\n"


def reduce_python(code: str) -> str:
    return re.sub(r"resolve_config\(([^,]+), \{", r'resolve_config(\1, {"epochs": 1, ', code)


def test_blocks_are_found_and_reduced():
    blocks = using_it_blocks()
    assert [lang for lang, _ in blocks].count("python") == 1 and len(blocks) >= 4
    assert reduce_shell("certkd train --preset digits-small --out runs/cc  # note\n") == \
        "certkd train --preset digits-small --out runs/cc --epochs 1\n"
    assert '{"epochs": 1, "method"' in reduce_python('resolve_config("digits-small", {"method": "cc-ibp"})')


@pytest.mark.slow
def test_using_it_runs_top_to_bottom(tmp_path):
    work = tmp_path / "work"
    (work / ".venv" / "bin").mkdir(parents=True)
    bindir = Path(sys.executable).parent
    (work / ".venv" / "bin" / "activate").write_text(f'export PATH="{bindir}:$PATH"\n')
    fake_mnist(tmp_path / "shared" / "data" / "mnist", 28, n=64)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(CERTKD_THREADS="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    blocks = [(lang, code) for lang, code in using_it_blocks() if not ("torchrun" in code or "cuda:" in code)]
    # the shell blocks in one terminal session (the first one activates .venv), then the Python block
    shell = "set -euo pipefail\n" + "".join(f"echo '>>> block {i}'\n" + reduce_shell(code)
                                             for i, (lang, code) in enumerate(blocks) if lang == "bash")
    runs = [("shell", ["bash", "-c", shell])] + [("python", [sys.executable, "-c", reduce_python(code)])
                                                 for lang, code in blocks if lang == "python"]
    for what, argv in runs:
        proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"README {what} failed:\n{argv[-1]}\n--- stdout\n{proc.stdout[-3000:]}\n" \
                                     f"--- stderr\n{proc.stderr[-3000:]}"
    assert (work / "report" / "report.md").exists() and (work / "release" / "cc" / "MODEL_CARD.md").exists()
    assert (work / "runs" / "student" / "verification.json").exists() and (work / "props").is_dir()
    assert (work / "runs" / "cc-py" / "evaluation.json").exists()


def test_the_layout_names_the_package_as_it_is():
    """Every module and subpackage of src/certkd is named in the "## Layout" block, and every
    ``name.py`` / ``name/`` the block names under src/certkd/ exists."""
    block = README.read_text().split("## Layout", 1)[1].split("```", 2)[1]
    package_part = block.split("tests/", 1)[0]
    named = set(re.findall(r"\b([a-z_]+(?:\.py|/))", package_part)) - {"certkd/", "src/"}
    pkg = README.parent / "src" / "certkd"
    present = {p.name + "/" for p in pkg.iterdir() if (p / "__init__.py").is_file()}
    present |= {p.name for p in pkg.glob("*.py") if p.name not in ("__init__.py", "__main__.py", "_version.py")}
    assert present - named == set(), f"not named in the README's layout: {sorted(present - named)}"
    assert named - present == set(), f"named in the README's layout but not in src/certkd: {sorted(named - present)}"
