"""The base class of a training method and the registry that finds it by name.

A method declares what it needs (IBP bounds, a PGD attack, a teacher) and computes the loss of
one batch from the batch, the model and those parts. :func:`certkd.training.step.training_loss`
looks the method up by ``cfg.method`` and calls :meth:`Method.loss`. This module and the class
bodies of the methods do not import torch (see :mod:`certkd.methods`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Type, TypeVar


# Listing order of the categories: config.METHODS is EMPIRICAL + CERTIFIED + DISTILLATION.
CATEGORIES = ("empirical", "certified", "distillation")

_REGISTRY: Dict[str, Type["Method"]] = {}
M = TypeVar("M", bound=Type["Method"])


@dataclass
class Batch:
    """One training batch and what :func:`certkd.training.step.training_loss` prepared for it.

    eps_tr is the IBP radius ε_s·train_eps_mul, eps_att the attack radius eps_tr·attack_eps_factor,
    warmup whether eps_tr is below WARMUP_EPS (docs/method.md §2.4); ``logs`` collects the
    numbers to log. ``shard`` is the step's :class:`certkd.distributed.Shard` (``LOCAL`` in one
    process): every batch mean of the loss and the attack's random start must use it, so that a
    multi-process step computes the global batch's loss. It has no default on purpose: it is
    passed down explicitly, never looked up.
    """

    model: Any
    x: Any
    y: Any
    eps_sched: float
    eps_tr: float
    eps_att: float
    warmup: bool
    reg_active: bool
    attack: Any
    shard: Any  # a certkd.distributed.Shard (not imported: this module stays free of torch)
    teacher: Any = None
    logs: Dict[str, float] = field(default_factory=dict)


@dataclass
class ReferenceCase:
    """One fixed batch on which tests/training/test_methods.py checks every method's :meth:`Method.loss`
    against its :meth:`Method.reference_loss`, computed by hand on a copy of the same model.

    The step it describes is past warm-up with ε_tr = ε_att = ``eps`` and no regulariser; the attack is
    ``PGD(cfg.attack_steps, cfg.attack_step_size)`` started from ``torch.manual_seed(seed)``, as the test
    seeds the step. ``model`` is never changed: every computation takes :meth:`fresh`. x: (N, C, H, W),
    y: (N,).
    """

    model: Any
    teacher: Any          # a certkd.training.Teacher
    x: Any
    y: Any
    cfg: Any              # a certkd.config.TrainConfig
    eps: float
    seed: int = 1

    def fresh(self):
        """A copy of the model, with the weights and BatchNorm statistics of the step's start."""
        import copy
        return copy.deepcopy(self.model)

    def box(self):
        """(lo, hi): the ε box around x, clipped to [0, 1]; each (N, C, H, W)."""
        return parts().linf_box(self.x, self.eps)

    def attacked(self, model):
        """(clean logits (N, K), lo, hi, x_adv): seed, the clean forward (BatchNorm statistics), then
        the training attack in the ε box, as the certified procedure does (docs/method.md §4)."""
        P = parts()
        P.torch.manual_seed(self.seed)
        logits = model(self.x)
        lo, hi = self.box()
        return logits, lo, hi, P.PGD(self.cfg.attack_steps, self.cfg.attack_step_size)(model, self.x, self.y, lo, hi)

    def bounds(self, model, lo, hi, point):
        """(lb (N, K), fb, d): the IBP logit-difference bounds of [lo, hi], the feature bounds ``fb``
        (carrying ``point``), and the logit differences at ``point`` (N, K)."""
        P = parts()
        lb, fb = P.ibp_logit_difference_bounds(model, lo, hi, self.y, point=point)
        return lb, fb, P.logit_differences(model.head(fb.point_output), self.y)

    def certified(self):
        """(model, lb, fb, d_adv, x_adv) of the common certified path: a fresh model, the attack, then
        the IBP bounds of the ε box carrying x_adv (``fb.point_output`` its features, (N, m))."""
        m = self.fresh()
        _, lo, hi, x_adv = self.attacked(m)
        lb, fb, d_adv = self.bounds(m, lo, hi, x_adv)
        return m, lb, fb, d_adv, x_adv

    @property
    def distance(self) -> Dict[str, str]:
        """The distance keywords of the config: ``distance`` and ``reduction`` of certkd.losses.distillation."""
        return {"distance": self.cfg.dist_distance, "reduction": self.cfg.dist_reduction}


class Method:
    """A training method: its name, category, needs and loss.

    Class attributes:
        name: the ``--method`` value (set by :func:`register_method`).
        category: "empirical" (teachers), "certified" or "distillation".
        summary: the loss in one line, citing docs/method.md: the README's method table is made of
            these (``python scripts/generated_docs.py``).
        order: position within its category in listings (help, config.METHODS).
        needs_bounds / needs_attack / needs_teacher: which parts the loss uses (the teacher is
            not loaded for ``dist_target: zero``).
        attack: the training attack an empirical method brings to ``certkd teacher``, as config keys
            (``attack_steps``, ``attack_step_size``, ``attack_eps_factor``); empty for a method without an attack, whose
            teacher then records the config's own attack keys, untouched (:func:`certkd.config.resolve_config`).
    """

    name: str = ""
    category: str = ""
    summary: str = ""
    order: int = 100
    needs_bounds: bool = False
    needs_attack: bool = False
    needs_teacher: bool = False
    attack: Mapping[str, Any] = MappingProxyType({})

    def __init__(self, cfg: Any):  # a certkd.config.TrainConfig (not imported: config reads this registry)
        self.cfg = cfg

    def alpha(self) -> float:
        """The α this method uses; most take cfg.alpha."""
        return self.cfg.alpha

    def loss(self, b: Batch):
        """The loss (a scalar tensor) of one batch; numbers to log go into ``b.logs``."""
        raise NotImplementedError

    @classmethod
    def reference_loss(cls, case: ReferenceCase):
        """The loss of ``case``'s batch written out by hand from certkd.losses, certkd.bounds and
        certkd.attacks (the formula the method documents), a scalar tensor: the oracle that
        tests/training/test_methods.py holds :meth:`loss` to. Every registered class defines its own
        (an inherited one does not count), so that a new method is tested as soon as it is registered."""
        raise NotImplementedError(f"training method '{cls.name}' defines no reference_loss")


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: register a :class:`Method` subclass under ``name``."""
    def deco(cls: M) -> M:
        if name in _REGISTRY:
            raise ValueError(f"training method '{name}' is registered twice")
        if cls.category not in CATEGORIES:
            raise ValueError(f"training method '{name}': category must be one of {CATEGORIES}, "
                             f"not '{cls.category}'")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return deco


def method_class(name: str) -> Type[Method]:
    """The class registered under ``name`` (KeyError when there is none)."""
    return _REGISTRY[name]


def method_category(name: str) -> Optional[str]:
    """The category of a registered method, or None."""
    cls = _REGISTRY.get(name)
    return cls.category if cls is not None else None


def method_names(category: Optional[str] = None) -> Tuple[str, ...]:
    """Registered names in listing order (by category, then ``order``), optionally of one category."""
    ranked = sorted(_REGISTRY.values(), key=lambda c: (CATEGORIES.index(c.category), c.order, c.name))
    return tuple(c.name for c in ranked if category is None or c.category == category)


def parts():
    """The torch-side helpers (:mod:`certkd.methods._parts`), imported on first use."""
    from certkd.methods import _parts
    return _parts
