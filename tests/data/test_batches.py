"""Batch iteration: coverage, seeding, sharding and crop/flip augmentation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from certkd.data import ImageDataset, crop_flip, iterate_batches, num_batches


def indexed_dataset(n: int, size: int = 6, channels: int = 3) -> ImageDataset:
    """Label i; image i is random uint8 except pixel [0, 0, 0] == i % 256 (to check x/y stay aligned)."""
    g = torch.Generator().manual_seed(123)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return ImageDataset(images, torch.arange(n))


def labels_of(batches) -> list[list[int]]:
    return [y.tolist() for _, y in batches]


def test_num_batches() -> None:
    assert num_batches(103, 10) == 11 and num_batches(103, 10, drop_last=True) == 10
    assert num_batches(100, 10) == 10 and num_batches(100, 10, True) == 10
    assert num_batches(103, 10, world_size=2) == 6 and num_batches(103, 10, True, world_size=2) == 5


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_index_once(shuffle: bool) -> None:
    ds = indexed_dataset(103)
    batches = list(iterate_batches(ds, 10, shuffle=shuffle, seed=5))
    assert len(batches) == num_batches(103, 10) == 11
    assert [len(y) for _, y in batches] == [10] * 10 + [3]
    ys = torch.cat([y for _, y in batches])
    assert sorted(ys.tolist()) == list(range(103))
    assert (ys.tolist() == list(range(103))) is (not shuffle)
    for x, y in batches:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(x, ds.images[y].float() / 255)   # images follow their labels
    dropped = list(iterate_batches(ds, 10, shuffle=shuffle, seed=5, drop_last=True))
    assert len(dropped) == 10 and all(len(y) == 10 for _, y in dropped)


def test_seeded_order() -> None:
    ds = indexed_dataset(50)
    a = labels_of(iterate_batches(ds, 8, shuffle=True, seed=1000))
    b = labels_of(iterate_batches(ds, 8, shuffle=True, seed=1000))
    c = labels_of(iterate_batches(ds, 8, shuffle=True, seed=1001))
    assert a == b and a != c
    # The order is the generator's permutation, so resumes can reproduce it exactly.
    assert sum(a, []) == torch.randperm(50, generator=torch.Generator().manual_seed(1000)).tolist()


def test_augmentation_shape_range_and_determinism() -> None:
    ds = indexed_dataset(40, size=8)
    kw = dict(shuffle=True, seed=3, augmentation="crop-flip", crop_padding=2)
    a = list(iterate_batches(ds, 16, **kw))
    b = list(iterate_batches(ds, 16, **kw))
    plain = list(iterate_batches(ds, 16, shuffle=True, seed=3))
    changed = 0
    for (xa, ya), (xb, yb), (xp, yp) in zip(a, b, plain):
        assert xa.shape == xp.shape and xa.dtype == torch.float32
        assert 0.0 <= xa.min() and xa.max() <= 1.0
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ya, yp)
        changed += int((xa != xp).flatten(1).any(1).sum())
    assert changed > 20  # most of the 40 samples got flipped and/or shifted


def test_augmentation_without_padding_is_flip_only() -> None:
    ds = indexed_dataset(64)
    (x, y), = iterate_batches(ds, 64, shuffle=False, seed=0, augmentation="crop-flip", crop_padding=0)
    ref = ds.images.float() / 255
    same = (x == ref).flatten(1).all(1)
    flipped = (x == ref.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all())
    assert 15 < int(flipped.sum()) < 49  # p = 0.5 over 64 draws (fixed seed; far from the tails)


def test_crop_flip_matches_edge_padding_reference() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, 7, 7, generator=g)
    p = 3
    flip = torch.rand(12, generator=g) < 0.5
    offsets = torch.randint(0, 2 * p + 1, (12, 2), generator=g)
    out = crop_flip(x, flip, offsets, p)
    for i in range(12):
        src = x[i].flip(-1) if flip[i] else x[i]
        padded = F.pad(src[None], (p, p, p, p), mode="replicate")[0]
        oy, ox = offsets[i].tolist()
        assert torch.equal(out[i], padded[:, oy:oy + 7, ox:ox + 7])


def test_crop_shift_reproduces_edge_values() -> None:
    x = torch.arange(16, dtype=torch.uint8).reshape(1, 1, 4, 4)
    no = torch.tensor([False])
    # Origin (4, 2) with padding 2 = shift down by 2: rows 2, 3, then the last row repeated.
    out = crop_flip(x, no, torch.tensor([[4, 2]]), 2)
    assert out[0, 0].tolist() == [[8, 9, 10, 11], [12, 13, 14, 15], [12, 13, 14, 15], [12, 13, 14, 15]]
    # Origin (2, 0) = shift right by 2: the first column repeated at the left edge.
    out = crop_flip(x, no, torch.tensor([[2, 0]]), 2)
    assert out[0, 0].tolist() == [[0, 0, 0, 1], [4, 4, 4, 5], [8, 8, 8, 9], [12, 12, 12, 13]]
    assert torch.equal(crop_flip(x, no, torch.tensor([[2, 2]]), 2), x)
    assert torch.equal(crop_flip(x, torch.tensor([True]), torch.tensor([[2, 2]]), 2), x.flip(-1))


@pytest.mark.parametrize("n", [23, 21])
@pytest.mark.parametrize("augmentation", ["none", "crop-flip"])
def test_sharding_partitions_global_batches(n: int, augmentation: str) -> None:
    ds = indexed_dataset(n)
    kw = dict(shuffle=True, seed=7, augmentation=augmentation, crop_padding=2)
    global_batches = list(iterate_batches(ds, 10, **kw))
    shards = [list(iterate_batches(ds, 5, rank=r, world_size=2, **kw)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(global_batches) == num_batches(n, 5, world_size=2) == 3
    for (xg, yg), (x0, y0), (x1, y1) in zip(global_batches, *shards):
        assert set(y0.tolist()).isdisjoint(y1.tolist())
        assert sorted(y0.tolist() + y1.tolist()) == sorted(yg.tolist())
        # Interleaved: rank r holds global positions r, r+2, ...; augmentation matches too.
        assert torch.equal(y0, yg[0::2]) and torch.equal(y1, yg[1::2])
        assert torch.equal(x0, xg[0::2]) and torch.equal(x1, xg[1::2])
    # n=21: the last global batch has one point, so rank 1's last shard is empty (same step count).
    assert len(shards[1][-1][1]) == (1 if n == 23 else 0)
    assert shards[1][-1][0].shape[1:] == (3, 6, 6)


def test_float_dataset_and_argument_checks() -> None:
    ds = ImageDataset(torch.rand(10, 1, 4, 4), torch.arange(10))
    (x, y), = iterate_batches(ds, 10, shuffle=False, device="cpu")
    assert torch.equal(x, ds.images) and torch.equal(y, ds.labels)
    with pytest.raises(ValueError, match="augmentation"):
        next(iterate_batches(ds, 4, shuffle=False, augmentation="flip"))
    with pytest.raises(ValueError, match="rank"):
        next(iterate_batches(ds, 4, shuffle=False, rank=2, world_size=2))
    with pytest.raises(ValueError, match="explicit seed"):
        next(iterate_batches(ds, 4, shuffle=True, world_size=2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_match_cpu_batches() -> None:
    """Pinned, non-blocking copies to CUDA give exactly the CPU batches (same order and augmentation)."""
    ds = ImageDataset(torch.randint(0, 256, (37, 3, 8, 8), dtype=torch.uint8), torch.arange(37))
    kw = dict(shuffle=True, seed=3, augmentation="crop-flip", crop_padding=2)
    cpu = list(iterate_batches(ds, 8, **kw))
    gpu = list(iterate_batches(ds, 8, device="cuda", **kw))
    assert len(cpu) == len(gpu)
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert xg.is_cuda and yg.is_cuda
        assert torch.equal(xc, xg.cpu()) and torch.equal(yc, yg.cpu())
