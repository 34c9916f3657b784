"""Small layers shared by the model zoo."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``; the first layer of every certkd model.

    Keeping normalisation inside the model means inputs, ε and boxes are always in
    pixel units [0, 1]. Shape: (N, C, *) -> (N, C, *).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32))

    def _view(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return t.view(1, -1, *([1] * (x.dim() - 2))) if x.dim() > 2 else t.view(1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self._view(self.mean, x)) / self._view(self.std, x)

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"


class Residual(nn.Module):
    """y = shortcut(x) + body(x) (``shortcut`` defaults to the identity): a residual block.

    Every engine handles it through :mod:`certkd.graph` (a DAG with an Add node).
    Shape: (N, *) -> (N, *), body and shortcut must produce the same shape.
    """

    def __init__(self, body: nn.Module, shortcut: Optional[nn.Module] = None):
        super().__init__()
        self.body = body
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.body(x)
