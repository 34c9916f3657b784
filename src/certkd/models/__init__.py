"""Model registry (timm-style): ``create_model(name, ...)`` builds any registered network.

Every model is a :class:`CertifiableNet`: ``features`` (h, an ``nn.Sequential`` that starts
with :class:`Normalize`) followed by ``head`` (g, the final ``nn.Linear``). Distillation
reads h; bound propagation walks ``features`` layer by layer and merges ``head`` into the
logit-difference specification (last-layer elision).
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Sequence

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
        return cls(name=d["name"], in_channels=int(d["in_channels"]), input_size=int(d["input_size"]),
                   num_classes=int(d["num_classes"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   kwargs=dict(d.get("kwargs", {})))


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


ModelBuilder = Callable[..., CertifiableNet]
_MODELS: Dict[str, Callable[..., tuple]] = {}


def register_model(name: str):
    """Decorator: register ``fn(in_channels, input_size, num_classes, **kwargs) -> (layers, head)``."""

    def wrap(fn):
        _MODELS[name] = fn
        return fn

    return wrap


def list_models() -> list:
    return sorted(_MODELS)


def create_model(name: str, in_channels: int = 1, input_size: int = 28, num_classes: int = 10,
                 mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,), **kwargs: Any) -> CertifiableNet:
    """Build a registered model; normalisation (per SPEC §5) becomes its first layer."""
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list_models(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise CertkdError(f"unknown model '{name}'{hint}; choose one of: {', '.join(list_models())}")
    if len(mean) == 1 and in_channels > 1:
        mean, std = tuple(mean) * in_channels, tuple(std) * in_channels
    layers, head = _MODELS[name](in_channels=in_channels, input_size=input_size, num_classes=num_classes, **kwargs)
    spec = ModelSpec(name=name, in_channels=in_channels, input_size=input_size, num_classes=num_classes,
                     mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std), kwargs=dict(kwargs))
    return CertifiableNet(nn.Sequential(Normalize(spec.mean, spec.std), *layers), head, spec)


def create_model_from_spec(spec: ModelSpec) -> CertifiableNet:
    return create_model(spec.name, spec.in_channels, spec.input_size, spec.num_classes, spec.mean, spec.std, **spec.kwargs)


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _cnn7(in_channels: int, input_size: int, num_classes: int, width: int, linear: int,
          last_stride: int) -> tuple:
    """CNN7 with BatchNorm (SPEC §4): five 3×3 convs, stride 2 on the third (and fifth for ImageNet)."""
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
    return _cnn7(in_channels, input_size, num_classes, width, linear, last_stride=1)


@register_model("cnn7-imagenet")
def cnn7_imagenet(in_channels: int, input_size: int, num_classes: int, width: int = 64, linear: int = 512) -> tuple:
    return _cnn7(in_channels, input_size, num_classes, width, linear, last_stride=2)


@register_model("cnn-small")
def cnn_small(in_channels: int, input_size: int, num_classes: int, width: int = 16, linear: int = 100) -> tuple:
    """conv16 4×4/2 – conv32 4×4/2 – fc100 – fc10 (padding 1, so 8×8 digits work too)."""
    size = _conv_out(_conv_out(input_size, 4, 2, 1), 4, 2, 1)
    if size < 1:
        raise CertkdError(f"cnn-small needs inputs of at least 4×4 pixels, got {input_size}×{input_size}")
    layers = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.ReLU(),
              nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.ReLU(),
              nn.Flatten(), nn.Linear(size * size * 2 * width, linear), nn.ReLU()]
    return layers, nn.Linear(linear, num_classes)


@register_model("mlp")
def mlp(in_channels: int, input_size: int, num_classes: int, hidden: Sequence[int] = (100, 100)) -> tuple:
    layers: list = [nn.Flatten()]
    width = in_channels * input_size * input_size
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    return layers, nn.Linear(width, num_classes)


def ibp_initialize(model: CertifiableNet, generator: torch.Generator | None = None) -> CertifiableNet:
    """IBP initialisation of Shi et al. 2021 (SPEC §3.1).

    Every Conv2d/Linear weight in ``features`` (the head keeps PyTorch's default) is redrawn
    from N(0, σ²) with σ = sqrt(2π) / fan_in, so interval widths neither explode nor vanish.
    """
    with torch.no_grad():
        for layer in model.features:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                fan_in = layer.weight[0].numel()
                std = (2 * torch.pi) ** 0.5 / fan_in
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * std)
    return model


__all__ = ["CertifiableNet", "ModelSpec", "Normalize", "create_model", "create_model_from_spec",
           "ibp_initialize", "list_models", "register_model"]
