"""Tests for certkd.bounds.spec: the logit-difference specification C(y) (docs/method.md §1)."""
from __future__ import annotations

import pytest
import torch

from certkd.bounds.spec import drop_label_column, logit_differences, other_classes, specification_matrix


def test_other_classes_exact_order():
    labels = torch.tensor([0, 2, 4, 3])
    expected = torch.tensor([[1, 2, 3, 4],
                             [0, 1, 3, 4],
                             [0, 1, 2, 3],
                             [0, 1, 2, 4]])
    got = other_classes(labels, 5)
    assert got.dtype == torch.int64
    assert torch.equal(got, expected)


def test_other_classes_two_classes():
    assert torch.equal(other_classes(torch.tensor([0, 1, 1]), 2), torch.tensor([[1], [0], [0]]))


@pytest.mark.parametrize("k", [2, 3, 10])
def test_other_classes_excludes_label_and_is_increasing(k):
    labels = torch.arange(k)
    oc = other_classes(labels, k)
    assert oc.shape == (k, k - 1)
    for y in range(k):
        assert oc[y].tolist() == [j for j in range(k) if j != y]


def test_drop_label_column_exact():
    values = torch.tensor([[10., 11., 12., 13.],
                           [20., 21., 22., 23.],
                           [30., 31., 32., 33.]])
    labels = torch.tensor([0, 2, 3])
    expected = torch.tensor([[11., 12., 13.],
                             [20., 21., 23.],
                             [30., 31., 32.]])
    assert torch.equal(drop_label_column(values, labels), expected)


def test_logit_differences_exact():
    z = torch.tensor([[1.0, 3.0, -2.0],
                      [0.5, 0.0, 4.0]])
    y = torch.tensor([1, 2])
    expected = torch.tensor([[3.0 - 1.0, 3.0 + 2.0],
                             [4.0 - 0.5, 4.0 - 0.0]])
    assert torch.equal(logit_differences(z, y), expected)


def test_specification_matrix_rows():
    c = specification_matrix(torch.tensor([1]), 3)
    # row k is e_y - e_{j_k}: e_1 - e_0 and e_1 - e_2
    expected = torch.tensor([[[-1., 1., 0.],
                              [0., 1., -1.]]])
    assert torch.equal(c, expected)


@pytest.mark.parametrize("k", [2, 10])
def test_logit_differences_match_specification_matrix(k):
    g = torch.Generator().manual_seed(k)
    z = torch.randn(16, k, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (16,), generator=g)
    c = specification_matrix(y, k).to(z.dtype)
    assert c.shape == (16, k - 1, k)
    via_matrix = torch.einsum("nkj,nj->nk", c, z)
    torch.testing.assert_close(logit_differences(z, y), via_matrix, rtol=0, atol=1e-12)
    # every row has exactly one +1 (at y) and one -1, and sums to zero
    assert torch.equal((c == 1).sum(-1), torch.ones(16, k - 1, dtype=torch.long))
    assert torch.equal(c.sum(-1), torch.zeros(16, k - 1, dtype=c.dtype))
    assert torch.equal(c.argmax(-1), y.unsqueeze(1).expand(-1, k - 1))
