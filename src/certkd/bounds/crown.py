"""CROWN and α-CROWN: backward linear bound propagation (docs/method.md §10.1, §10.2).

What is computed
----------------
Lower bounds of ``C · f(x)`` over the pixel-space box ``lower <= x <= upper`` for a
:class:`~certkd.models.CertifiableNet` ``f = head ∘ features`` in eval mode.

* The head is merged into the specification (last-layer elision, as in IBP): the backward
  pass starts from ``C · W_head`` with bias ``C · b_head``.
* Each layer of ``features`` has one backward rule mapping the coefficients ``A`` of a linear
  lower bound ``A · y + bias`` on its output ``y`` to coefficients on its input
  (auto_LiRPA style). Affine layers (Normalize, Conv2d, Linear, eval BatchNorm) are exact;
  ReLU uses the triangle relaxation: upper = chord ``u/(u−l)·(z−l)``, lower = ``α·z`` with
  ``α ∈ [0, 1]`` (CROWN: ``α = 1`` if ``u >= |l|`` else 0). Stable neurons (``l >= 0`` or
  ``u <= 0``) are exactly linear (slope 1) or zero.
* The final linear function of ``x`` is concretised against the box:
  ``lb = A·c − |A|·r + bias`` with centre ``c`` and radius ``r``.

Intermediate (pre-ReLU) bounds
------------------------------
Computed layer by layer, ReLU by ReLU. For every ReLU ``k`` the IBP bounds of its input are
obtained by propagating the (already tightened) box ``[relu(l_{k−1}), relu(u_{k−1})]`` through
the affine layers in between; with ``intermediate="crown"`` a backward CROWN pass from that
pre-activation (adaptive slopes) is run for the neurons that IBP leaves unstable, and the two
are intersected (both are sound). Stable neurons keep their IBP bounds (their relaxation is
exact anyway). ``intermediate`` may also list the ReLU indices that get a CROWN pass.

Cost control for wide conv layers:
* passes are chunked over neurons so that one dense coefficient tensor holds at most
  ``chunk_elements`` numbers (peak memory is a few times ``4 · chunk_elements`` bytes);
* a conv pre-activation whose layers below are all spatial (Normalize/BN/Conv2d/ReLU) is
  bounded with receptive-field *windows* (auto_LiRPA's "patches" idea): rows stay windows of
  the size of the neuron's receptive field and are grouped by spatial position (every channel
  of a position that has an unstable neuron is bounded), which makes a full CROWN pass on an
  MNIST CNN7 about 10× cheaper than dense rows;
* the affine layers between a pre-activation and the ReLU below act identically on the rows
  for the lower and upper bound, so they are applied once before the rows are negated;
* CROWN is skipped where IBP is already exact (no ReLU below and at most one non-diagonal
  affine layer, e.g. Normalize→Conv→BN);
* eval-mode BatchNorm directly after a Conv2d/Linear is folded into it.

Split constraints / fixed bounds (for branch and bound)
-------------------------------------------------------
``intermediate_overrides`` maps a ReLU index ``k`` (0-based position among the ``nn.ReLU``
modules of ``model.features``, the same order as :attr:`CrownResult.intermediate`) to a pair
``(l, u)`` of tensors of shape (N, *neuron_shape) (or broadcastable to it). For an overridden
layer no CROWN pass is run; its bounds are ``max(l, l_ibp)``, ``min(u, u_ibp)`` where the IBP
bounds come from the earlier (possibly overridden) layers. To split neuron ``j`` of layer
``k`` active use ``l[j] = max(l[j], 0)``; inactive ``u[j] = min(u[j], 0)``. A sub-domain whose
bounds cross (``l > u`` somewhere) is empty; :attr:`CrownResult.infeasible` flags it and the
returned bound for it is meaningless (any value is "sound" for an empty set).

Not differentiable w.r.t. model parameters: layer weights are read detached (verification use;
α-CROWN differentiates w.r.t. α only).

Shapes: N = batch, S = rows of the specification, K = classes, neuron_shape = per-sample shape
of a ReLU's input (e.g. (C, H, W) or (m,)).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from certkd.bounds.spec import specification_matrix
from certkd.graph.convert import fold_batchnorm, from_module
from certkd.graph.layers import BatchNorm, Linear
from certkd.graph.windows import Window, win_gather, win_to_dense

Bounds = Tuple[Tensor, Tensor]

#: default cap on the number of entries of one coefficient tensor in an intermediate CROWN pass
DEFAULT_CHUNK_ELEMENTS = 2 ** 25


@dataclass
class CrownResult:
    """Everything a bound computation produced.

    lower: (N, S) lower bounds of C·f(x) over the box.
    intermediate: per ReLU layer k, (l_k, u_k) each (N, *neuron_shape): the pre-activation
        bounds used for the relaxation (CROWN ∩ IBP, with overrides applied).
    alpha: α-CROWN only: per ReLU layer, the α (N, S, *neuron_shape) that gave the best bound of
        each (sample, row); None entries for layers without unstable neurons. None for CROWN.
    infeasible: (N,) bool, True where some intermediate lower bound exceeds its upper bound
        (only possible with split overrides: the sub-domain is empty).
    minimizer: α-CROWN only: (N, *input_shape) the box vertex minimising the last iterate's linear
        lower bound of each sample's weakest row: a cheap candidate counterexample for BaB.
    relu_coefficients: α-CROWN only: per ReLU layer (N, *neuron_shape), the last iterate's
        coefficients of the weakest row on that ReLU's output. A negative coefficient makes the
        bound pay the triangle intercept −l·u/(u−l) of that neuron: BaB's branching score.
        None when a deadline stopped the optimisation early (BaB then branches on the intercept).
    """

    lower: Tensor
    intermediate: List[Bounds]
    alpha: Optional[List[Optional[Tensor]]] = None
    infeasible: Optional[Tensor] = None
    minimizer: Optional[Tensor] = None
    relu_coefficients: Optional[List[Tensor]] = None


# --------------------------------------------------------------------------------------------
# The plan: the model's graph (certkd.graph) with eval BatchNorm folded; every non-ReLU node's
# rule class supplies its IBP, backward and window rules. A: (N, S, *out_shape), bias: (N, S).
# --------------------------------------------------------------------------------------------

class _Plan:
    """The graph, its node shapes, the ReLU nodes, and where the backward pass starts."""

    def __init__(self, model: nn.Module, sample_shape: Sequence[int]):
        net = from_module(model)
        for node in net.nodes:
            if isinstance(node.rule, BatchNorm) and node.rule.module.training:
                raise ValueError("CROWN bounds use eval-mode BatchNorm (running statistics); call model.eval()")
        self.net = fold_batchnorm(net)
        self.nodes = self.net.nodes
        self.shapes = self.net.shapes(tuple(sample_shape))
        self.relus = self.net.relu_nodes()
        self.relu_index = {node: k for k, node in enumerate(self.relus)}

    def in_shapes(self, i: int) -> List[Tuple[int, ...]]:
        return [self.shapes[j] for j in self.nodes[i].inputs]

    # a sequence view for callers of the former flat plan: item i is node i + 1 (ReLUs as _ReLU)
    def __len__(self) -> int:
        return len(self.nodes) - 1

    def __getitem__(self, i: int):
        node = i + 1
        if self.nodes[node].rule.is_relu:
            return _ReLU(self.relu_index[node], self.shapes[node])
        return self.nodes[node].rule


class _ReLU:
    """ReLU marker of the sequence view of a :class:`_Plan` (index k, neuron shape)."""

    def __init__(self, index: int, shape: Sequence[int]):
        self.index, self.shape = index, tuple(shape)


def _build_plan(features: nn.Module, sample_shape, dtype=None, device=None) -> _Plan:
    """The plan of ``features`` (parameters are read detached, in the box's dtype, when used)."""
    return _Plan(features, sample_shape)


# --------------------------------------------------------------------------------------------
# ReLU relaxation
# --------------------------------------------------------------------------------------------

@dataclass
class _Relaxation:
    """Triangle relaxation of one ReLU layer; all tensors (N, *neuron_shape).

    lower_slope: 1 (active), 0 (inactive), CROWN adaptive slope (unstable).
    upper_slope / upper_bias: 1/0 (active), 0/0 (inactive), chord (unstable).
    unstable: bool mask l < 0 < u.
    """

    lower_slope: Tensor
    upper_slope: Tensor
    upper_bias: Tensor
    unstable: Tensor

    @classmethod
    def from_bounds(cls, l: Tensor, u: Tensor) -> "_Relaxation":
        active = l >= 0
        unstable = (l < 0) & (u > 0)
        width = torch.where(unstable, u - l, torch.ones_like(u))
        chord = u / width
        upper_slope = torch.where(unstable, chord, active.to(l.dtype))
        upper_bias = torch.where(unstable, -l * chord, torch.zeros_like(l))
        adaptive = (u >= -l).to(l.dtype)
        lower_slope = torch.where(unstable, adaptive, active.to(l.dtype))
        return cls(lower_slope, upper_slope, upper_bias, unstable)

    def backward(self, A: Tensor, bias: Tensor, alpha: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """A (N, S, *shape) on the ReLU output -> A on its input (lower bound direction)."""
        if alpha is None:
            lo = self.lower_slope.unsqueeze(1)
        else:
            lo = torch.where(self.unstable.unsqueeze(1), alpha.clamp(0.0, 1.0), self.lower_slope.unsqueeze(1))
        bias = bias + torch.einsum("nsd,nd->ns", A.clamp(max=0).flatten(2), self.upper_bias.flatten(1))
        return A * torch.where(A >= 0, lo, self.upper_slope.unsqueeze(1)), bias


# --------------------------------------------------------------------------------------------
# Core passes
# --------------------------------------------------------------------------------------------

def _backward(plan: _Plan, start: int, A: Tensor, bias: Tensor, relax: Sequence["_Relaxation"],
              alpha: Optional[Sequence[Optional[Tensor]]] = None,
              beta: Optional[Sequence[Optional[Tensor]]] = None,
              split_signs: Optional[Sequence[Optional[Tensor]]] = None,
              capture: Optional[Dict[int, Tensor]] = None) -> Tuple[Tensor, Tensor]:
    """Propagate A (on the output of node ``start``) back to the network input (node 0).

    Nodes are visited in reverse topological order; a node read by several others (the fork of a
    residual block) sums the coefficients coming from each of them before its own rule runs.

    ``capture``: if given, receives for every ReLU index the coefficients A (N, S, *shape) on
    that ReLU's *output* (the dual variables a branching heuristic scores neurons with).

    β-CROWN split multipliers: a neuron split with sign s (+1 active: z ≥ 0, −1 inactive: z ≤ 0)
    satisfies s·z ≥ 0 on its sub-domain, so f ≥ f − β·s·z there for any β ≥ 0; the term −β·s
    is added to the coefficients of the pre-activation z (Wang et al. 2021, Lagrangian of the
    split constraints). ``beta[k]`` (N, S, *shape) must be ≥ 0; ``split_signs[k]`` (N, *shape)
    is 0 on neurons that are not split.
    """
    pending: Dict[int, Tensor] = {start: A}
    for i in range(start, 0, -1):
        A = pending.pop(i, None)
        if A is None:
            continue
        node = plan.nodes[i]
        if node.rule.is_relu:
            k = plan.relu_index[i]
            if capture is not None:
                capture[k] = A.detach()
            a = None if alpha is None else alpha[k]
            A, bias = relax[k].backward(A, bias, a)
            if beta is not None and beta[k] is not None:
                A = A - beta[k] * split_signs[k].unsqueeze(1)
            outs = [A]
        else:
            outs, bias = node.rule.backward(A, bias, plan.in_shapes(i), plan.shapes[i])
        for j, Aj in zip(node.inputs, outs):
            if Aj is not None:
                pending[j] = pending[j] + Aj if j in pending else Aj
    A = pending.get(0)
    if A is None:  # the output does not depend on the input
        A = bias.new_zeros(bias.shape + tuple(plan.shapes[0]))
    return A, bias


def _concretize(A: Tensor, bias: Tensor, c: Tensor, r: Tensor) -> Tensor:
    """min over the box of A·x + bias: A (N, S, *in), c/r (N, *in) -> (N, S)."""
    A = A.flatten(2)
    return bias + torch.einsum("nsd,nd->ns", A, c.flatten(1)) - torch.einsum("nsd,nd->ns", A.abs(), r.flatten(1))


# --------------------------------------------------------------------------------------------
# Windowed ("patches") backward pass for intermediate bounds of conv layers (certkd.graph.windows):
# each node's rule class acts on the windows; ReLU/the input box are read at the window. When a
# window covers the whole layer, or a node has no window rule (or several inputs), the windows
# are scattered into a dense tensor and the pass continues densely.
# --------------------------------------------------------------------------------------------

def _window_lower(plan: _Plan, src: int, shape, positions, n, relax, c_in, r_in) -> Tuple[Tensor, Tensor]:
    """CROWN bounds of every channel of the conv neurons at spatial ``positions`` (flat h·W+w) of
    the output of node ``src`` (shape (C, H, W)), by receptive-field windows.

    Rows are grouped by position (A is (N, P, G, C, py, px) with G rows per position), so the
    per-position values that ReLU/BN/the input box contribute are read once per position.
    Returns lower and upper bounds, each (N, C0, P).
    """
    dtype, device = c_in.dtype, c_in.device
    c0, h, w = shape
    p = positions.numel()
    A = torch.eye(c0, dtype=dtype, device=device).view(1, 1, c0, c0, 1, 1).expand(n, p, c0, c0, 1, 1)
    win = Window(A, torch.zeros(n, p, c0, dtype=dtype, device=device), positions // w, positions % w)
    size = (h, w)
    doubled, j = False, src
    while j > 0:
        node = plan.nodes[j]
        if node.rule.is_relu and not doubled:
            # Affine layers so far act identically on the rows for the lower (+z) and upper (−z)
            # bound: propagate +z alone up to the first ReLU, then negate.
            win = Window(torch.cat([win.A, -win.A], 2), torch.cat([win.bias, -win.bias], 2), win.oy, win.ox)
            doubled = True
        in_shape = plan.shapes[node.inputs[0]]
        if len(node.inputs) != 1 or len(in_shape) != 3 or win.A.shape[-2] >= size[0] or win.A.shape[-1] >= size[1]:
            break  # a window covering the whole layer: continue densely
        if node.rule.is_relu:
            rel = relax[plan.relu_index[j]]
            py, px = win.A.shape[-2:]
            lo, up, ub = (win_gather(t, win.oy, win.ox, py, px) for t in (rel.lower_slope, rel.upper_slope,
                                                                          rel.upper_bias))
            bias = win.bias + torch.einsum("npgd,npd->npg", win.A.clamp(max=0).flatten(3), ub.flatten(3).squeeze(2))
            win = Window(win.A * torch.where(win.A >= 0, lo, up), bias, win.oy, win.ox)
        else:
            new = node.rule.window(win, in_shape, plan.shapes[j])
            if new is None:
                break
            win = new
        size = in_shape[1:]
        j = node.inputs[0]
    if not doubled:
        win = Window(torch.cat([win.A, -win.A], 2), torch.cat([win.bias, -win.bias], 2), win.oy, win.ox)
    A, bias, oy, ox = win.A, win.bias, win.oy, win.ox
    g = A.shape[2]
    if j > 0:
        A = win_to_dense(A, oy, ox, *size)
        A, bias = _backward(plan, j, A, bias.reshape(n, p * g), relax)
        lb = _concretize(A, bias, c_in, r_in).view(n, p, g)
    else:
        py, px = A.shape[-2:]
        cw, rw = win_gather(c_in, oy, ox, py, px), win_gather(r_in, oy, ox, py, px)
        lb = bias + (A * cw).sum((3, 4, 5)) - (A.abs() * rw).sum((3, 4, 5))
    return lb[:, :, :c0].transpose(1, 2), -lb[:, :, c0:].transpose(1, 2)


def _dense_lower(plan: _Plan, src: int, shape, sel, n, relax, c_in, r_in) -> Tuple[Tensor, Tensor]:
    """CROWN bounds of the neurons ``sel`` (flat indices into ``shape``) of the output of node
    ``src`` by a dense backward pass: lower and upper, each (N, k)."""
    k, dtype, device = sel.numel(), c_in.dtype, c_in.device
    A = torch.zeros(n, k, math.prod(shape), dtype=dtype, device=device)
    A[:, torch.arange(k, device=device), sel] = 1.0
    A, bias = A.reshape(n, k, *shape), torch.zeros(n, k, dtype=dtype, device=device)
    first = src  # shared affine prefix for the +z and −z rows (see _window_lower)
    while first > 0 and not plan.nodes[first].rule.is_relu and len(plan.nodes[first].inputs) == 1:
        (A,), bias = plan.nodes[first].rule.backward(A, bias, plan.in_shapes(first), plan.shapes[first])
        first = plan.nodes[first].inputs[0]
    A, bias = torch.cat([A, -A], 1), torch.cat([bias, -bias], 1)
    A, bias = _backward(plan, first, A, bias, relax)
    lb = _concretize(A, bias, c_in, r_in)
    return lb[:, :k], -lb[:, k:]


def _crown_layer_bounds(plan: _Plan, src: int, shape, l, u, relax, c_in, r_in, chunk_size, chunk_elements,
                        windows=True):
    """Tighten (l, u) (N, *shape) of the output of node ``src`` by CROWN, unstable neurons only.

    Conv layers use receptive-field windows and bound all channels at each spatial position that
    has an unstable neuron; other layers use dense rows.
    """
    n = l.shape[0]
    unstable = (l < 0) & (u > 0)
    if not bool(unstable.any()):
        return l, u
    if chunk_size is None:  # sized for dense rows (windows are smaller)
        numel = max([math.prod(shape), c_in[0].numel()] + [math.prod(plan.shapes[j]) for j in range(src + 1)])
        chunk_size = max(1, chunk_elements // (2 * n * numel))
    windowed = windows and len(shape) == 3 and c_in.dim() == 4 and len(plan.nodes[src].inputs) == 1 and src > 0
    if windowed:
        c0, h, w = shape
        lv, uv = l.reshape(n, c0, h * w).clone(), u.reshape(n, c0, h * w).clone()
        positions = unstable.reshape(n, c0, h * w).any(1).any(0).nonzero().squeeze(1)
        step = max(1, chunk_size // c0)
        for start in range(0, positions.numel(), step):
            pos = positions[start:start + step]
            lo, up = _window_lower(plan, src, shape, pos, n, relax, c_in, r_in)
            lv[:, :, pos] = torch.maximum(lv[:, :, pos], lo)
            uv[:, :, pos] = torch.minimum(uv[:, :, pos], up)
        return lv.reshape(l.shape), uv.reshape(u.shape)
    d = math.prod(shape)
    idx = unstable.reshape(n, d).any(0).nonzero().squeeze(1)
    lv, uv = l.reshape(n, d).clone(), u.reshape(n, d).clone()
    for start in range(0, idx.numel(), chunk_size):
        sel = idx[start:start + chunk_size]
        lo, up = _dense_lower(plan, src, shape, sel, n, relax, c_in, r_in)
        lv[:, sel] = torch.maximum(lv[:, sel], lo)
        uv[:, sel] = torch.minimum(uv[:, sel], up)
    return lv.reshape(l.shape), uv.reshape(u.shape)


def _intermediate(plan: _Plan, lower, upper, method, overrides, chunk_size, chunk_elements, windows=True):
    """Pre-activation bounds of every ReLU (list of (l, u)) and their relaxations."""
    n_relu = len(plan.relus)
    if isinstance(method, str):
        if method not in ("crown", "ibp"):
            raise ValueError(f"intermediate must be 'crown', 'ibp' or a collection of ReLU indices, got {method!r}")
        crown_layers = set(range(n_relu)) if method == "crown" else set()
    else:
        crown_layers = {int(k) for k in method}
        if any(not 0 <= k < n_relu for k in crown_layers):
            raise ValueError(f"intermediate ReLU indices {sorted(crown_layers)} out of range for {n_relu} ReLU layers")
    overrides = dict(overrides or {})
    bad = [k for k in overrides if not 0 <= int(k) < n_relu]
    if bad:
        raise ValueError(f"intermediate_overrides has ReLU indices {bad}; the model has {n_relu} ReLU layers")
    c_in, r_in = (upper + lower) / 2, (upper - lower) / 2
    vals: Dict[int, Bounds] = {0: (c_in, r_in)}
    bounds: List[Bounds] = []
    relax: List[_Relaxation] = []
    seen_relu, general = False, 0
    last = plan.relus[-1] if plan.relus else 0
    for i in range(1, last + 1):
        node = plan.nodes[i]
        if not node.rule.is_relu:
            general += 0 if node.rule.diagonal else 1
            if len(node.inputs) == 1:
                c, r, _ = node.rule.interval(*vals[node.inputs[0]])
            else:
                ins = [vals[j] for j in node.inputs]
                c, r, _ = node.rule.interval(tuple(v[0] for v in ins), tuple(v[1] for v in ins))
            vals[i] = (c, r)
            continue
        k, src = plan.relu_index[i], node.inputs[0]
        c, r = vals[src]
        l, u = c - r, c + r
        if k in overrides:
            ol, ou = overrides[k]
            l = torch.maximum(l, ol.to(l))
            u = torch.minimum(u, ou.to(u))
        elif k in crown_layers and (seen_relu or general > 1):
            l, u = _crown_layer_bounds(plan, src, plan.shapes[src], l, u, relax, c_in, r_in, chunk_size,
                                       chunk_elements, windows)
        bounds.append((l, u))
        relax.append(_Relaxation.from_bounds(l, u))
        seen_relu = True
        lo, hi = l.clamp(min=0), u.clamp(min=0)
        vals[i] = ((hi + lo) / 2, (hi - lo) / 2)
    return bounds, relax


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
    plan = _Plan(model, lower.shape[1:])
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
        intermediate: "crown" (full backward pass per ReLU layer, intersected with IBP), "ibp", or
            a collection of ReLU indices whose bounds get a CROWN pass (the others use IBP), e.g.
            ``{n_relu − 1}`` to refine only the (cheap, narrow) last layer on CPU.
        alpha: optional lower ReLU slopes, one entry per ReLU layer (None = CROWN adaptive), each
            broadcastable to (N, S, *neuron_shape); clamped to [0, 1]; used only on unstable neurons,
            only in the final pass (the intermediate bounds always use adaptive slopes).
        intermediate_overrides: {relu_index: (l, u)} fixed/split pre-activation bounds (see module doc).
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
                       infeasible=_infeasible(bounds, lower.shape[0], lower.device))


def alpha_crown_bounds(model: nn.Module, lower: Tensor, upper: Tensor, labels: Optional[Tensor] = None,
                       C: Optional[Tensor] = None, *, iterations: int = 20, lr: float = 0.1,
                       intermediate: Union[str, Iterable[int]] = "crown",
                       intermediate_overrides: Optional[Dict[int, Bounds]] = None,
                       alpha_init: Optional[Sequence[Optional[Tensor]]] = None, return_intermediate: bool = False,
                       chunk_size: Optional[int] = None, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                       deadline: Optional[float] = None,
                       split_signs: Optional[Sequence[Optional[Tensor]]] = None):
    """α-CROWN: CROWN with the lower ReLU slopes α ∈ [0, 1] optimised for the final bound.

    α has one entry per (sample, specification row, ReLU neuron): per ReLU layer a tensor
    (N, S, *neuron_shape), initialised to the CROWN adaptive slopes (or to ``alpha_init``, e.g.
    the :attr:`CrownResult.alpha` of a parent sub-domain, broadcastable to that shape). Adam
    ascends the sum of the bounds (rows are independent, so this ascends each one), followed by
    projection onto [0, 1]. The intermediate bounds are computed once (adaptive slopes) and kept
    fixed. Adam uses β = (0.9, 0.999). The best bound seen for each (sample, row) is kept, so the result is never below
    CROWN with the same intermediate bounds. Gradients are taken w.r.t. α only
    (``torch.autograd.grad``); model parameters are read detached and get no ``.grad``.

    With ``split_signs`` (branch and bound) this is β-CROWN: per ReLU layer k a tensor
    (N, *neuron_shape) with +1 / −1 on neurons split active / inactive in that sub-domain and
    0 elsewhere (or None). Each split gets a multiplier β ≥ 0 per (sample, row), initialised
    to 0 and optimised jointly with α (see :func:`_backward`); the bound is sound for every
    β ≥ 0, and enforcing the splits this way is what makes BaB bounds tighten with depth even
    when the split neuron's interval bounds alone change nothing below it.

    Args: as :func:`crown_bounds`; iterations: number of Adam steps (0 gives CROWN); lr: Adam step;
        deadline: a ``time.perf_counter()`` value after which no further step is taken (the best
        bound so far is returned, still sound), so callers can honour a timeout;
        split_signs: β-CROWN split constraints, one entry per ReLU layer (see above).
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
    c_in, r_in = (upper + lower) / 2, (upper - lower) / 2
    A0, bias0 = A0.detach(), bias0.detach()

    alphas: List[Optional[Tensor]] = []
    for k, rel in enumerate(relax):
        if not bool(rel.unstable.any()):
            alphas.append(None)
            continue
        full = (n, s) + tuple(rel.lower_slope.shape[1:])
        init = rel.lower_slope.unsqueeze(1) if alpha_init is None or alpha_init[k] is None else alpha_init[k]
        alphas.append(init.detach().to(A0).expand(full).clamp(0.0, 1.0).clone().requires_grad_(True))
    betas: Optional[List[Optional[Tensor]]] = None
    signs: Optional[List[Optional[Tensor]]] = None
    if split_signs is not None:
        if len(split_signs) != len(relax):
            raise ValueError(f"split_signs has {len(split_signs)} entries; the model has {len(relax)} ReLU layers")
        betas, signs = [], []
        for k, sg in enumerate(split_signs):
            if sg is None or not bool((sg != 0).any()):
                betas.append(None)
                signs.append(None)
                continue
            sg = sg.to(A0).expand(n, *relax[k].unstable.shape[1:])
            signs.append(sg)
            betas.append(torch.zeros((n, s) + tuple(sg.shape[1:]), dtype=A0.dtype, device=A0.device,
                                     requires_grad=True))
    params = [a for a in alphas if a is not None] + [b for b in (betas or []) if b is not None]

    best = torch.full((n, s), -math.inf, dtype=A0.dtype, device=A0.device)
    best_alpha = [None if a is None else a.detach().clone() for a in alphas]
    # Adam on −Σ lb (written out: torch.optim's first step costs seconds of one-off set-up)
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    beta1, beta2, adam_eps = 0.9, 0.999, 1e-8
    for it in range(iterations + 1):
        with torch.enable_grad():
            # ReLU coefficients for BaB's branching: only the planned last iterate keeps them
            # (holding every layer's A would raise the peak memory of all the other iterations)
            captured: Optional[Dict[int, Tensor]] = \
                {} if return_intermediate and (it == iterations or not params) else None
            A, bias = _backward(plan, plan.start, A0, bias0, relax, alphas, betas, signs, captured)
            lb = _concretize(A, bias, c_in, r_in)
        improved = lb.detach() > best
        best = torch.where(improved, lb.detach(), best)
        for k, a in enumerate(alphas):
            if a is not None:
                mask = improved.view(n, s, *([1] * (a.dim() - 2)))
                best_alpha[k] = torch.where(mask, a.detach(), best_alpha[k])
        if it == iterations or not params or (deadline is not None and time.perf_counter() > deadline):
            if return_intermediate:  # for BaB: the vertex minimising the weakest row's linear bound
                with torch.no_grad():
                    weakest = (torch.arange(n, device=A.device), lb.detach().argmin(1))
                    minimizer = (c_in - A.detach()[weakest].sign() * r_in).clamp(lower, upper)
                    coefficients = None if captured is None else [captured[k][weakest] for k in range(len(relax))]
            break
        grads = torch.autograd.grad(lb.sum(), params)  # ascent direction
        with torch.no_grad():
            for p, g, (m, v) in zip(params, grads, moments):
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                m_hat = m / (1 - beta1 ** (it + 1))
                v_hat = v / (1 - beta2 ** (it + 1))
                p.add_(lr * m_hat / (v_hat.sqrt() + adam_eps))
            for a in alphas:
                if a is not None:
                    a.clamp_(0.0, 1.0)
            for b in betas or []:
                if b is not None:
                    b.clamp_(min=0.0)  # β ≥ 0 keeps the bound sound
        del A, bias, lb
    if not return_intermediate:
        return best
    return CrownResult(lower=best, intermediate=bounds, alpha=best_alpha,
                       infeasible=_infeasible(bounds, n, lower.device), minimizer=minimizer,
                       relu_coefficients=coefficients)


def relu_layer_shapes(model: nn.Module, input_shape: Sequence[int]) -> List[Tuple[int, ...]]:
    """Per-sample neuron shapes of the ReLU layers of the model's graph (the override keys' order)."""
    plan = _Plan(model, tuple(input_shape))
    return [plan.shapes[i] for i in plan.relus]


__all__ = ["CrownResult", "DEFAULT_CHUNK_ELEMENTS", "alpha_crown_bounds", "crown_bounds", "relu_layer_shapes"]
