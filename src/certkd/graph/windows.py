"""Receptive-field windows for CROWN's intermediate conv bounds (auto_LiRPA's "patches" idea).

Going backward from a single conv neuron, its coefficients are non-zero only on its receptive
field. Rows are kept as windows A (N, P, G, C, py, px): P spatial positions of the bounded
layer, G rows per position, with per-position top-left offsets (oy, ox) in the current layer
(a window may stick out of the image; A is kept zero there). Layer rules act on a
:class:`Window` through ``Layer.window`` (see ``docs/adding_a_layer.md``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import Tensor


@dataclass
class Window:
    """A: (N, P, G, C, py, px) coefficients; bias (N, P, G); oy, ox (P,) top-left offsets."""

    A: Tensor
    bias: Tensor
    oy: Tensor
    ox: Tensor


def win_index(o: Tensor, size_win: int, size: int) -> Tuple[Tensor, Tensor]:
    pos = o[:, None] + torch.arange(size_win, device=o.device)  # (P, w)
    return pos.clamp(0, size - 1), (pos >= 0) & (pos < size)


def win_gather(t: Tensor, oy: Tensor, ox: Tensor, py: int, px: int) -> Tensor:
    """t (N, C, H, W) read at P windows -> (N, P, 1, C, py, px), zero outside the image."""
    h, w = t.shape[-2:]
    ys, vy = win_index(oy, py, h)
    xs, vx = win_index(ox, px, w)
    g = t[:, :, ys[:, :, None], xs[:, None, :]]  # (N, C, P, py, px)
    g = g * (vy[:, :, None] & vx[:, None, :]).to(t.dtype)
    return g.transpose(1, 2).unsqueeze(2)


def win_valid(oy: Tensor, ox: Tensor, py: int, px: int, h: int, w: int, dtype) -> Tensor:
    _, vy = win_index(oy, py, h)
    _, vx = win_index(ox, px, w)
    return (vy[:, :, None] & vx[:, None, :]).to(dtype)[None, :, None, None]  # (1, P, 1, 1, py, px)


def win_to_dense(A: Tensor, oy: Tensor, ox: Tensor, h: int, w: int) -> Tensor:
    """(N, P, G, C, py, px) windows -> dense (N, P·G, C, h, w) (A is zero outside the image)."""
    n, p, g, c, py, px = A.shape
    ys, _ = win_index(oy, py, h)
    xs, _ = win_index(ox, px, w)
    dense = A.new_zeros(p, h, w, n, g, c)
    rows = torch.arange(p, device=A.device)[:, None, None]
    dense.index_put_((rows, ys[:, :, None], xs[:, None, :]), A.permute(1, 4, 5, 0, 2, 3), accumulate=True)
    return dense.permute(3, 0, 4, 5, 1, 2).reshape(n, p * g, c, h, w)
