"""Model registry (timm-style): ``create_model(name, ...)`` builds any registered network.

Every model is a :class:`CertifiableNet`: ``features`` (h, an ``nn.Sequential`` that starts
with :class:`Normalize`) followed by ``head`` (g, the final ``nn.Linear``). Distillation
reads h; bound propagation walks ``features`` layer by layer and merges ``head`` into the
logit-difference specification (last-layer elision).
"""
from __future__ import annotations

import difflib
import inspect
import math
import operator
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from certkd.errors import CertkdError
from certkd.models.layers import Normalize


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model from its weights (stored in checkpoint metadata)."""

    name: str
    in_channels: int
    input_size: int
    num_classes: int
    mean: tuple = (0.0,)
    std: tuple = (1.0,)
    kwargs: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        """Rebuild a spec from (untrusted) checkpoint metadata: ValueError naming the first bad field.

        Only the types and ranges are checked here (:data:`DIM_LIMITS`); nothing is allocated.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"expected a mapping, got {type(d).__name__}")
        missing = [k for k in ("name", "in_channels", "input_size", "num_classes") if k not in d]
        if missing:
            raise ValueError(f"no '{missing[0]}' entry")
        if not isinstance(d["name"], str):
            raise ValueError(f"name {d['name']!r} is not a string")
        for key in DIM_LIMITS:
            problem = dimension_problem(key, d[key])
            if problem:
                raise ValueError(problem)
        channels = d["in_channels"]
        norm = {}
        for key, default in (("mean", [0.0]), ("std", [1.0])):
            values = d.get(key, default)
            if (not isinstance(values, (list, tuple)) or len(values) not in (1, channels)
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                               for v in values)):
                raise ValueError(f"{key} {values!r} is not a list of 1 or {channels} finite numbers")
            norm[key] = tuple(float(v) for v in values)
        if not all(s > 0 for s in norm["std"]):
            raise ValueError(f"std {list(norm['std'])} has a value <= 0")
        kwargs = d.get("kwargs", {})
        if kwargs is None:
            kwargs = {}
        if not isinstance(kwargs, Mapping):
            raise ValueError(f"kwargs {kwargs!r} is not a mapping")
        return cls(name=d["name"], in_channels=channels, input_size=d["input_size"], num_classes=d["num_classes"],
                   mean=norm["mean"], std=norm["std"], kwargs=dict(kwargs))


class CertifiableNet(nn.Module):
    """f(x) = head(features(x)) on pixel-space inputs in [0, 1].

    Shapes: x (N, C, H, W) -> features (N, m) -> logits (N, K).
    """

    def __init__(self, features: nn.Sequential, head: nn.Linear, spec: ModelSpec):
        super().__init__()
        if not isinstance(features[0], Normalize):
            raise ValueError("features must start with Normalize so that inputs stay in pixel units")
        self.features = features
        self.head = head
        self.spec = spec

    @property
    def normalize(self) -> Normalize:
        return self.features[0]

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


_MODELS: Dict[str, Callable[..., tuple]] = {}


def register_model(name: str):
    """Decorator: register ``fn(in_channels, input_size, num_classes, **kwargs) -> (layers, head)``."""

    def wrap(fn):
        _MODELS[name] = fn
        return fn

    return wrap


def list_models() -> list:
    return sorted(_MODELS)


def describe_model(name: str) -> str:
    """The one-line description of a registered model (the first line of its builder's docstring)."""
    doc = (_MODELS[name].__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def create_model(name: str, in_channels: int = 1, input_size: int = 28, num_classes: int = 10,
                 mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,), **kwargs: Any) -> CertifiableNet:
    """Build a registered model; normalisation (docs/method.md §9) becomes its first layer."""
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list_models(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise CertkdError(f"unknown model '{name}'{hint}; choose one of: {', '.join(list_models())}")
    in_channels, input_size, num_classes = (_index(v) for v in (in_channels, input_size, num_classes))
    for key, value in (("in_channels", in_channels), ("input_size", input_size), ("num_classes", num_classes)):
        problem = dimension_problem(key, value)
        if problem:
            raise CertkdError(f"model '{name}': {problem}; use a dataset within these limits")
    bad = model_kwargs_problem(name, kwargs)
    if bad:
        raise CertkdError(f"{bad[0]}; {bad[1]}")
    if len(mean) == 1 and in_channels > 1:
        mean, std = tuple(mean) * in_channels, tuple(std) * in_channels
    layers, head = _MODELS[name](in_channels=in_channels, input_size=input_size, num_classes=num_classes, **kwargs)
    spec = ModelSpec(name=name, in_channels=in_channels, input_size=input_size, num_classes=num_classes,
                     mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std), kwargs=dict(kwargs))
    return CertifiableNet(nn.Sequential(Normalize(spec.mean, spec.std), *layers), head, spec)


