"""``certkd tune``: hyper-parameter search with Optuna over any config key (docs/tune.md).

* :mod:`.space`: the search space, a YAML mapping of config keys to ranges or choices;
* :mod:`.objective`: what a trial maximises, measured on the validation split (never the test set),
  and one trial: train, report each epoch's value to the pruner, return the final value(s);
* :mod:`.study`: the study in its storage (SQLite in the output folder by default, any Optuna RDB
  URL with ``--storage``), pruners, heartbeats, and the loop that runs trials until the study has N.

Optuna is an optional dependency (``pip install 'certkd[tune]'``); :func:`require_optuna` names it.
"""
from __future__ import annotations

from typing import Any

from certkd.errors import CertkdError

INSTALL_HINT = "pip install 'certkd[tune]'"
#: The file in a tune folder that names its study (``certkd report`` recognises the folder by it).
TUNE_FILE = "tune.json"


def require_optuna() -> Any:
    """The ``optuna`` module, or a one-line CertkdError naming the extra that installs it."""
    try:
        import optuna
    except ImportError:
        raise CertkdError(f"certkd tune needs Optuna, which is not installed: {INSTALL_HINT}") from None
    return optuna
