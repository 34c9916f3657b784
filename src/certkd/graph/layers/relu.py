"""ReLU. Interval rule here; CROWN's triangle relaxation and the MILP's big-M encoding depend on
the pre-activation bounds and live in the engines (``bounds/crown.py``, ``verification/milp.py``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from certkd.graph.layers.base import Layer, register


def _grad_through(*ts: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


@register
class ReLU(Layer):
    module_types = (nn.ReLU,)
    diagonal = True
    is_relu = True
    exact_lipschitz = 1.0  # max(x, 0) rounds nothing, and |relu(a) - relu(b)| <= |a - b|

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x)

    def interval(self, c: Tensor, r: Tensor, p: Optional[Tensor] = None):
        # upper, lower = relu(c ± r); centre/radius = (upper ± lower) / 2 (·0.5 is exact, as /2).
        # Fresh temporaries are modified in place; c and r are kept (the recorded pre-activations),
        # and relu's saved output is left intact when autograd records.
        upper = torch.add(c, r).relu_()
        lower = torch.sub(c, r).relu_()
        center = torch.add(upper, lower).mul_(0.5)
        radius = (torch.sub(upper, lower) if _grad_through(upper, lower) else upper.sub_(lower)).mul_(0.5)
        return center, radius, (torch.relu(p) if p is not None else None)
