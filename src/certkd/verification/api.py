"""The Python entry points of verification: :func:`verify_model` and :func:`verify_instance`
(``docs/verify_onnx.md``).

Everything a caller passes is checked here, before any engine runs, and a mistake raises
:class:`~certkd.errors.CertkdError` with one sentence naming it and the fix: bounds of different
shapes, a lower bound above the upper one, NaN bounds, a batch dimension, a size the model does
not take, an empty or malformed specification, a half-precision model, BatchNorm without running
statistics. The caller's model is never changed: it is verified through a deep copy in eval mode,
so its training flags and BatchNorm statistics stay as they were.
"""
from __future__ import annotations

import copy
import os
import time
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from certkd.errors import CertkdError
from certkd.graph.network import Network
from certkd.precision import network_dtype
from certkd.verification.onnx_verify import VerifyResult, verify_network
from certkd.verification.vnnlib import (ParseTimeout, Property, matrix_property, read_property,
                                        robustness_property)


def _is_path(x) -> bool:
    return isinstance(x, (str, bytes)) or hasattr(x, "__fspath__")


def _as_array(t, what: str) -> np.ndarray:
    """A bound as a float64 array (any shape); one-line errors for what is not numeric."""
    try:
        a = np.asarray(t.detach().cpu().double().numpy() if isinstance(t, torch.Tensor) else t, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise CertkdError(f"{what} must be a tensor or array of numbers ({e}); pass e.g. torch.zeros(784)") from None
    return a


def check_box(lower, upper) -> Tuple[np.ndarray, np.ndarray]:
    """lower, upper -> float64 arrays of the same shape with lower <= upper and no NaN (one-line errors)."""
    lo, hi = _as_array(lower, "lower"), _as_array(upper, "upper")
    if lo.shape != hi.shape:
        raise CertkdError(f"lower has shape {lo.shape} but upper {hi.shape}; pass bounds of the same shape")
    if lo.size == 0:
        raise CertkdError("the input box is empty (no coordinates); pass bounds of the model's input shape")
    if np.isnan(lo).any() or np.isnan(hi).any():
        raise CertkdError("the input box has NaN bounds; pass finite (or ±inf) numbers")
    bad = np.nonzero((lo > hi).reshape(-1))[0]
    if len(bad):
        i = int(bad[0])
        raise CertkdError(f"the input box is empty: lower > upper at coordinate {i} ({float(lo.reshape(-1)[i])!r} > "
                          f"{float(hi.reshape(-1)[i])!r}); pass lower <= upper")
    return lo, hi


def _check_module(model: nn.Module) -> None:
    """Refuse what no engine can verify soundly, before copying anything."""
    network_dtype(model)  # half precision or mixed types: one line
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.running_mean is None or m.running_var is None):
            raise CertkdError(f"{type(m).__name__} '{name or type(m).__name__}' has no running statistics "
                              "(track_running_stats=False), so its output depends on the batch; verify a model "
                              "whose BatchNorm layers track running statistics")


def _module_network(model: nn.Module, lo: np.ndarray, input_shape: Optional[Sequence[int]]
                    ) -> Tuple[Network, nn.Module, Tuple[int, ...]]:
    """(graph of a private eval copy, that copy, per-sample input shape), checking the shape runs."""
    from certkd.graph import from_module

    _check_module(model)
    shape = tuple(int(s) for s in input_shape) if input_shape is not None else tuple(lo.shape)
    if int(np.prod(shape)) != lo.size:
        raise CertkdError(f"the box has {lo.size} coordinates but input_shape {shape} has {int(np.prod(shape))}; "
                          "pass bounds of one sample's shape")
    private = copy.deepcopy(model).eval()
    dtype = network_dtype(private)
    try:
        with torch.no_grad():
            out = private(torch.zeros((1,) + shape, dtype=dtype))
    except Exception as e:
        if len(shape) > 1 and _runs(private, shape[1:], dtype):
            raise CertkdError(f"lower/upper have shape {shape}, a batch of {shape[0]} samples of shape {shape[1:]}; "
                              "verify_model takes one sample's bounds: verify one sample at a time") from None
        raise CertkdError(f"the model does not take one sample of shape {shape} "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); pass lower/upper of one "
                          "sample's shape, without a batch dimension") from None
    if not isinstance(out, torch.Tensor):
        raise CertkdError(f"the model returns {type(out).__name__}, not one tensor; verify a model with one output")
    if out.dim() > 2 and len(shape) > 1 and out.shape[1] == shape[0] and shape[0] > 1:
        raise CertkdError(f"the model maps one sample of shape {shape} to outputs of shape {tuple(out.shape[1:])}: "
                          f"lower/upper look like a batch of {shape[0]}; verify one sample at a time")
    return from_module(private), private, shape


