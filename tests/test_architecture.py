"""Static architecture checks over ``src/certkd`` (issue #13).

Every module is parsed with :mod:`ast`; every ``import`` / ``from ... import`` statement counts,
including those inside functions; only ``if TYPE_CHECKING:`` blocks are skipped (they never run).
``from certkd import x`` is resolved to the module ``certkd.x`` when it is one, else to the
package ``certkd``. The tests assert that the module import graph has no cycle and that no
module is over 500 lines.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, List, Optional, Set

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "certkd"
MAX_LINES = 500
# Modules allowed over MAX_LINES for now, by name. The goal is an empty allowlist.
LONG_MODULE_ALLOWLIST: Set[str] = set()


def _modules() -> Dict[str, Path]:
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_package(name: str, modules: Dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _resolve(name: str, modules: Dict[str, Path]) -> Optional[str]:
    """The longest prefix of a dotted name that is a module of the package."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in modules:
            return cand
        parts.pop()
    return None


def _type_checking_nodes(tree: ast.AST) -> Set[int]:
    skipped: Set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                for child in node.body:
                    skipped.update(id(n) for n in ast.walk(child))
    return skipped


def _imports(module: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    skipped = _type_checking_nodes(tree)
    package = module if _is_package(module, modules) else module.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name, modules)
                if target:
                    found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                target = sub if sub in modules else _resolve(base, modules)
                if target:
                    found.add(target)
    found.discard(module)
    return found


def import_graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle as a path ``[a, b, ..., a]``, or None. Iterative DFS, deterministic order."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = {n: WHITE for n in graph}
    for root in sorted(graph):
        if colour[root] != WHITE:
            continue
        stack = [(root, iter(sorted(graph[root])))]
        path = [root]
        colour[root] = GREY
        while stack:
            node, children = stack[-1]
            for child in children:
                if child not in colour:
                    continue
                if colour[child] == GREY:
                    return path[path.index(child):] + [child]
                if colour[child] == WHITE:
                    colour[child] = GREY
                    stack.append((child, iter(sorted(graph[child]))))
                    path.append(child)
                    break
            else:
                colour[node] = BLACK
                stack.pop()
                path.pop()
    return None


def test_graph_sees_function_level_imports():
    graph = import_graph()
    # cli.py imports most commands inside functions; they must be edges of the graph.
    assert "certkd.verification.pipeline" in graph["certkd.cli"]
    assert graph["certkd.errors"] == set() or all(m.startswith(PACKAGE) for m in graph["certkd.errors"])


def test_find_cycle_reports_path():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_over_500_lines():
    long = {}
    for name, path in _modules().items():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES:
            long[name] = n
    unexpected = {k: v for k, v in long.items() if k not in LONG_MODULE_ALLOWLIST}
    assert not unexpected, f"modules over {MAX_LINES} lines: {unexpected}"
    stale = LONG_MODULE_ALLOWLIST - set(long)
    assert not stale, f"allowlisted modules now short enough; remove from the allowlist: {stale}"


DOC_REF = re.compile(r"docs/([\w-]+\.md)((?:,? ?§\d+(?:\.\d+)?)+)")


def _doc_sections(path: Path) -> Set[str]:
    """Section numbers of a docs page: '## 7. Title' -> '7', '### 7.3 Title' -> '7.3'."""
    found = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#{2,4} (\d+(?:\.\d+)?)\.? ", line)
        if m:
            found.add(m.group(1))
    return found


def _dangling_refs(pattern: "re.Pattern[str]", path: Path, where: str) -> List[str]:
    """References in ``path`` (group 1: a docs/ page, group 2: its §numbers) to a page or section
    that does not exist."""
    missing = []
    for m in pattern.finditer(path.read_text(encoding="utf-8")):
        page = SRC.parent / "docs" / m.group(1)
        if not page.is_file():
            missing.append(f"{where}: {m.group(0)} (no such page in docs/)")
            continue
        sections = _doc_sections(page)
        missing += [f"{where}: docs/{m.group(1)} §{number}"
                    for number in re.findall(r"§(\d+(?:\.\d+)?)", m.group(2)) if number not in sections]
    return missing


def test_doc_references_point_to_existing_sections():
    missing = [ref for path in sorted((SRC / PACKAGE).rglob("*"))
               if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts
               for ref in _dangling_refs(DOC_REF, path, path.name)]
    assert not missing, "references to sections that do not exist: " + "; ".join(missing)


# The external reference file that users of the package do not have; spelled in two parts so that
# this file does not match its own check.
SPEC_CITATIONS = ("SPEC" + " §", "SPEC" + ".md")
REPO = SRC.parent
PROSE_SUFFIXES = (".py", ".md", ".sh", ".txt", ".yaml", ".yml", ".toml", ".cfg")


def _spec_citations(paths) -> List[str]:
    """'file:line' of every line of ``paths`` that cites the external SPEC."""
    return [f"{p.relative_to(REPO).as_posix()}:{i}" for p in paths
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if any(c in line for c in SPEC_CITATIONS)]


def _project_text_files() -> List[Path]:
    """README.md and the text files of docs/, tests/ and benchmarks/."""
    files = [REPO / "README.md"]
    for folder in ("docs", "tests", "benchmarks"):
        files += [p for p in sorted((REPO / folder).rglob("*"))
                  if p.is_file() and p.suffix in PROSE_SUFFIXES and "__pycache__" not in p.parts]
    return files


def test_no_references_to_the_external_spec_in_code():
    offenders = _spec_citations(sorted((SRC / PACKAGE).rglob("*.py")))
    assert not offenders, "docstrings cite SPEC (not shipped); cite docs/ instead: " + ", ".join(offenders)


def test_no_references_to_the_external_spec_in_tests_docs_and_readme():
    offenders = _spec_citations(_project_text_files())
    assert not offenders, ("tests, docs, benchmarks or README cite SPEC, a file users do not have; cite "
                           "docs/method.md §N (or another docs/ page) instead: " + ", ".join(offenders))


# "docs/method.md §7.9", "method.md §11", "[method.md](method.md) §11": a section of a docs/ page.
PAGE_REF = re.compile(r"(?<![\w/.-])(?:docs/)?([\w-]+\.md)(?:\]\([\w./#-]*\))? ?((?:,? ?§\d+(?:\.\d+)?)+)")


def test_doc_references_outside_the_package_point_to_existing_sections():
    missing = [ref for path in _project_text_files()
               for ref in _dangling_refs(PAGE_REF, path, path.relative_to(REPO).as_posix())]
    assert not missing, "references to sections that do not exist: " + "; ".join(missing)
