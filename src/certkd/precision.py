"""Numeric precision of training and verification: TF32 flags and mixed precision (AMP).

* **TF32 off by default.** On Ampere+ GPUs TF32 matmuls/convolutions round inputs to 10
  mantissa bits; IBP and CROWN bounds computed that way are not sound bounds of the float32
  network, and bound-based losses then train against the wrong quantity. Training turns TF32
  off unless ``allow_tf32: true`` (``--tf32``), which speeds up CNN training on A100/H100 at
  the cost of looser-than-computed bounds during training only: the periodic evaluation and
  ``certkd verify`` always run with TF32 off. :func:`tf32` sets both
  ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32`` and
  restores the previous values on exit (PyTorch's own default has cuDNN TF32 *on*).
* **AMP never touches a bound.** ``amp: true`` runs the forward passes of ``standard``,
  ``pgd-at`` and ``trades`` under ``torch.autocast`` in bfloat16 (the same exponent range as
  float32, so no gradient scaler is needed). For certified and distillation methods it covers the
  training attack only (:class:`certkd.attacks.PGD` ``amp``), which just proposes a point in the
  box; the IBP/CROWN pass, the loss and the teacher stay in float32, since bounds in reduced
  precision are not sound (docs/performance.md states the measured change of the loss curve).
  It applies on CUDA and on CPU (where bfloat16 is fast only on CPUs with native support).
* **A network's own precision** (:func:`network_dtype`): verification runs a float64 network in
  float64 and refuses half precision (``docs/verify_onnx.md`` §5).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Tuple

import torch
from torch import nn

from certkd.errors import CertkdError


def tf32_flags() -> Tuple[bool, bool]:
    """(matmul, cudnn) TF32 flags as currently set."""
    return bool(torch.backends.cuda.matmul.allow_tf32), bool(torch.backends.cudnn.allow_tf32)


def set_tf32_flags(matmul: bool, cudnn: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = bool(matmul)
    torch.backends.cudnn.allow_tf32 = bool(cudnn)


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Set both TF32 flags to ``enabled`` inside the block; restore the previous values after."""
    saved = tf32_flags()
    set_tf32_flags(enabled, enabled)
    try:
        yield
    finally:
        set_tf32_flags(*saved)


def autocast(enabled: bool, device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``device`` (CUDA or CPU) when ``enabled``; a no-op otherwise."""
    if enabled and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def network_dtype(net: nn.Module) -> torch.dtype:
    """The floating-point type ``net`` computes in: its parameters' and buffers' (they win over an ONNX
    model's declared ``onnx_dtype``, which goes stale after ``net.float()``), else that, else float32.

    Raises CertkdError for mixed or unsupported (half-precision) types.
    """
    kinds = {t.dtype for t in list(net.parameters()) + list(net.buffers()) if t.is_floating_point()}
    if not kinds:  # no floating tensors (a ReLU/reshape graph): the ONNX input's declared type, if any
        return getattr(net, "onnx_dtype", None) or torch.float32
    if len(kinds) > 1:
        raise CertkdError(f"the network mixes {', '.join(sorted(str(k).replace('torch.', '') for k in kinds))} "
                          "tensors; convert it to one precision (model.float() or model.double())")
    kind = kinds.pop()
    if kind not in (torch.float32, torch.float64):
        raise CertkdError(f"{str(kind).replace('torch.', '')} networks are not supported: bounds in half "
                          "precision are not sound; convert the model with model.float() (or to float32 ONNX)")
    return kind
