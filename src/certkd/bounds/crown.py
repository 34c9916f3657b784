"""CROWN and α-CROWN: backward linear bound propagation (docs/method.md §10.1, §10.2).

What is computed
----------------
Lower bounds of ``C · f(x)`` over the pixel-space box ``lower <= x <= upper`` for a
:class:`~certkd.models.CertifiableNet` ``f = head ∘ features`` in eval mode.

* The head is merged into the specification (last-layer elision, as in IBP): the backward
  pass starts from ``C · W_head`` with bias ``C · b_head``.
* Each layer of ``features`` has one backward rule mapping the coefficients ``A`` of a linear
  lower bound ``A · y + bias`` on its output ``y`` to coefficients on its input
  (auto_LiRPA style). Affine layers (Normalize, Conv2d, Linear, eval BatchNorm) are exact; an
  activation uses the linear bounds of its rule's ``relax(l, u)`` (``docs/adding_a_layer.md``; ReLU:
  the triangle, upper = chord ``u/(u−l)·(z−l)``, lower = ``α·z`` with ``α ∈ [0, 1]``).
* The final linear function of ``x`` is concretised against the box:
  ``lb = A·c − |A|·r + bias`` with centre ``c`` and radius ``r``.

Intermediate (pre-activation) bounds
------------------------------------
Computed layer by layer, activation by activation. For every activation ``k`` the IBP bounds of
its input are obtained by propagating the (already tightened) box ``post_box(l_{k−1}, u_{k−1})``
through the affine layers in between; with ``intermediate="crown"`` a backward CROWN pass from that
pre-activation (default relaxations) is run for the neurons whose relaxation is not exact
(the rule's ``loose``, e.g. ReLU's unstable ones), and the two are intersected (both are sound).
``intermediate`` may also list the activation indices that get a CROWN pass.

Cost control for wide conv layers:
* passes are chunked over neurons so that one dense coefficient tensor holds at most
  ``chunk_elements`` numbers (peak memory is a few times ``4 · chunk_elements`` bytes);
* a conv pre-activation whose layers below are all spatial (Normalize/BN/Conv2d/activations) is
  bounded with receptive-field *windows* (auto_LiRPA's "patches" idea): rows stay windows of
  the size of the neuron's receptive field and are grouped by spatial position (every channel
  of a position that has an unstable neuron is bounded), which makes a full CROWN pass on an
  MNIST CNN7 about 10× cheaper than dense rows;
* the affine layers between a pre-activation and the activation below act identically on the rows
  for the lower and upper bound, so they are applied once before the rows are negated;
* CROWN is skipped where IBP is already exact (no activation below and at most one non-diagonal
  affine layer, e.g. Normalize→Conv→BN);
* eval-mode BatchNorm directly after a Conv2d/Linear is folded into it.

Split constraints / fixed bounds (for branch and bound)
-------------------------------------------------------
``intermediate_overrides`` maps an activation index ``k`` (0-based position among the activation
nodes of the model's graph, the same order as :attr:`CrownResult.intermediate`) to a pair
``(l, u)`` of tensors of shape (N, *neuron_shape) (or broadcastable to it). For an overridden
layer no CROWN pass is run; its bounds are ``max(l, l_ibp)``, ``min(u, u_ibp)`` where the IBP
bounds come from the earlier (possibly overridden) layers. To split neuron ``j`` of layer
``k`` active use ``l[j] = max(l[j], 0)``; inactive ``u[j] = min(u[j], 0)``. A sub-domain whose
bounds cross (``l > u`` somewhere) is empty; :attr:`CrownResult.infeasible` flags it and the
returned bound for it is meaningless (any value is "sound" for an empty set).

Not differentiable w.r.t. model parameters: layer weights are read detached (verification use;
α-CROWN differentiates w.r.t. α only).

Shapes: N = batch, S = rows of the specification, K = classes, neuron_shape = per-sample shape
of an activation's input (e.g. (C, H, W) or (m,)).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from certkd.bounds.alpha import initial_alphas, initial_betas, optimise_bound
from certkd.bounds.crown_backward import (  # noqa: F401  (private names re-exported for callers/tests)
    Bounds, _ActivationMarker, _backward, _build_plan, _concretize, _Plan,
)
from certkd.bounds.crown_intermediate import (  # noqa: F401
    _crown_layer_bounds, _dense_lower, _intermediate, _window_lower,
)
from certkd.bounds.spec import specification_matrix
from certkd.graph.layers import Linear

#: default cap on the number of entries of one coefficient tensor in an intermediate CROWN pass
DEFAULT_CHUNK_ELEMENTS = 2 ** 25


@dataclass
class CrownResult:
    """Everything a bound computation produced.

    lower: (N, S) lower bounds of C·f(x) over the box.
    intermediate: per activation layer k, (l_k, u_k) each (N, *neuron_shape): the pre-activation
        bounds used for the relaxation (CROWN ∩ IBP, with overrides applied).
    alpha: α-CROWN only: per activation layer, the α (N, S, *alpha_shape) that gave the best bound of
        each (sample, row); None entries for layers with nothing to optimise. None for CROWN.
    infeasible: (N,) bool, True where some intermediate lower bound exceeds its upper bound
        (only possible with split overrides: the sub-domain is empty).
    minimizer: α-CROWN only: (N, *input_shape) the box vertex minimising the last iterate's linear
        lower bound of each sample's weakest row: a cheap candidate counterexample for BaB.
    coefficients: α-CROWN only: per activation layer (N, *neuron_shape), the last iterate's
        coefficients of the weakest row on that activation's output. A negative coefficient makes
        the bound pay the upper line's intercept of that neuron: BaB's branching score.
        None when a deadline stopped the optimisation early (BaB then branches on the intercept).
    splittable: per activation layer, whether branch and bound may split it (the rule's ``splittable``).
    """

    lower: Tensor
    intermediate: List[Bounds]
    alpha: Optional[List[Optional[Tensor]]] = None
    infeasible: Optional[Tensor] = None
    minimizer: Optional[Tensor] = None
    coefficients: Optional[List[Tensor]] = None
    splittable: Optional[List[bool]] = None


_CACHE_ATTR = "_certkd_prepared_plans"


class _PlanCache(dict):
    """A model's plans by sample shape, valid for the weights ``key``; a copy or a pickle of the model
    starts with an empty one (its weights are other tensors)."""

    key: Optional[tuple] = None

    def __deepcopy__(self, memo) -> "_PlanCache":
        return _PlanCache()

    def __reduce__(self):
        return _PlanCache, ()


def _weights_key(model: nn.Module) -> tuple:
    """What a prepared plan depends on: the module tree and train/eval modes, and every parameter and
    buffer by identity, storage and in-place version (``optimizer.step``, ``load_state_dict`` and
    ``p.data = ...`` all change one of them)."""
    mods = tuple((id(m), m.training) for m in model.modules())
    tensors = tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device)
                    for t in itertools.chain(model.parameters(), model.buffers()))
    return mods, tensors


def prepared_plan(model: nn.Module, sample_shape: Sequence[int]) -> _Plan:
    """The model's plan (graph with eval BatchNorm folded, node shapes, ReLU nodes) for inputs of
    ``sample_shape``, built once per model, weights and shape.

    Building it deep-copies the folded layers, which BaB would otherwise pay on every batch. The
    plans live in an attribute of the model (so they die with it, no global holds a model alive)
    and are rebuilt when :func:`_weights_key` changes.
    """
    shape = tuple(int(s) for s in sample_shape)
    key = _weights_key(model)
    cache = model.__dict__.get(_CACHE_ATTR)
    if cache is None or cache.key != key:
        cache = model.__dict__[_CACHE_ATTR] = _PlanCache()
        cache.key = key
    plan = cache.get(shape)
    if plan is None:
        plan = cache[shape] = _Plan(model, shape)
    return plan


def _prepare(model, lower, upper, labels, C):
    """Plan, specification (N, S, K) merged with a final Linear: A0 (N, S, m), bias0 (N, S).

    A final Linear node (certkd's head, an ONNX Gemm) is merged into C (last-layer elision) and
    the backward pass starts at its input (``plan.start``); otherwise it starts at the output.
    """
    if lower.shape != upper.shape:
        raise ValueError(f"lower and upper must have the same shape, got {tuple(lower.shape)} and {tuple(upper.shape)}")
    if labels is not None and C is not None:
        raise ValueError("pass either labels or C, not both")
    n, dtype, device = lower.shape[0], lower.dtype, lower.device
    plan = prepared_plan(model, lower.shape[1:])
    last = plan.nodes[plan.net.output]
    head = last.rule.module if type(last.rule) is Linear and len(plan.shapes[-1]) == 1 else None
    k = math.prod(plan.shapes[-1])
    if labels is not None:
        C = specification_matrix(labels.to(device), k).to(dtype)
    elif C is None:
        C = torch.eye(k, dtype=dtype, device=device).expand(n, k, k)
    else:
        C = C.to(device=device, dtype=dtype)
        if C.dim() == 2:
            C = C.expand(n, *C.shape)
        if C.dim() != 3 or C.shape[0] != n or C.shape[2] != k:
            raise ValueError(f"C must be (S, K) or (N, S, K) with N={n}, K={k}; got {tuple(C.shape)}")
    if head is None:
        plan.start = plan.net.output
        A0 = C.reshape(n, C.shape[1], *plan.shapes[-1])
        bias0 = torch.zeros(C.shape[:2], dtype=dtype, device=device)
        return plan, A0, bias0
    plan.start = last.inputs[0]
    w = head.weight.detach().to(device=device, dtype=dtype)
    A0 = C @ w
    bias0 = C @ head.bias.detach().to(device=device, dtype=dtype) if head.bias is not None \
        else torch.zeros(C.shape[:2], dtype=dtype, device=device)
    return plan, A0, bias0


def _infeasible(bounds: Sequence[Bounds], n: int, device) -> Tensor:
    bad = torch.zeros(n, dtype=torch.bool, device=device)
    for l, u in bounds:
        bad |= (l > u).reshape(n, -1).any(1)
    return bad


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def crown_bounds(model: nn.Module, lower: Tensor, upper: Tensor, labels: Optional[Tensor] = None,
                 C: Optional[Tensor] = None, *, intermediate: Union[str, Iterable[int]] = "crown",
                 alpha: Optional[Sequence[Optional[Tensor]]] = None,
                 intermediate_overrides: Optional[Dict[int, Bounds]] = None,
                 return_intermediate: bool = False, chunk_size: Optional[int] = None,
                 chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
    """CROWN lower bounds of C·f(x) over the box [lower, upper] (model in eval mode).

    Args:
        model: a :class:`~certkd.models.CertifiableNet` (``features`` + linear ``head``).
        lower, upper: (N, C, H, W) pixel-space box (or (N, d) for a flat input).
        labels: (N,) true classes: C = C(y) of :func:`~certkd.bounds.spec.specification_matrix`,
            so the result is (N, K−1) bounds of z_y − z_j, j ≠ y in increasing order.
        C: instead of labels, a specification (S, K) or (N, S, K). Neither: bounds of the logits (S = K).
        intermediate: "crown" (full backward pass per activation layer, intersected with IBP), "ibp",
            or a collection of activation indices whose bounds get a CROWN pass (the others use IBP),
            e.g. ``{n − 1}`` to refine only the (cheap, narrow) last layer on CPU.
        alpha: optional α, one entry per activation layer (None = CROWN's default), each
            broadcastable to (N, S, *alpha_shape) (ReLU: the lower slopes, shape (N, S, *neuron_shape));
            projected into the rule's sound range; used only in the final pass (the intermediate
            bounds always use the default relaxations).
        intermediate_overrides: {activation index: (l, u)} fixed/split pre-activation bounds (see module doc).
        return_intermediate: return a :class:`CrownResult` instead of the bare tensor.
        chunk_size: neurons per intermediate CROWN pass (None: from ``chunk_elements``).
        chunk_elements: cap on entries of one coefficient tensor when chunk_size is None.
    Returns:
        (N, S) lower bounds, or a :class:`CrownResult` if ``return_intermediate``.
    """
    plan, A0, bias0 = _prepare(model, lower, upper, labels, C)
    with torch.no_grad():
        bounds, relax = _intermediate(plan, lower, upper, intermediate, intermediate_overrides,
                                      chunk_size, chunk_elements)
    c_in, r_in = (upper + lower) / 2, (upper - lower) / 2
    A, bias = _backward(plan, plan.start, A0, bias0, relax, alpha)
    lb = _concretize(A, bias, c_in, r_in)
    if not return_intermediate:
        return lb
    return CrownResult(lower=lb, intermediate=bounds, alpha=None,
                       infeasible=_infeasible(bounds, lower.shape[0], lower.device), splittable=_splittable(plan))


def alpha_crown_bounds(model: nn.Module, lower: Tensor, upper: Tensor, labels: Optional[Tensor] = None,
                       C: Optional[Tensor] = None, *, iterations: int = 20, lr: float = 0.1,
                       intermediate: Union[str, Iterable[int]] = "crown",
                       intermediate_overrides: Optional[Dict[int, Bounds]] = None,
                       alpha_init: Optional[Sequence[Optional[Tensor]]] = None, return_intermediate: bool = False,
                       chunk_size: Optional[int] = None, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                       deadline: Optional[float] = None,
                       split_signs: Optional[Sequence[Optional[Tensor]]] = None):
    """α-CROWN: CROWN with the activations' relaxation parameters α optimised for the final bound.

    α has entries per (sample, specification row, neuron): per activation layer a tensor
    (N, S, *alpha_shape) (ReLU: the lower slopes, (N, S, *neuron_shape), in [0, 1]), initialised to
    CROWN's default (or to ``alpha_init``, e.g. the :attr:`CrownResult.alpha` of a parent
    sub-domain, broadcastable to that shape). Adam ascends the sum of the bounds (rows are
    independent, so this ascends each one), followed by projection onto the rule's sound range.
    The intermediate bounds are computed once (default relaxations) and kept
    fixed. Adam uses β = (0.9, 0.999). The best bound seen for each (sample, row) is kept, so the result is never below
    CROWN with the same intermediate bounds. Gradients are taken w.r.t. α only
    (``torch.autograd.grad``); model parameters are read detached and get no ``.grad``.

    With ``split_signs`` (branch and bound) this is β-CROWN: per activation layer k a tensor
    (N, *neuron_shape) with +1 / −1 on neurons split active / inactive in that sub-domain and
    0 elsewhere (or None). Each split gets a multiplier β ≥ 0 per (sample, row), initialised
    to 0 and optimised jointly with α (see :func:`_backward`); the bound is sound for every
    β ≥ 0, and enforcing the splits this way is what makes BaB bounds tighten with depth even
    when the split neuron's interval bounds alone change nothing below it.

    Args: as :func:`crown_bounds`; iterations: number of Adam steps (0 gives CROWN); lr: Adam step;
        deadline: a ``time.monotonic()`` value after which no further step is taken (the best
        bound so far is returned, still sound), so callers can honour a timeout;
        split_signs: β-CROWN split constraints, one entry per activation layer (see above).
    Returns:
        (N, S) lower bounds, or a :class:`CrownResult` (with the best α) if ``return_intermediate``.
    """
    if iterations < 0:
        raise ValueError("iterations must be >= 0")
    plan, A0, bias0 = _prepare(model, lower, upper, labels, C)
    lower, upper = lower.detach(), upper.detach()
    with torch.no_grad():
        bounds, relax = _intermediate(plan, lower, upper, intermediate, intermediate_overrides,
                                      chunk_size, chunk_elements)
    n, s = A0.shape[:2]
    A0, bias0 = A0.detach(), bias0.detach()
    alphas = initial_alphas(relax, alpha_init, n, s, A0)
    betas, signs = initial_betas(split_signs, relax, n, s, A0)
    out = optimise_bound(plan, A0, bias0, relax, lower, upper, alphas, betas, signs, iterations=iterations,
                         lr=lr, deadline=deadline, return_intermediate=return_intermediate)
    if not return_intermediate:
        return out.best
    return CrownResult(lower=out.best, intermediate=bounds, alpha=out.best_alpha,
                       infeasible=_infeasible(bounds, n, lower.device), minimizer=out.minimizer,
                       coefficients=out.coefficients, splittable=_splittable(plan))


def _splittable(plan: _Plan) -> List[bool]:
    return [bool(plan.nodes[i].rule.splittable) for i in plan.acts]


def activation_layer_shapes(model: nn.Module, input_shape: Sequence[int]) -> List[Tuple[int, ...]]:
    """Per-sample neuron shapes of the activation layers of the model's graph (the override keys' order)."""
    plan = prepared_plan(model, tuple(input_shape))
    return [plan.shapes[i] for i in plan.acts]


__all__ = ["CrownResult", "DEFAULT_CHUNK_ELEMENTS", "activation_layer_shapes", "alpha_crown_bounds", "crown_bounds",
           "prepared_plan"]
