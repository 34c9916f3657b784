"""Intermediate (pre-activation) bounds for CROWN (docs/method.md §10.1): IBP layer by layer, tightened
by CROWN passes (dense rows, or receptive-field windows for conv layers), with overrides.

See the module notes of :mod:`certkd.bounds.crown` ("Intermediate (pre-activation) bounds" and
the cost controls) for what is computed; each activation's rule gives its relaxation and its
output box; :func:`_intermediate` is the entry point.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch
from torch import Tensor

from certkd.bounds.crown_backward import Bounds, _backward, _concretize, _Plan
from certkd.graph.layers import Relaxation
from certkd.graph.windows import Window, win_gather, win_to_dense


# --------------------------------------------------------------------------------------------
# Windowed ("patches") backward pass for intermediate bounds of conv layers (certkd.graph.windows):
# each node's rule class acts on the windows; relaxations/the input box are read at the window. When a
# window covers the whole layer, or a node has no window rule (or several inputs), the windows
# are scattered into a dense tensor and the pass continues densely.
# --------------------------------------------------------------------------------------------

def _window_lower(plan: _Plan, src: int, shape, positions, n, relax, c_in, r_in) -> Tuple[Tensor, Tensor]:
    """CROWN bounds of every channel of the conv neurons at spatial ``positions`` (flat h·W+w) of
    the output of node ``src`` (shape (C, H, W)), by receptive-field windows.

    Rows are grouped by position (A is (N, P, G, C, py, px) with G rows per position), so the
    per-position values that relaxations/BN/the input box contribute are read once per position.
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
        k = plan.act_index.get(j)
        if k is not None and not doubled:
            # Affine layers so far act identically on the rows for the lower (+z) and upper (−z)
            # bound: propagate +z alone up to the first activation, then negate.
            win = Window(torch.cat([win.A, -win.A], 2), torch.cat([win.bias, -win.bias], 2), win.oy, win.ox)
            doubled = True
        in_shape = plan.shapes[node.inputs[0]]
        if len(node.inputs) != 1 or len(in_shape) != 3 or win.A.shape[-2] >= size[0] or win.A.shape[-1] >= size[1]:
            break  # a window covering the whole layer: continue densely
        if k is not None:
            win = relax[k].window(win)
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
    while first > 0 and first not in plan.act_index and len(plan.nodes[first].inputs) == 1:
        (A,), bias = plan.nodes[first].rule.backward(A, bias, plan.in_shapes(first), plan.shapes[first])
        first = plan.nodes[first].inputs[0]
    A, bias = torch.cat([A, -A], 1), torch.cat([bias, -bias], 1)
    A, bias = _backward(plan, first, A, bias, relax)
    lb = _concretize(A, bias, c_in, r_in)
    return lb[:, :k], -lb[:, k:]


def _crown_layer_bounds(plan: _Plan, src: int, shape, l, u, relax, c_in, r_in, chunk_size, chunk_elements,
                        windows=True, loose=None):
    """Tighten (l, u) (N, *shape) of the output of node ``src`` by CROWN, on the neurons ``loose``
    (bool (N, *shape): where the activation's relaxation is not exact; None: every neuron with l < u).

    Conv layers use receptive-field windows and bound all channels at each spatial position that
    has a loose neuron; other layers use dense rows.
    """
    n = l.shape[0]
    unstable = l < u if loose is None else loose
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
    """Pre-activation bounds of every activation (list of (l, u)) and their relaxations."""
    n_act = len(plan.acts)
    if isinstance(method, str):
        if method not in ("crown", "ibp"):
            raise ValueError(f"intermediate must be 'crown', 'ibp' or a collection of activation indices, got "
                             f"{method!r}")
        crown_layers = set(range(n_act)) if method == "crown" else set()
    else:
        crown_layers = {int(k) for k in method}
        if any(not 0 <= k < n_act for k in crown_layers):
            raise ValueError(f"intermediate activation indices {sorted(crown_layers)} out of range for {n_act} "
                             "activation layers")
    overrides = dict(overrides or {})
    bad = [k for k in overrides if not 0 <= int(k) < n_act]
    if bad:
        raise ValueError(f"intermediate_overrides has activation indices {bad}; the model has {n_act} activation "
                         "layers")
    c_in, r_in = (upper + lower) / 2, (upper - lower) / 2
    vals: Dict[int, Bounds] = {0: (c_in, r_in)}
    bounds: List[Bounds] = []
    relax: List[Relaxation] = []
    seen_act, general = False, 0
    last = plan.acts[-1] if plan.acts else 0
    for i in range(1, last + 1):
        node = plan.nodes[i]
        if i not in plan.act_index:
            general += 0 if node.rule.diagonal else 1
            if len(node.inputs) == 1:
                c, r, _ = node.rule.interval(*vals[node.inputs[0]])
            else:
                ins = [vals[j] for j in node.inputs]
                c, r, _ = node.rule.interval(tuple(v[0] for v in ins), tuple(v[1] for v in ins))
            vals[i] = (c, r)
            continue
        k, src, rule = plan.act_index[i], node.inputs[0], node.rule
        c, r = vals[src]
        l, u = c - r, c + r
        if k in overrides:
            ol, ou = overrides[k]
            l = torch.maximum(l, ol.to(l))
            u = torch.minimum(u, ou.to(u))
        elif k in crown_layers and (seen_act or general > 1):
            l, u = _crown_layer_bounds(plan, src, plan.shapes[src], l, u, relax, c_in, r_in, chunk_size,
                                       chunk_elements, windows, rule.loose(l, u))
        bounds.append((l, u))
        relax.append(rule.relax(l, u))
        seen_act = True
        lo, hi = rule.post_box(l, u)
        vals[i] = ((hi + lo) / 2, (hi - lo) / 2)
    return bounds, relax
