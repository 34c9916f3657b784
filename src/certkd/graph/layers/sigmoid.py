"""Sigmoid: the S-shaped tangent/chord relaxation of ``layers/s_shaped.py``; not splittable, no MILP."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from certkd.graph.layers.base import register
from certkd.graph.layers.s_shaped import SShaped


@register
class Sigmoid(SShaped):
    module_types = (nn.Sigmoid,)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sigmoid(x)

    def derivative(self, z: Tensor) -> Tensor:
        s = torch.sigmoid(z)
        return s * (1 - s)

    def evaluate(self, z: np.ndarray) -> np.ndarray:
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for large |z|
