"""certkd: certified training with expressive losses and CC-Dist distillation from
empirically-robust teachers (De Palma 2026), with verification.

Quick start::

    from certkd import resolve_config, train, load_model, evaluate_run
    cfg = resolve_config("digits-small", {"method": "cc-ibp"})
    run = train(cfg, "runs/cc")
    print(evaluate_run(run))
"""
from certkd.checkpoints import load_model
from certkd.config import TrainConfig, load_preset, resolve_config
from certkd.errors import CertkdError
from certkd.evaluation import evaluate_run
from certkd.models import create_model, list_models
from certkd.training import train

from certkd._version import __version__
__all__ = ["CertkdError", "TrainConfig", "create_model", "evaluate_run", "list_models", "load_model",
           "load_preset", "resolve_config", "train", "__version__"]
