"""certkd: certified training with expressive losses and CC-Dist distillation from
empirically-robust teachers (De Palma 2026), with verification.

Quick start::

    from certkd import resolve_config, train, load_model, evaluate_run
    cfg = resolve_config("digits-small", {"method": "cc-ibp"})
    run = train(cfg, "runs/cc")
    print(evaluate_run(run))

The names below are imported on first use (PEP 562), so that ``import certkd`` and
``certkd --help`` do not load PyTorch.
"""
from importlib import import_module
from typing import Any

from certkd._version import __version__

# public name -> module that defines it
_LAZY = {
    "CertkdError": "certkd.errors",
    "TrainConfig": "certkd.config",
    "load_preset": "certkd.config",
    "resolve_config": "certkd.config",
    "load_model": "certkd.checkpoints",
    "evaluate_run": "certkd.evaluation",
    "create_model": "certkd.models",
    "list_models": "certkd.models",
    "train": "certkd.training",
    "verify_model": "certkd.verification.api",
}

__all__ = ["CertkdError", "TrainConfig", "create_model", "evaluate_run", "list_models", "load_model",
           "load_preset", "resolve_config", "train", "verify_model", "__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'certkd' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
