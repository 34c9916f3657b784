"""The option table: every :class:`certkd.config.TrainConfig` key with its flag, help, allowed values and scope.

One table, :data:`OPTIONS`, in the order of the config's fields, generates

* the options of ``certkd train`` and ``certkd teacher`` and their ``--help`` (:mod:`certkd.cli_train`):
  keys with a ``flag`` get it, the others are listed under ``--set KEY=VALUE``; a key of scope
  ``student`` is no option of ``certkd teacher``;
* the choice checks of :meth:`TrainConfig.validate` (:func:`check_choice`);
* the flags of the commands that reports reproduce (:mod:`certkd.reporting.commands`).

Allowed values come from the registries (training methods: :mod:`certkd.methods`) or, where the
registry imports torch, from :mod:`certkd.choices`. This module imports neither torch nor click.
"""
from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Tuple

from certkd import choices as C
from certkd.errors import CertkdError
from certkd.methods import method_names

BOTH, STUDENT = "both", "student"  # scopes: certkd train and certkd teacher, or certkd train only


def did_you_mean(word: str, names: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``names``, or ''."""
    close = difflib.get_close_matches(word, list(names), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _models() -> Tuple[str, ...]:
    """The model registry's names once it is loaded (it imports torch), else the built-in ones."""
    models = sys.modules.get("certkd.models")
    return tuple(models.list_models()) if models is not None else C.MODELS


def _dataset(name: str) -> str:
    """The dataset another spelling names (``cifar-10``, ``MNIST``), or the registry's one-line error."""
    from certkd.data.registry import _canonical

    return _canonical(name)


@dataclass(frozen=True)
class Option:
    """One config key. ``flag``: its own option of certkd train/teacher (None: ``--set KEY=VALUE`` only);
    ``choices``: the allowed values (``teacher_choices`` those of ``certkd teacher``); ``normalize``:
    maps another spelling to an allowed value or raises CertkdError; ``kind``: "radius" (0.1 or
    2/255) or "path" where the field's type says too little."""

    key: str
    help: str
    flag: Optional[str] = None
    scope: str = BOTH
    choices: Optional[Callable[[], Sequence[str]]] = None
    teacher_choices: Optional[Callable[[], Sequence[str]]] = None
    normalize: Optional[Callable[[str], str]] = None
    kind: str = ""

    def in_command(self, command: str) -> bool:
        return command == "train" or self.scope == BOTH

    def allowed(self, command: str = "train") -> Tuple[str, ...]:
        """The allowed values in ``command`` (empty: any value of the field's type)."""
        get = self.teacher_choices if command == "teacher" and self.teacher_choices else self.choices
        return tuple(get()) if get is not None else ()


OPTIONS: Tuple[Option, ...] = (
    # data
    Option("dataset", "Dataset (also spelt fashion_mnist, cifar-10, tiny-imagenet, ...); all but digits need "
           "--data-dir.", "--dataset", choices=lambda: C.DATASETS, normalize=_dataset),
    Option("data_dir", "Directory holding the dataset files.", "--data-dir", kind="path"),
    Option("batch_size", "Training batch size (global: split across torchrun processes).", "--batch-size"),
    Option("augment", "Random crop/flip of the training images, where the dataset defines it."),
    Option("train_limit", "Train on N points: a fixed-seed random subset, the same for every run (null: all)."),
    Option("val_fraction", "Hold out the last fraction of the (unshuffled) training set as a validation split, never "
           "trained on and evaluated every epoch as 'val' in metrics.jsonl (docs/method.md §9; 0.2: 80/20; 0: none); "
           "train_limit then samples the rest."),
    # model
    Option("model", "Architecture ('certkd models' describes them).", "--model", choices=_models),
    Option("model_kwargs", "Architecture arguments, e.g. {hidden: [32, 32]} for mlp, {width: 16} for cnn7."),
    Option("ibp_init", "IBP initialisation of the weights (docs/method.md §6)."),
    # objective
    Option("method", "Training method (docs/method.md §4).", "--method", choices=method_names,
           teacher_choices=lambda: method_names("empirical")),
    Option("alpha", "Over-approximation coefficient α in [0, 1] (SABR: λ).", "--alpha", STUDENT),
    Option("l1", "L1 penalty coefficient (docs/method.md §5.6)."),
    Option("reg_lambda", "Weight λ of the warm-up regularisers (0 disables them)."),
    Option("reg_tol", "Tolerance τ of the warm-up regularisers."),
    Option("trades_beta", "β of TRADES (method trades)."),
    Option("crown_ibp_beta_start", "crown-ibp: weight of the CROWN-IBP bound (against IBP's) at ε = 0; it moves "
           "linearly with ε to crown_ibp_beta_end (docs/method.md §5.8).", scope=STUDENT),
    Option("crown_ibp_beta_end", "crown-ibp: that weight once ε reaches its target (0: IBP alone after the ramp).",
           scope=STUDENT),
    Option("taps_head_relus", "taps/staps: top-level ReLU blocks of the features that go into the PGD-bounded "
           "classifier head (the split point, docs/method.md §5.9).", scope=STUDENT),
    Option("taps_steps", "taps/staps: PGD steps per class in the latent box.", scope=STUDENT),
    Option("taps_step_size", "taps/staps: latent PGD step, relative to the latent box's half-width.", scope=STUDENT),
    Option("taps_link_slack", "taps/staps: slack c of the gradient connector, in (0, 1].", scope=STUDENT),
    Option("taps_grad_scale", "taps/staps: gradient expanding factor w of the TAPS loss.", scope=STUDENT),
    # distillation (docs/method.md §7)
    Option("teacher", "Teacher run directory (distillation methods).", "--teacher", STUDENT, kind="path"),
    Option("beta", "Distillation weight β (0 turns distillation off).", "--beta", STUDENT),
    Option("dist_combination", "How CC-Dist combines the box and the adversarial point (docs/method.md §7.3).",
           "--dist-combination", STUDENT, choices=lambda: C.DIST_COMBINATIONS),
    Option("dist_distance", "Distance of the distillation term (docs/method.md §7.4): l2sq, l1, l2; cosine "
           "(1 - cos, scale-free); standardized (l2sq on features divided by the teacher's per-feature std).",
           "--dist-distance", STUDENT, choices=lambda: C.DIST_DISTANCES),
    Option("dist_reduction", "Reduction of that distance over the features: sum or mean (cosine: sum).",
           "--dist-reduction", STUDENT, choices=lambda: C.DIST_REDUCTIONS),
    Option("dist_warmup", "Distil during the ε warm-up too (docs/method.md §7.7).", scope=STUDENT),
    Option("dist_target", "teacher: the teacher's clean features; zero: distil towards 0, no teacher needed (the "
           "feature-norm control of docs/method.md §7.9); class-mean: the teacher's mean feature of the sample's "
           "class over the training set (labels only, §7.10).", "--dist-target", STUDENT,
           choices=lambda: C.DIST_TARGETS),
    Option("feature_adapter", "linear: a learned linear map on the student's side, from student to teacher "
           "features, trained with the student; IBP maps the box exactly.", "--feature-adapter", STUDENT,
           choices=lambda: C.FEATURE_ADAPTERS),
    Option("kd_temperature", "Temperature of the logit distillation of cc-ibp-kd.", scope=STUDENT),
    # ε schedule (docs/method.md §2.4, §3.1)
    Option("eps", "Target L∞ radius in pixel units [0, 1], e.g. 0.1 or 2/255.", "--eps", kind="radius"),
    Option("eps_start", "First epoch of the ε ramp."),
    Option("eps_length", "Length of the ε ramp in epochs."),
    Option("train_eps_mul", "Training radius: the scheduled ε times this."),
    Option("attack_eps_factor", "Radius of the training attack: the training radius times this."),
    # training attack
    Option("attack_steps", "PGD steps of the training attack."),
    Option("attack_step_size", "Step size of the training attack, relative to its radius."),
    Option("attack_restarts", "Restarts of the training attack."),
    # optimisation (docs/method.md §3.2)
    Option("epochs", "Number of epochs; the ε ramp (start, length) and the lr milestones of the preset are "
           "rescaled to it unless set with --set.", "--epochs"),
    Option("optimizer", "Optimiser.", choices=lambda: C.OPTIMIZERS),
    Option("lr", "Learning rate.", "--lr"),
    Option("momentum", "Momentum of sgd."),
    Option("weight_decay", "Weight decay."),
    Option("lr_milestones", "Epochs after which the learning rate is multiplied by lr_gamma, e.g. [50, 60]."),
    Option("lr_gamma", "Learning-rate factor at each milestone."),
    Option("grad_clip", "Gradient-norm clipping threshold (0: off)."),
    # evaluation during training
    Option("test_interval", "Evaluate on the test set every N epochs."),
    Option("test_attack_steps", "PGD steps of that evaluation."),
    Option("test_attack_step_size", "PGD step size of that evaluation, relative to ε."),
    Option("eval_limit", "Evaluate on N test points, a fixed class-stratified subset (null: all)."),
    Option("eval_batch_size", "Batch size of that evaluation."),
    # runtime
    Option("seed", "Random seed, an integer in [0, 2**32).", "--seed"),
    Option("device", "auto (CUDA when present), cpu or cuda[:N]; under torchrun: cuda:LOCAL_RANK.", "--device"),
    Option("allow_tf32", "Allow TF32 matmuls/convolutions in training (off by default: bounds are not sound in "
           "TF32).", "--tf32"),
    Option("amp", "bfloat16 autocast (CUDA or CPU): the whole step of an empirical method; only the training "
           "attack of a certified one, never a bound (docs/performance.md).", "--amp"),
    Option("compile", "torch.compile the model's forward pass (the attack and the clean forward; bounds walk the "
           "layers uncompiled). Off by default: on CPU it measured slower (docs/performance.md).", "--compile"),
)

_BY_KEY = {o.key: o for o in OPTIONS}


def option(key: str) -> Option:
    """The table's entry of a config key (KeyError for an unknown key)."""
    return _BY_KEY[key]


def command_options(command: str, flagged: Optional[bool] = None) -> Tuple[Option, ...]:
    """The options of ``certkd COMMAND`` (train or teacher), in table order; ``flagged``: only those with
    (True) or without (False) a flag of their own."""
    return tuple(o for o in OPTIONS if o.in_command(command) and (flagged is None or (o.flag is not None) == flagged))


def check_choice(key: str, value: str, command: str = "train") -> str:
    """``value`` of a key with choices as allowed (another spelling mapped to its name), or a one-line
    CertkdError naming the allowed values."""
    opt = option(key)
    names = opt.allowed(command)
    if not names or value in names:
        return value
    if opt.normalize is not None:
        return opt.normalize(str(value))
    raise unknown_name(key, str(value), names)


def unknown_name(what: str, value: str, names: Sequence[str]) -> CertkdError:
    """The one-line error for a ``what`` (method, model, engine, ...) that is not one of ``names``."""
    return CertkdError(f"unknown {what} '{value}'{did_you_mean(value, names)}; choose one of: {', '.join(names)}")
