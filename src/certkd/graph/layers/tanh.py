"""Tanh: the S-shaped tangent/chord relaxation of ``layers/s_shaped.py``; not splittable, no MILP."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from certkd.graph.layers.base import register
from certkd.graph.layers.s_shaped import SShaped


@register
class Tanh(SShaped):
    module_types = (nn.Tanh,)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x)

    def derivative(self, z: Tensor) -> Tensor:
        t = torch.tanh(z)
        return 1 - t * t

    def evaluate(self, z: np.ndarray) -> np.ndarray:
        return np.tanh(z)
