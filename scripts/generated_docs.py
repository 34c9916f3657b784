#!/usr/bin/env python
"""Fill the generated sections of README.md and docs/bad_inputs.md from the method registry.

A generated section stands between ``<!-- generated: NAME -->`` and ``<!-- end generated: NAME -->``
(it may sit inside a table cell); :data:`SECTIONS` maps NAME to the function that writes it.
Usage (from the repository root)::

    python scripts/generated_docs.py           # rewrite the sections that are out of date
    python scripts/generated_docs.py --check   # exit 1 naming the files that are out of date

tests/test_generated_docs.py runs the check. Fast: it imports the registry (certkd.methods), not torch.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from certkd.methods import method_class, method_names  # noqa: E402

#: The files that hold generated sections, relative to the repository root.
FILES = ("README.md", "docs/bad_inputs.md")


def method_table() -> str:
    """The README's table of training methods: one row per registered method, in listing order."""
    rows = ["| method | kind | loss |", "|---|---|---|"]
    rows += [f"| `{name}` | {method_class(name).category} | {method_class(name).summary} |" for name in method_names()]
    return "\n\n" + "\n".join(rows) + "\n\n"  # blank lines: the markers stay outside the table


def method_list() -> str:
    """The registered names in listing order, as ``certkd train --method`` lists them."""
    return ", ".join(method_names())


SECTIONS: Dict[str, Callable[[], str]] = {"method-table": method_table, "method-names": method_list}


def mark(name: str, text: str) -> str:
    """``text`` as the generated section ``name``."""
    return f"<!-- generated: {name} -->{text}<!-- end generated: {name} -->"


def fill(text: str) -> str:
    """``text`` with every generated section written anew."""
    def one(m: "re.Match") -> str:
        name = m.group(1)
        if name not in SECTIONS:
            raise SystemExit(f"unknown generated section '{name}'; known: {', '.join(SECTIONS)}")
        return mark(name, SECTIONS[name]())
    return re.sub(r"<!-- generated: ([\w-]+) -->.*?<!-- end generated: \1 -->", one, text, flags=re.S)


def stale(root: Path = ROOT) -> List[str]:
    """The files of :data:`FILES` whose generated sections are out of date."""
    return [f for f in FILES if fill((root / f).read_text()) != (root / f).read_text()]


def main(argv: List[str]) -> int:
    if "--check" in argv:
        old = stale()
        if old:
            print(f"out of date with the method registry: {', '.join(old)}; run python scripts/generated_docs.py",
                  file=sys.stderr)
        return 1 if old else 0
    for f in FILES:
        path = ROOT / f
        text = path.read_text()
        if fill(text) != text:
            path.write_text(fill(text))
            print(f"rewrote {f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
