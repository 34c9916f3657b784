"""Adversarial attacks (torchattacks-style: one small class per attack, uniform call).

Every attack is called as ``attack(model, x, y, lower, upper) -> x_adv`` with x_adv inside
[lower, upper]. Boxes are in pixel space; see :func:`linf_box`.

Why our own PGD rather than torchattacks: SPEC §1.3 fixes details torchattacks does not
expose (step size relative to the *clipped* half-width, best-iterate tracking checked
before each step, no comparison for a single step), and the attack is ~60 lines.
"""
from certkd.attacks.pgd import PGD, eval_mode, linf_box, margin_loss

__all__ = ["PGD", "eval_mode", "linf_box", "margin_loss"]
