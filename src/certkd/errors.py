"""User-facing errors.

A :class:`CertkdError` is a mistake the user can fix (bad flag, missing file,
mismatched checkpoint). The CLI prints its message on one line and exits with
code 2, without a traceback. Everything else is a bug and keeps its traceback.
"""


class CertkdError(Exception):
    """An error caused by user input; the message names the problem and the fix."""
