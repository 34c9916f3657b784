"""The logit-difference specification C(y) (docs/method.md §1).

Row k of C(y) is e_y − e_{j_k}, with j_k running over the classes ≠ y in increasing order,
so d = C z has entries z_y − z_j. Positive d everywhere on the box means "robust".
"""
from __future__ import annotations

import torch


def other_classes(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Indices j ≠ y in increasing order. labels (N,) -> (N, K−1) int64."""
    idx = torch.arange(num_classes - 1, device=labels.device).expand(labels.shape[0], -1)
    return idx + (idx >= labels.unsqueeze(1)).long()


def drop_label_column(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, K) -> (N, K−1): remove column y of each row, keeping the order of the others."""
    return values.gather(1, other_classes(labels, values.shape[1]))


def logit_differences(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """d = C(y) z: (N, K) logits -> (N, K−1) differences z_y − z_j."""
    return logits.gather(1, labels.unsqueeze(1)) - drop_label_column(logits, labels)


def specification_matrix(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C(y) as a dense tensor: (N,) -> (N, K−1, K)."""
    n = labels.shape[0]
    eye = torch.eye(num_classes, device=labels.device)
    return eye[labels].unsqueeze(1) - eye[other_classes(labels, num_classes)].view(n, num_classes - 1, num_classes)