# Sane ranges for model dimensions and integer model_kwargs. Checkpoint metadata is untrusted input:
# a wrong number there must give a one-line error, never an attempt to allocate terabytes.
DIM_LIMITS: Dict[str, Tuple[int, int]] = {"in_channels": (1, 64), "input_size": (1, 4096),
                                          "num_classes": (1, 100_000)}
KWARG_INT_LIMITS: Tuple[int, int] = (1, 65_536)
KWARG_LIST_MAX = 64  # at most this many entries in a list-valued kwarg (mlp's hidden)
_ARCH_ARGS = ("in_channels", "input_size", "num_classes")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _index(value: Any) -> Any:
    """An integer-like value (numpy/torch integer) as an int; anything else unchanged."""
    if isinstance(value, bool):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value


def dimension_problem(key: str, value: Any) -> Optional[str]:
    """Why ``value`` is not a valid ``in_channels``/``input_size``/``num_classes`` (None: it is)."""
    lo, hi = DIM_LIMITS[key]
    if not _is_int(value) or not lo <= value <= hi:
        return f"{key} {value!r} is not an integer in [{lo}, {hi}]"
    return None


def model_kwargs_help(name: str) -> str:
    """The model_kwargs a registered model accepts, e.g. ``width (default 64), linear (default 512)``."""
    params = _builder_params(name)
    if params is None:
        return "any"
    return ", ".join(f"{k} (default {list(p.default) if isinstance(p.default, tuple) else p.default!r})"
                     if p.default is not inspect.Parameter.empty else f"{k} (required)"
                     for k, p in params.items()) or "none"


