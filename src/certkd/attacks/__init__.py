"""Adversarial attacks, one small module per attack, all built on the same L∞ PGD step.

* :class:`PGD` (``pgd.py``): the training and evaluation attack, torchattacks-style: an object
  called as ``attack(model, x, y, lower, upper) -> x_adv`` with x_adv inside [lower, upper].
  Boxes are in pixel space; see :func:`linf_box`.
* :class:`SubdomainAttack` (``subdomain.py``): branch and bound's attack from every open
  sub-domain: :class:`PGD` with the margin as its loss and given starts instead of random ones,
  called as ``attack(model, starts, label, lower, upper) -> (x, margin)``.
* :func:`spec_pgd` (``spec_pgd.py``): multi-restart PGD on a general VNN-LIB output property
  (``certkd verify --onnx``), a function with its own call: ``spec_pgd(model, lower, upper, mats)
  -> (best point, its property value)``.

Why our own PGD rather than torchattacks: docs/method.md §2.3 fixes details torchattacks does not
expose (step size relative to the *clipped* half-width, best-iterate tracking checked
before each step, no comparison for a single step), and the attack is ~60 lines.
"""
from certkd.attacks.pgd import PGD, eval_mode, linf_box, margin_loss
from certkd.attacks.spec_pgd import spec_pgd
from certkd.attacks.subdomain import SubdomainAttack

__all__ = ["PGD", "SubdomainAttack", "eval_mode", "linf_box", "margin_loss", "spec_pgd"]