def _runs(model: nn.Module, shape: Tuple[int, ...], dtype: torch.dtype) -> bool:
    try:
        with torch.no_grad():
            model(torch.zeros((1,) + tuple(shape), dtype=dtype))
        return True
    except Exception:
        return False


def _property(spec, lo: np.ndarray, hi: np.ndarray, k: int, given_box: bool) -> Property:
    """The property of ``spec`` (label, matrix or Property) on the box, over ``k`` outputs."""
    if isinstance(spec, Property):
        if not given_box:
            return spec
        if lo.size != spec.lower.size:
            raise CertkdError(f"lower has {lo.size} coordinates but the property's box {spec.lower.size}; pass "
                              "bounds of the property's input size, or lower=upper=None to use its box")
        return Property(lo.reshape(-1), hi.reshape(-1), spec.disjuncts, spec.num_outputs, spec.source)
    if isinstance(spec, (bool, np.bool_)):
        raise CertkdError("spec must be a label (int), a matrix C (S, K) or a VNN-LIB Property, not a bool")
    if isinstance(spec, (int, np.integer)) or (isinstance(spec, torch.Tensor) and spec.dim() == 0
                                               and not spec.is_floating_point()):
        label = int(spec)
        if not 0 <= label < k:
            raise CertkdError(f"label {label} out of range for {k} outputs; pass a label in 0..{k - 1}")
        return robustness_property(lo.reshape(-1), hi.reshape(-1), label, k)
    if spec is None:
        raise CertkdError("verify_model needs a spec: a label (int), a matrix C (S, K) or a VNN-LIB property")
    C = _as_array(spec, "spec")
    if C.ndim != 2:
        raise CertkdError(f"spec has shape {C.shape}: pass a label (int), a matrix C (S, K) or a VNN-LIB Property")
    if C.shape[0] == 0:
        raise CertkdError("the specification matrix C has no rows, so there is nothing to prove; pass at least "
                          "one row")
    if C.shape[1] != k:
        raise CertkdError(f"the specification matrix C has {C.shape[1]} columns but the model {k} outputs; pass "
                          f"C of shape (S, {k})")
    if not np.isfinite(C).all():
        raise CertkdError("the specification matrix C has NaN or infinite entries; pass finite numbers")
    return matrix_property(lo.reshape(-1), hi.reshape(-1), C)


