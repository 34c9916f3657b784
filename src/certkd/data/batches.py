"""Mini-batch iteration: seeded shuffling, rank sharding and crop/flip augmentation.

All randomness of one epoch comes from a single ``torch.Generator`` seeded with
``seed`` and is drawn for the *global* batch (``batch_size * world_size``
points) before it is split between ranks. Hence every rank computes the same
permutation, and the union over ranks of one step is exactly the batch (with
exactly the augmentation) a single process would see with the global batch size.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from .dataset import ImageDataset, to_unit_float

AUGMENTATIONS: tuple[str, ...] = ("none", "crop-flip")


def num_batches(n: int, batch_size: int, drop_last: bool = False, *, world_size: int = 1) -> int:
    """Number of steps :func:`iterate_batches` yields for ``n`` points.

    With ``world_size > 1`` a step consumes ``batch_size * world_size`` points,
    so this is also the number of steps every rank takes.
    """
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size}, {world_size}")
    step = batch_size * world_size
    return n // step if drop_last else math.ceil(n / step)


def crop_flip(x: torch.Tensor, flip: torch.Tensor, offsets: torch.Tensor, padding: int) -> torch.Tensor:
    """Horizontal flip, then edge (replicate) padding and a crop back to H×W, per sample.

    Equivalent to ``F.pad(x.flip(-1) if flip else x, (p,)*4, mode="replicate")[:, oy:oy+H, ox:ox+W]``
    for each sample, but done as one gather: edge padding followed by a crop is
    the same as reading the source at clamped coordinates, so no padded copy is made.

    Args:
        x: (B, C, H, W), any dtype.
        flip: (B,) bool, True = mirror left-right.
        offsets: (B, 2) int64 ``(oy, ox)`` crop origin in the padded image, each in ``[0, 2*padding]``;
            ``(padding, padding)`` is the identity crop.
        padding: pixels of edge padding on each side.
    Returns:
        (B, C, H, W), same dtype and device as ``x``.
    """
    b, c, h, w = x.shape
    dev = x.device
    flip = flip.to(dev)
    offsets = offsets.to(dev)
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = (offsets[:, 0:1] - padding + ar_h).clamp_(0, h - 1)          # (B, H)
    cols = (offsets[:, 1:2] - padding + ar_w).clamp_(0, w - 1)          # (B, W), in flipped coords
    cols = torch.where(flip[:, None], (w - 1) - cols, cols)             # back to source coords
    flat = (rows[:, :, None] * w + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return x.reshape(b, c, h * w).gather(2, flat).reshape(b, c, h, w)


def iterate_batches(
    dataset: ImageDataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int | None = None,
    augmentation: str = "none",
    crop_padding: int = 0,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches for one epoch.

    Args:
        dataset: the data; ``len(dataset) == N``.
        batch_size: per-rank batch size B.
        shuffle: visit points in a random permutation (else in stored order).
        seed: seeds the epoch's ``torch.Generator`` (the trainer passes
            ``base_seed * 1000 + epoch`` so a resumed run reproduces the order);
            None draws a fresh random seed (not allowed with ``world_size > 1``,
            where ranks must agree on the order).
        augmentation: "none" or "crop-flip" (random h-flip with p=0.5, then a random
            H×W crop of the image edge-padded by ``crop_padding`` px).
        drop_last: drop the final incomplete global batch.
        rank, world_size: this process's shard. Each global batch of ``B * world_size``
            consecutive points of the (shuffled) order is split as ``chunk[rank::world_size]``.
            Without ``drop_last`` the final shard may be smaller, even empty (shape
            ``(0, C, H, W)``): it is still yielded so that every rank takes the same
            number of steps; distributed training normally uses ``drop_last=True``.
        device: where the yielded tensors live; augmentation runs there. For a CUDA device the
            uint8 batch is gathered on the CPU, pinned and copied with ``non_blocking=True``, so
            the host-to-device copy (4× smaller than float32) overlaps the GPU's work.
    Yields:
        x: (b, C, H, W) float32 in [0, 1] on ``device``; y: (b,) int64 on ``device``; b <= B.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, got {augmentation!r}")
    if crop_padding < 0:
        raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
    augment = augmentation == "crop-flip"
    if seed is None and world_size > 1 and (shuffle or augment):
        raise ValueError("iterate_batches with world_size > 1 needs an explicit seed shared by all ranks")

    device = torch.device(device)
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))

    # Only a CPU-resident dataset copied to CUDA gains from pinning; on CPU nothing changes.
    pin = device.type == "cuda" and dataset.images.device.type == "cpu" and torch.cuda.is_available()
    n = len(dataset)
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    step = batch_size * world_size
    for start in range(0, num_batches(n, batch_size, drop_last, world_size=world_size) * step, step):
        chunk = order[start:start + step]
        m = chunk.shape[0]
        if augment:
            # Drawn for the whole global chunk so the result does not depend on world_size.
            flip = torch.rand(m, generator=gen) < 0.5
            offsets = torch.randint(0, 2 * crop_padding + 1, (m, 2), generator=gen)
        idx = chunk[rank::world_size]
        x, y = dataset.images[idx], dataset.labels[idx]   # gathered on the CPU, still uint8
        if pin:  # page-locked staging buffers (cached by torch) make the copies below truly asynchronous
            x, y = x.pin_memory(), y.pin_memory()
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if augment:
            # Gather on the stored dtype (uint8 when possible): 4× less memory traffic.
            x = crop_flip(x, flip[rank::world_size], offsets[rank::world_size], crop_padding)
        yield to_unit_float(x), y
