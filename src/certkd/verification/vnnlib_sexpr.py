"""S-expressions of VNN-LIB files, read one top-level form at a time (``docs/verify_onnx.md``).

The reader streams: it never holds more than the line being cut into tokens and the form being
built, so a 30 MB file costs little memory, and a caller can stop at the first form it refuses
(e.g. a declaration beyond the network's size). Nesting deeper than :data:`MAX_DEPTH` is refused,
which bounds every recursive walk over a form; a ``deadline`` (a ``time.monotonic()`` value)
is checked as it goes and raises :class:`ParseTimeout`.
"""
from __future__ import annotations

import re
import time
from typing import Iterable, Iterator, List, Optional, Union

from certkd.errors import CertkdError

#: Deepest nesting of parentheses accepted. Published VNN-LIB files nest fewer than 10 levels;
#: the bound keeps the recursive walks over a form far from Python's recursion limit.
MAX_DEPTH = 100

_TOKEN = re.compile(r"\(|\)|[^\s();]+")
_FLAT_FORM = re.compile(r"\s*\(([^()]*)\)\s*")   # a whole line that is one flat form, e.g. a declaration
_LONG_LINE = 1 << 16   # longer lines are cut with finditer (no token list of the whole line)
_CHECK_EVERY = 256     # lines (or tokens of a long line) between deadline checks


class VnnlibError(CertkdError, ValueError):
    """A VNN-LIB file certkd cannot read; the message is one line ``file:line: reason``.

    A ValueError too, so callers that turned the reader's ValueErrors into messages still do.
    """


class ParseTimeout(CertkdError):
    """Reading a VNN-LIB property ran past its deadline; callers answer ``timeout``.

    Not a ValueError: code that turns bad-input ValueErrors into ``error`` must not catch it.
    """


class SList(list):
    """A parenthesised list; ``line`` is where its '(' stands. Atoms are plain ``str``."""

    line: int


Node = Union[str, SList]


def check_deadline(deadline: Optional[float], where: str) -> None:
    """Raise :class:`ParseTimeout` if ``deadline`` (``time.monotonic()`` value) has passed."""
    if deadline is not None and time.monotonic() > deadline:
        raise ParseTimeout(f"{where}: reading the VNN-LIB property ran past the time limit")


def text_lines(text: str) -> Iterator[str]:
    """The lines of ``text`` one at a time (no list of all lines)."""
    start = 0
    while True:
        end = text.find("\n", start)
        if end < 0:
            yield text[start:]
            return
        yield text[start:end]
        start = end + 1


def _tokens(chunk: str, deadline: Optional[float], where: str) -> Iterable[str]:
    if len(chunk) <= _LONG_LINE:
        return _TOKEN.findall(chunk)
    return _long_tokens(chunk, deadline, where)


def _long_tokens(chunk: str, deadline: Optional[float], where: str) -> Iterator[str]:
    for n, m in enumerate(_TOKEN.finditer(chunk)):
        if n % (_CHECK_EVERY * 64) == 0:
            check_deadline(deadline, where)
        yield m.group()


def iter_forms(lines: Iterable[str], where: str, deadline: Optional[float] = None,
               max_depth: int = MAX_DEPTH) -> Iterator[SList]:
    """The top-level forms of the VNN-LIB text given as ``lines``, each as soon as it closes.

    Comments (``;`` to the end of the line) are dropped. Raises :class:`VnnlibError` on
    unbalanced parentheses, an atom outside any form, or nesting deeper than ``max_depth``;
    :class:`ParseTimeout` past ``deadline``.
    """
    stack: List[SList] = []
    lineno = 0
    for lineno, chunk in enumerate(lines, 1):
        if lineno % _CHECK_EVERY == 0:
            check_deadline(deadline, where)
        cut = chunk.find(";")
        if cut >= 0:
            chunk = chunk[:cut]
        if not stack and len(chunk) <= _LONG_LINE:
            flat = _FLAT_FORM.fullmatch(chunk)
            if flat is not None:   # fast path: its tokens are its whitespace-separated words
                form = SList(flat.group(1).split())
                form.line = lineno
                yield form
                continue
        for tok in _tokens(chunk, deadline, where):
            if tok == "(":
                if len(stack) >= max_depth:
                    raise VnnlibError(f"{where}:{lineno}: parentheses nested more than {max_depth} levels deep "
                                      f"(certkd reads at most {max_depth}; VNN-LIB properties need fewer than 10)")
                new = SList()
                new.line = lineno
                stack.append(new)
            elif tok == ")":
                if not stack:
                    raise VnnlibError(f"{where}:{lineno}: unmatched ')'")
                done = stack.pop()
                if stack:
                    stack[-1].append(done)
                else:
                    yield done
            elif stack:
                stack[-1].append(tok)
            else:
                raise VnnlibError(f"{where}:{lineno}: {tok!r} outside of parentheses")
    if stack:
        raise VnnlibError(f"{where}:{stack[0].line}: '(' is never closed")


def parse_sexprs(text: str, where: str = "<vnnlib>") -> List[SList]:
    """All top-level forms of ``text`` (see :func:`iter_forms`)."""
    return list(iter_forms(text_lines(text), where))


def node_text(node: Node, limit: int = 200) -> str:
    """``node`` written back as text (iteratively), cut to ``limit`` characters with '...'."""
    if not isinstance(node, SList):
        return str(node)[:limit]
    if all(not isinstance(c, SList) for c in node):   # fast path: a flat list
        text = "(" + " ".join(node) + ")"
        return text if len(text) <= limit else text[:limit] + "..."
    out: List[str] = []
    size = 0
    todo: List[object] = [node]
    while todo and size <= limit:
        item = todo.pop()
        if isinstance(item, SList):
            todo.append(")")
            todo.extend(reversed([x for c in item for x in (c, " ")][:-1] if item else []))
            piece = "("
        else:
            piece = str(item)
        out.append(piece)
        size += len(piece)
    text = "".join(out)
    return text if not todo else text[:limit] + "..."


def mentions(node: Node, prefix: str) -> bool:
    """Whether an atom of ``node`` is a variable named ``prefix`` + ``_`` + digits (iteratively)."""
    todo: List[Node] = [node]
    while todo:
        item = todo.pop()
        if isinstance(item, SList):
            todo.extend(item)
        elif item.startswith(prefix + "_") and item[len(prefix) + 1:].isdigit():
            return True
    return False


__all__ = ["MAX_DEPTH", "Node", "ParseTimeout", "SList", "VnnlibError", "check_deadline", "iter_forms",
           "mentions", "node_text", "parse_sexprs", "text_lines"]