def verify_model(model: Union[str, nn.Module], lower=None, upper=None, spec=None, *, timeout: float = 60.0,
                 input_shape: Optional[Sequence[int]] = None, **kwargs) -> VerifyResult:
    """Verify ``model`` on the box [lower, upper] against ``spec``.

    Args:
        model: an ONNX path, or an ``nn.Module`` / ``nn.Sequential`` of supported layers
            (``docs/adding_a_layer.md``), float32 or float64; it is not modified.
        lower, upper: the input box of one sample (same shape, no batch dimension, lower <= upper),
            or None to take it from a :class:`Property` spec.
        spec: a true label (int: robustness, every other class must score lower), a matrix C
            (S, K) (every row of C·y must stay > 0), a :class:`Property`, or a VNN-LIB path.
        timeout: seconds for the whole call, reading the files included; input_shape: per-sample
            shape (default: the ONNX input's, or ``lower.shape``); kwargs: see :func:`verify_network`.
            A VNN-LIB file is read after the network, against its sizes, within the time limit:
            past it the answer is ``timeout`` (stage ``parse``).
    Returns:
        :class:`VerifyResult`. Raises CertkdError (one line) for unsupported models or bad arguments.
    """
    start = time.monotonic()
    if not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and 0 < timeout < float("inf")):
        raise CertkdError(f"timeout must be a positive finite number of seconds, got {timeout!r}; pass e.g. "
                          "timeout=60")
    deadline = start + float(timeout)
    given_box = lower is not None or upper is not None
    if given_box and (lower is None or upper is None):
        raise CertkdError("pass both lower and upper, or neither (to use the box of a VNN-LIB property)")
    lo = hi = None
    if given_box:
        lo, hi = check_box(lower, upper)
    elif not (isinstance(spec, Property) or _is_path(spec)):
        raise CertkdError("verify_model needs lower and upper unless spec is a VNN-LIB property")
    private, source = None, None
    if _is_path(model):
        from certkd.graph import from_onnx

        net = from_onnx(model, input_shape)
        shape, source = net.input_shape, os.fsdecode(model)
    elif isinstance(model, nn.Module):
        if lo is None and _is_path(spec):  # the box comes from the file: read it first
            spec = _read_spec(spec, deadline=deadline)
        if lo is None:
            input_shape = input_shape if input_shape is not None else (spec.lower.size,)
        net, private, shape = _module_network(model, lo if lo is not None else spec.lower, input_shape)
    else:
        raise CertkdError(f"model must be an ONNX path or an nn.Module, got {type(model).__name__}")
    k = int(np.prod(net.shapes(tuple(shape))[-1]))
    if _is_path(spec):  # after the network: the reader refuses declarations beyond its sizes at once
        try:
            spec = _read_spec(spec, int(np.prod(shape)), k, deadline)
        except ParseTimeout as e:
            return VerifyResult("timeout", round(time.monotonic() - start, 4), "parse", note=str(e))
    box_lo, box_hi = (lo, hi) if lo is not None else (spec.lower, spec.upper)
    if box_lo.size != int(np.prod(shape)):
        raise CertkdError(f"the box has {box_lo.size} coordinates but the model takes {int(np.prod(shape))} "
                          f"(shape {tuple(shape)}); pass bounds of one sample's shape")
    prop = _property(spec, box_lo, box_hi, k, given_box)
    if time.monotonic() >= deadline:  # loading and parsing used up the time limit
        return VerifyResult("timeout", round(time.monotonic() - start, 4), "parse",
                            note="time limit reached while loading")
    res = verify_network(net, prop, shape, timeout=timeout, onnx_source=source, reference=private,
                         deadline=deadline, **kwargs)
    res.time_s = round(time.monotonic() - start, 4)  # the whole call, loading included
    return res


def _read_spec(path, num_inputs: Optional[int] = None, num_outputs: Optional[int] = None,
               deadline: Optional[float] = None) -> Property:
    try:
        return read_property(path, num_inputs=num_inputs, num_outputs=num_outputs, deadline=deadline)
    except ParseTimeout:
        raise
    except CertkdError:
        raise
    except (OSError, ValueError) as e:
        raise CertkdError(f"cannot read VNN-LIB property {os.fsdecode(path)}: {e}") from None


def verify_instance(onnx_path, vnnlib_path, timeout: float = 60.0, **kwargs) -> VerifyResult:
    """One VNN-COMP instance: read both files and verify within ``timeout`` s, reading included
    (errors -> CertkdError, one line)."""
    return verify_model(onnx_path, None, None, vnnlib_path, timeout=timeout, **kwargs)


__all__ = ["check_box", "verify_instance", "verify_model"]
