"""The rule-class interface: one class per layer type carries every engine's rule.

See ``docs/adding_a_layer.md``. Conventions (shapes are per sample, without the batch dim):

* ``interval(c, r, p)``: IBP in centre/radius form, (N, *in) -> (N, *out); ``p`` is an optional
  point carried through the same pass (the training path; train-mode BatchNorm needs it).
* ``backward(A, bias, in_shapes, out_shape)``: CROWN, coefficients A (N, S, *out) of a linear
  bound on the output -> one A (N, S, *in_i) per input (None: the input does not matter), and
  the bias (N, S). Parameters are read detached, except inside :func:`live_parameters` (training
  through CROWN bounds, ``bounds/crown_ibp.py``).
* ``window(w, in_shape, out_shape)``: the receptive-field ("patches") version of ``backward``
  on a :class:`~certkd.graph.windows.Window`, or None when the layer has none.
* ``affine(in_shapes, out_shape)``: the layer as float64 sparse matrices on C-order flattened
  vectors, one per input, plus a bias: what the MILP composes.
* ``forward(*xs)``: what the network computes, and what ONNX export traces.

Activations (the non-affine layers) derive from ``layers/activation.py``'s ``Activation`` instead,
whose relaxation, post-activation box and MILP rows replace ``backward``/``affine``.
"""
from __future__ import annotations

import contextlib
import contextvars
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from certkd.errors import CertkdError

Shape = Tuple[int, ...]


class UnsupportedLayerError(CertkdError, TypeError):
    """A layer, operator or configuration no engine can handle (one line, names the node)."""


class Layer:
    """Base rule class. Subclasses set ``module_types`` and register with :func:`register`."""

    module_types: Tuple[Type[nn.Module], ...] = ()
    arity = 1
    diagonal = False  # elementwise (IBP through it composed with one general affine map is exact)
    #: branch and bound may split it at 0 and the MILP encodes it exactly (``layers/activation.py``)
    splittable = False
    #: an activation computed without rounding and this Lipschitz (rounding errors of its input pass
    #: through scaled by it; ``bounds/rounding.py``); None: no such guarantee
    exact_lipschitz: Optional[float] = None

    def __init__(self, module: Optional[nn.Module] = None, name: str = ""):
        self.module, self.name = module, name
        self.check()

    # ----------------------------------------------------------------------------- interface
    def check(self) -> None:
        """Raise :class:`UnsupportedLayerError` for an unsupported configuration."""

    def out_shape(self, *in_shapes: Shape) -> Shape:
        return in_shapes[0]

    def forward(self, *xs: Tensor) -> Tensor:
        return self.module(*xs)

    def interval(self, c: Tensor, r: Tensor, p: Optional[Tensor] = None):
        raise self.unsupported("interval bounds")

    def backward(self, A: Tensor, bias: Tensor, in_shapes: Sequence[Shape], out_shape: Shape):
        raise self.unsupported("CROWN")

    def window(self, w, in_shape: Shape, out_shape: Shape):
        return None

    def affine(self, in_shapes: Sequence[Shape], out_shape: Shape) -> Tuple[List[sp.csr_matrix], np.ndarray]:
        raise self.unsupported("the MILP encoding")

    # ----------------------------------------------------------------------------- helpers
    def unsupported(self, what: str) -> UnsupportedLayerError:
        kind = type(self.module).__name__ if self.module is not None else type(self).__name__
        return UnsupportedLayerError(f"layer {kind} at node '{self.name}' is not supported by {what}")

    def point(self, p: Optional[Tensor]) -> Optional[Tensor]:
        return None if p is None else self.forward(p)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


_REGISTRY: Dict[Type[nn.Module], Type[Layer]] = {}


def register(cls: Type[Layer]) -> Type[Layer]:
    """Class decorator: the rule class converts modules of ``cls.module_types``."""
    for t in cls.module_types:
        _REGISTRY[t] = cls
    return cls


def rule_class(module: nn.Module) -> Optional[Type[Layer]]:
    """The rule class of a module (a subclass of a supported layer uses its parent's rule)."""
    for t in type(module).__mro__:
        if t in _REGISTRY:
            return _REGISTRY[t]
    return None


def supported_names() -> str:
    return ", ".join(sorted({t.__name__ for t in _REGISTRY}))


def identity_matrix(n: int) -> sp.csr_matrix:
    return sp.identity(n, dtype=np.float64, format="csr")


def numel(shape: Shape) -> int:
    return int(np.prod(shape)) if len(shape) else 1


_LIVE = contextvars.ContextVar("certkd_live_parameters", default=False)


@contextlib.contextmanager
def live_parameters():
    """Within this context :func:`detached` keeps autograd: the same backward rules give a bound that
    training can differentiate (CROWN-IBP); verification reads parameters detached."""
    token = _LIVE.set(True)
    try:
        yield
    finally:
        _LIVE.reset(token)


def detached(t: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """A parameter, detached (live inside :func:`live_parameters`), in the dtype/device of ``like``."""
    if t is None:
        return None
    return (t if _LIVE.get() else t.detach()).to(device=like.device, dtype=like.dtype)


# id(weight) -> (weakref to it, its version, its data pointer, |weight|); an entry goes with its weight
_ABS: Dict[int, tuple] = {}


def abs_weight(w: Tensor) -> Tensor:
    """``w.abs()`` (same shape), computed once per version of ``w`` when no gradient is recorded.

    Evaluation and verification propagate many batches through the same weights; the |W| of a
    big Linear (CNN7: 32768×512) then costs as much as the radius product itself (issue #20,
    ``benchmarks/README.md``). Any in-place change of ``w`` bumps its version and recomputes; with
    autograd recording, |W| is always fresh so that its gradient flows.
    """
    if torch.is_grad_enabled() and w.requires_grad:
        return w.abs()
    key, version, ptr = id(w), w._version, w.data_ptr()
    hit = _ABS.get(key)
    if hit is not None and hit[0]() is w and hit[1] == version and hit[2] == ptr:
        return hit[3]
    out = w.detach().abs()
    _ABS[key] = (weakref.ref(w, lambda _, k=key: _ABS.pop(k, None)), version, ptr, out)
    return out


def to_numpy(t: Optional[Tensor]) -> Optional[np.ndarray]:
    return None if t is None else t.detach().double().cpu().numpy()


__all__ = ["Layer", "Shape", "UnsupportedLayerError", "register", "rule_class", "supported_names",
           "identity_matrix", "numel", "detached", "live_parameters", "to_numpy", "abs_weight", "Callable"]
