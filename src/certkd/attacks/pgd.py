"""L∞ projected gradient descent with random start and best-iterate tracking (docs/method.md §2.3)."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from certkd.distributed import LOCAL, Shard
from certkd.precision import autocast

LossFn = Callable[[Tensor, Tensor], Tensor]  # (logits (N,K), target) -> per-sample loss (N,)


def linf_box(x: Tensor, eps: float, low: float = 0.0, high: float = 1.0) -> tuple:
    """The L∞ ball of radius ``eps`` around x, clipped to the valid pixel range (docs/method.md §1)."""
    return (x - eps).clamp(min=low), (x + eps).clamp(max=high)


def cross_entropy_per_sample(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def margin_loss(logits: Tensor, y: Tensor) -> Tensor:
    """max_{j≠y} z_j − z_y: positive exactly when the point is misclassified."""
    true = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    other = logits.scatter(1, y.unsqueeze(1), float("-inf")).amax(1)
    return other - true


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily put a model in eval mode (restoring the previous mode afterwards)."""
    modes = [(m, m.training) for m in model.modules()]  # per module: a frozen BN stays frozen
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


class PGD:
    """L∞ PGD on a box with a step relative to the box half-width.

    Args:
        steps: number of gradient steps n.
        step_size: relative step s; each step moves s·ρ per coordinate with ρ the clipped half-width.
            With s ≥ 2 and one step, every coordinate with a non-zero gradient lands on a corner.
        restarts: independent random starts; the point with the highest loss is kept.
        random_start: start uniformly in the box (else at the box center).
        loss_fn: per-sample loss to maximise, (logits, target) -> (N,); cross-entropy by default.
        stop_on_success: evaluation mode of the attack. Once an iterate is misclassified, that
            point is kept for the sample (the strongest evidence an attack can give).
        eval_model: run the attack with the model in eval mode (docs/method.md §4), restoring it after.
        amp: the attack's forward passes under bfloat16 autocast (``--amp``). The attack only proposes a
            point inside the box, so its precision never touches a bound; the step and the projection
            stay in the input's precision.

    Call: ``attack(model, x, y, lower, upper)`` with x, lower, upper (N, C, H, W) -> x_adv (N, C, H, W).
    In a multi-process training step pass ``shard=`` the step's :class:`certkd.distributed.Shard`:
    the random start is then drawn for the global batch (:meth:`Shard.uniform_like`), so every
    sample starts where it would in one process.
    """

    def __init__(self, steps: int = 40, step_size: float = 0.1, restarts: int = 1, random_start: bool = True,
                 loss_fn: Optional[LossFn] = None, stop_on_success: bool = False, eval_model: bool = True,
                 amp: bool = False):
        if steps < 0 or restarts < 1:
            raise ValueError("PGD needs steps >= 0 and restarts >= 1")
        self.steps, self.step_size, self.restarts = steps, step_size, restarts
        self.random_start, self.stop_on_success, self.eval_model = random_start, stop_on_success, eval_model
        self.amp = amp
        self.loss_fn = loss_fn or cross_entropy_per_sample

    def __repr__(self) -> str:
        return f"PGD(steps={self.steps}, step_size={self.step_size}, restarts={self.restarts})"

    def __call__(self, model: nn.Module, x: Tensor, y, lower: Tensor, upper: Tensor,
                 generator: Optional[torch.Generator] = None, shard: Shard = LOCAL) -> Tensor:
        ctx = eval_mode(model) if self.eval_model else contextlib.nullcontext()
        with ctx, torch.enable_grad():
            best_x, best_loss = None, None
            for _ in range(self.restarts):
                cand, loss = self._run(model, x, y, lower.detach(), upper.detach(), generator, shard)
                if best_x is None:
                    best_x, best_loss = cand, loss
                else:
                    better = loss > best_loss
                    best_x = torch.where(_expand(better, cand), cand, best_x)
                    best_loss = torch.maximum(loss, best_loss)
        return best_x.detach()

    def _score(self, model: nn.Module, xa: Tensor, y) -> tuple:
        with autocast(self.amp, xa.device):
            logits = model(xa)
            loss = self.loss_fn(logits, y)
        loss = loss.to(xa.dtype)
        if self.stop_on_success:
            # Misclassified points rank above every correctly classified one.
            wrong = logits.argmax(1) != y
            loss = torch.where(wrong, torch.full_like(loss, float("inf")), loss)
        return logits, loss

    def _run(self, model: nn.Module, x: Tensor, y, lower: Tensor, upper: Tensor,
             generator: Optional[torch.Generator], shard: Shard) -> tuple:
        rho = (upper - lower) / 2
        if self.random_start:
            u = shard.uniform_like(x, generator)  # global-batch noise in multi-process training
            xa = lower + (upper - lower) * u
        else:
            xa = (lower + upper) / 2
        best_x, best_loss = xa.detach(), torch.full(x.shape[:1], float("-inf"), device=x.device)
        for _ in range(self.steps):
            xa = xa.detach().requires_grad_(True)
            _, loss = self._score(model, xa, y)
            if self.steps > 1:
                improve = loss.detach() >= best_loss
                best_x = torch.where(_expand(improve, xa), xa.detach(), best_x)
                best_loss = torch.where(improve, loss.detach(), best_loss)
            finite = torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss))
            (grad,) = torch.autograd.grad(finite.sum(), xa)
            if self.stop_on_success:
                grad = torch.where(_expand(torch.isinf(loss), grad), torch.zeros_like(grad), grad)
            xa = torch.max(torch.min(xa.detach() + self.step_size * rho * grad.sign(), upper), lower)
        need_score = self.steps > 1 or self.restarts > 1 or self.steps == 0
        if not need_score:  # docs/method.md §2.3: a single step is returned without comparison
            return xa.detach(), best_loss
        with torch.no_grad():
            _, loss = self._score(model, xa, y)
        if self.steps <= 1:
            return xa.detach(), loss
        improve = loss >= best_loss
        best_x = torch.where(_expand(improve, xa), xa.detach(), best_x)
        return best_x, torch.where(improve, loss, best_loss)


def _expand(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))