def _builder_params(name: str) -> Optional[Dict[str, inspect.Parameter]]:
    """The builder's keyword parameters beyond the data dimensions (None: it takes **kwargs)."""
    params = inspect.signature(_MODELS[name]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {k: p for k, p in params.items() if k not in _ARCH_ARGS
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def model_kwargs_problem(name: str, kwargs: Any) -> Optional[Tuple[str, str]]:
    """``(problem, fix)`` in words when ``kwargs`` do not fit model ``name``'s builder, else None.

    Checked against the builder's signature: unknown keys, missing required keys, and for
    parameters whose default is an int (a list of ints) an int (a list of ints) in
    :data:`KWARG_INT_LIMITS`. Nothing is built.
    """
    valid = f"the model_kwargs of '{name}' are: {model_kwargs_help(name)}"
    if not isinstance(kwargs, Mapping):
        return f"model_kwargs must be a mapping, got {kwargs!r}", f"{valid}, e.g. --set 'model_kwargs={{}}'"
    params = _builder_params(name)
    if params is None:
        return None
    lo, hi = KWARG_INT_LIMITS
    for key, value in kwargs.items():
        if key not in params:
            close = difflib.get_close_matches(str(key), list(params), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            return f"unknown model_kwargs key '{key}' for model '{name}'{hint}", valid
        default = params[key].default
        if _is_int(default) and not (_is_int(value) and lo <= value <= hi):
            return (f"model_kwargs {key}={value!r} for model '{name}' is not an integer in [{lo}, {hi}]",
                    f"pass e.g. --set 'model_kwargs={{{key}: {default}}}'")
        if (isinstance(default, (list, tuple)) and default and all(_is_int(v) for v in default)
                and not (isinstance(value, (list, tuple)) and len(value) <= KWARG_LIST_MAX
                         and all(_is_int(v) and lo <= v <= hi for v in value))):
            example = ", ".join(map(str, default))
            return (f"model_kwargs {key}={value!r} for model '{name}' is not a list of at most {KWARG_LIST_MAX} "
                    f"integers in [{lo}, {hi}]", f"pass e.g. --set 'model_kwargs={{{key}: [{example}]}}'")
    missing = [k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in kwargs]
    if missing:
        return f"model '{name}' needs model_kwargs key '{missing[0]}'", valid
    return None


def create_model_from_spec(spec: ModelSpec) -> CertifiableNet:
    return create_model(spec.name, spec.in_channels, spec.input_size, spec.num_classes, spec.mean, spec.std, **spec.kwargs)


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _cnn7(in_channels: int, input_size: int, num_classes: int, width: int, linear: int,
          last_stride: int) -> tuple:
    """CNN7 with BatchNorm (docs/method.md §8): five 3×3 convs, stride 2 on the third (and fifth for ImageNet)."""
    plan = [(in_channels, width, 1), (width, width, 1), (width, 2 * width, 2), (2 * width, 2 * width, 1),
            (2 * width, 2 * width, last_stride)]
    layers: list = []
    size = input_size
    for cin, cout, stride in plan:
        layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
        size = _conv_out(size, 3, stride, 1)
    layers += [nn.Flatten(), nn.Linear(size * size * 2 * width, linear), nn.BatchNorm1d(linear), nn.ReLU()]
    return layers, nn.Linear(linear, num_classes)


@register_model("cnn7")
def cnn7(in_channels: int, input_size: int, num_classes: int, width: int = 64, linear: int = 512) -> tuple:
    """CNN7 with BatchNorm (docs/method.md §8, the paper's MNIST/CIFAR-10 model): width 64, linear 512."""
    return _cnn7(in_channels, input_size, num_classes, width, linear, last_stride=1)


@register_model("cnn7-imagenet")
def cnn7_imagenet(in_channels: int, input_size: int, num_classes: int, width: int = 64, linear: int = 512) -> tuple:
    """CNN7 with BatchNorm and stride 2 on conv 5 (docs/method.md §8, TinyImageNet/ImageNet64 64×64):
    width 64, linear 512."""
    return _cnn7(in_channels, input_size, num_classes, width, linear, last_stride=2)


@register_model("cnn7-w16")
def cnn7_w16(in_channels: int, input_size: int, num_classes: int, linear: int = 100) -> tuple:
    """CPU-sized CNN7 with BatchNorm: the cnn7 layer pattern at width 16 (convs 16-16-32-32-32), linear 100."""
    return _cnn7(in_channels, input_size, num_classes, 16, linear, last_stride=1)


@register_model("cnn7-w32")
def cnn7_w32(in_channels: int, input_size: int, num_classes: int, linear: int = 200) -> tuple:
    """CPU-sized CNN7 with BatchNorm: the cnn7 layer pattern at width 32 (convs 32-32-64-64-64), linear 200."""
    return _cnn7(in_channels, input_size, num_classes, 32, linear, last_stride=1)


@register_model("cnn-small")
def cnn_small(in_channels: int, input_size: int, num_classes: int, width: int = 16, linear: int = 100) -> tuple:
    """Small CNN without BatchNorm: conv16 4×4/2 – conv32 4×4/2 – fc100 – fc10 (padding 1, so 8×8 digits work)."""
    size = _conv_out(_conv_out(input_size, 4, 2, 1), 4, 2, 1)
    if size < 1:
        raise CertkdError(f"cnn-small needs inputs of at least 4×4 pixels, got {input_size}×{input_size}")
    layers = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.ReLU(),
              nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.ReLU(),
              nn.Flatten(), nn.Linear(size * size * 2 * width, linear), nn.ReLU()]
    return layers, nn.Linear(linear, num_classes)


@register_model("mlp")
def mlp(in_channels: int, input_size: int, num_classes: int, hidden: Sequence[int] = (100, 100)) -> tuple:
    """Fully connected ReLU network without BatchNorm: hidden layers 100-100 by default, then the head."""
    layers: list = [nn.Flatten()]
    width = in_channels * input_size * input_size
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    return layers, nn.Linear(width, num_classes)


def ibp_initialize(model: CertifiableNet, generator: torch.Generator | None = None) -> CertifiableNet:
    """IBP initialisation of Shi et al. 2021 (docs/method.md §6).

    Every Conv2d/Linear weight in ``features`` (the head keeps PyTorch's default) is redrawn
    from N(0, σ²) with σ = sqrt(2π) / fan_in, so interval widths neither explode nor vanish.

    Biases: a layer that a BatchNorm follows keeps PyTorch's default bias (the BN removes it
    anyway, as in CNN7). A layer that *no* BatchNorm follows (``cnn-small``, ``mlp``) gets a
    zero bias: with the shrunken weights its pre-activation is ≈ its bias, so PyTorch's
    default uniform bias would leave every unit with a negative bias dead from the start
    (39–54 of ``cnn-small``'s 100 penultimate units on digits; 0–9 with zero biases).
    """
    layers = list(model.features)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                fan_in = layer.weight[0].numel()
                std = (2 * torch.pi) ** 0.5 / fan_in
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * std)
                followed_by_bn = i + 1 < len(layers) and isinstance(layers[i + 1], nn.modules.batchnorm._BatchNorm)
                if layer.bias is not None and not followed_by_bn:
                    layer.bias.zero_()
    return model


__all__ = ["CertifiableNet", "ModelSpec", "Normalize", "create_model", "create_model_from_spec",
           "describe_model", "dimension_problem", "ibp_initialize", "list_models", "model_kwargs_help",
           "model_kwargs_problem", "register_model"]
