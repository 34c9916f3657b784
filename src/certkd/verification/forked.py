"""Run a function in a forked child process that is stopped at a deadline (docs/verify_onnx.md, the clock).

HiGHS reads its ``time_limit`` between steps of its own, and one step can run for seconds past it: a
round of cut separation at the root of a MILP with a thousand binaries took 8 s on oval21. Run in a
forked child, such a solve can be stopped exactly when the caller's time is up. The fork costs about
0.1 s, so callers use it for large problems only. Where ``os.fork`` is missing (Windows) the function
runs in this process, bounded only by its own time limit.
"""
from __future__ import annotations

import io
import os
import select
import signal
import time
import warnings
from typing import Any, Callable, Sequence, Tuple

import torch


def _encode(payload: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def call_before(fn: Callable[[], Any], deadline: float, grace: float = 0.25,
                errors: Sequence[type] = ()) -> Tuple[bool, Any]:
    """``(True, fn())`` when ``fn`` returns by ``deadline + grace`` (a ``time.monotonic()`` time), else
    ``(False, None)`` with the child killed.

    ``fn``'s result must be plain data (numbers, strings, None, tensors, and lists, tuples and dicts of
    them): it comes back through ``torch.load(weights_only=True)``, never an unpickler that could build
    arbitrary objects. An exception of ``fn`` is raised here as the class of ``errors`` with its name, else
    as a RuntimeError naming it, with its message."""
    if not hasattr(os, "fork"):  # pragma: no cover - Windows
        return True, fn()
    read, write = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns that a child of a multi-threaded process may deadlock; this child only runs
        # ``fn``, and one that hangs is killed at the deadline like one that runs long
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: run, send the outcome, exit without running the parent's cleanup
        code = 0
        try:
            os.close(read)
            try:
                payload = _encode({"ok": True, "value": fn()})
            except BaseException as e:  # noqa: BLE001  re-raised in the parent
                payload = _encode({"ok": False, "error": type(e).__name__, "message": str(e)})
            with os.fdopen(write, "wb") as f:
                f.write(payload)
        except BaseException:  # noqa: BLE001  nothing may escape into the parent's code
            code = 1
        os._exit(code)
    os.close(write)
    chunks, finished = [], False
    try:
        while True:
            left = deadline + grace - time.monotonic()
            if left <= 0 or not select.select([read], [], [], left)[0]:
                return False, None
            chunk = os.read(read, 1 << 16)
            if not chunk:
                finished = True
                break
            chunks.append(chunk)
    finally:
        os.close(read)
        if not finished:  # out of time, or interrupted while waiting: the child stops now
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # pragma: no cover - it had just exited
                pass
        os.waitpid(pid, 0)
    if not chunks:
        raise RuntimeError("the forked child ended without a result")
    payload = torch.load(io.BytesIO(b"".join(chunks)), weights_only=True)
    if not payload["ok"]:
        cls = next((c for c in errors if c.__name__ == payload["error"]), None)
        if cls is not None:
            raise cls(payload["message"])
        raise RuntimeError(f"{payload['error']}: {payload['message']}")
    return True, payload["value"]


__all__ = ["call_before"]
