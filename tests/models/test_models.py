"""Tests for certkd.models: registry, architectures (docs/method.md §8) and IBP initialisation
(docs/method.md §6)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from certkd.errors import CertkdError
from certkd.models import (CertifiableNet, ModelSpec, Normalize, create_model, create_model_from_spec,
                           ibp_initialize, list_models)


def _linears(model):
    return [m for m in model.features if isinstance(m, nn.Linear)]


def test_registry_lists_models():
    names = list_models()
    for n in ("cnn7", "cnn7-imagenet", "cnn-small", "mlp"):
        assert n in names
    assert names == sorted(names)


def test_unknown_model_did_you_mean():
    with pytest.raises(CertkdError) as e:
        create_model("cnn8")
    assert "unknown model 'cnn8'" in str(e.value)
    assert "did you mean 'cnn7'" in str(e.value)
    assert "cnn-small" in str(e.value)  # lists the choices


@pytest.mark.parametrize("name, kwargs, shapes", [
    ("cnn7", dict(width=4, linear=16), [(1, 28, 10), (3, 32, 10), (3, 16, 7), (1, 8, 2)]),
    ("cnn7-imagenet", dict(width=4, linear=16), [(3, 64, 200), (3, 32, 10)]),
    ("cnn-small", {}, [(1, 8, 10), (1, 28, 10), (3, 32, 10), (1, 4, 3)]),
    ("mlp", {}, [(1, 8, 10), (3, 16, 5)]),
    ("mlp", dict(hidden=(7,)), [(1, 28, 10)]),
])
def test_output_shapes(name, kwargs, shapes):
    for c, size, k in shapes:
        model = create_model(name, c, size, k, **kwargs).eval()
        x = torch.rand(3, c, size, size)
        out = model(x)
        assert out.shape == (3, k)
        feats = model.features(x)
        assert feats.shape == (3, model.feature_dim)
        assert model.num_classes == k
        torch.testing.assert_close(model.head(feats), out)


def test_model_structure_contract():
    model = create_model("cnn7", 3, 32, 10, mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010))
    assert isinstance(model, CertifiableNet)
    assert isinstance(model.features, nn.Sequential)
    assert isinstance(model.features[0], Normalize) and model.normalize is model.features[0]
    assert isinstance(model.head, nn.Linear)
    assert model.feature_dim == 512 and model.head.out_features == 10
    # the last feature layer is a ReLU, so h >= 0 (docs/method.md §1)
    assert isinstance(model.features[-1], nn.ReLU)
    torch.testing.assert_close(model.normalize.std, torch.tensor([0.2023, 0.1994, 0.2010]))


def test_cnn7_layer_sequence_matches_spec():
    model = create_model("cnn7", 3, 32, 10)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0], c.padding[0], c.kernel_size) for c in convs] == [
        (3, 64, 1, 1, (3, 3)), (64, 64, 1, 1, (3, 3)), (64, 128, 2, 1, (3, 3)),
        (128, 128, 1, 1, (3, 3)), (128, 128, 1, 1, (3, 3))]
    kinds = [type(m).__name__ for m in model.features[1:]]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU"] * 5 + ["Flatten", "Linear", "BatchNorm1d", "ReLU"]
    imagenet = create_model("cnn7-imagenet", 3, 64, 200)
    strides = [m.stride[0] for m in imagenet.features if isinstance(m, nn.Conv2d)]
    assert strides == [1, 1, 2, 1, 2]


@pytest.mark.parametrize("name, c, size, k, in_features", [
    ("cnn7", 3, 32, 10, 32768), ("cnn7", 1, 28, 10, 25088), ("cnn7-imagenet", 3, 64, 200, 32768),
    ("cnn7-imagenet", 3, 64, 1000, 32768)])
def test_cnn7_linear_in_features(name, c, size, k, in_features):
    model = create_model(name, c, size, k)
    (lin,) = _linears(model)
    assert lin.in_features == in_features and lin.out_features == 512
    assert model.head.in_features == 512 and model.head.out_features == k
    assert model.feature_dim == 512


def test_cnn_small_and_mlp_feature_dims():
    assert create_model("cnn-small", 1, 28, 10).feature_dim == 100
    assert create_model("cnn-small", 1, 8, 10).feature_dim == 100
    assert create_model("mlp", 1, 8, 10).feature_dim == 100
    assert create_model("mlp", 1, 8, 10, hidden=[30, 20]).feature_dim == 20


def test_cnn_small_too_small_input_raises():
    with pytest.raises(CertkdError, match="at least 4"):
        create_model("cnn-small", 1, 2, 10)


def test_normalize_layer_is_first_and_correct():
    model = create_model("mlp", 3, 4, 10, mean=(0.5,), std=(0.25,))
    norm = model.normalize
    assert norm.mean.tolist() == [0.5, 0.5, 0.5]  # broadcast single value over channels
    x = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(norm(x), (x - 0.5) / 0.25)
    assert model.spec.mean == (0.5, 0.5, 0.5) and model.spec.std == (0.25, 0.25, 0.25)


def test_spec_roundtrip_rebuilds_same_architecture():
    model = create_model("cnn7", 1, 28, 10, width=4, linear=16)
    spec = ModelSpec.from_dict(model.spec.to_dict())
    assert spec == model.spec
    clone = create_model_from_spec(spec)
    clone.load_state_dict(model.state_dict())  # same parameter names and shapes
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(clone.eval()(x), model.eval()(x))


def test_features_must_start_with_normalize():
    with pytest.raises(ValueError, match="Normalize"):
        CertifiableNet(nn.Sequential(nn.Flatten()), nn.Linear(4, 2), ModelSpec("x", 1, 2, 2))


# --------------------------------------------------------------------------- IBP init (docs/method.md §6)

def test_ibp_initialize_std_and_head_unchanged():
    torch.manual_seed(0)
    model = create_model("cnn7", 3, 16, 10, width=16, linear=64)
    before = copy.deepcopy(model)
    ibp_initialize(model, generator=torch.Generator().manual_seed(1))
    layers = [(m, b) for m, b in zip(model.features, before.features) if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 6
    for new, old in layers:
        fan_in = new.weight[0].numel()
        if isinstance(new, nn.Conv2d):
            assert fan_in == new.in_channels * new.kernel_size[0] * new.kernel_size[1]
        target = math.sqrt(2 * math.pi) / fan_in
        n = new.weight.numel()
        std = new.weight.std().item()
        # sample std of n Gaussians has relative s.e. ≈ 1/sqrt(2n); allow 6 s.e. (and 8% for tiny layers)
        tol = max(6 / math.sqrt(2 * n), 0.02)
        assert abs(std / target - 1) < tol, (type(new).__name__, fan_in, std, target)
        assert abs(new.weight.mean().item()) < 6 * target / math.sqrt(n)
        assert not torch.equal(new.weight, old.weight)
        # biases keep PyTorch's default
        assert torch.equal(new.bias, old.bias)
    # the head and BatchNorm parameters are untouched
    assert torch.equal(model.head.weight, before.head.weight) and torch.equal(model.head.bias, before.head.bias)
    for new, old in zip(model.features, before.features):
        if isinstance(new, nn.modules.batchnorm._BatchNorm):
            assert torch.equal(new.weight, old.weight) and torch.equal(new.bias, old.bias)


def test_ibp_initialize_distinguishes_from_default_init():
    # PyTorch's default (kaiming-uniform, a=√5) has std 1/sqrt(3·fan_in), far from √(2π)/fan_in here
    model = create_model("mlp", 1, 28, 10, hidden=(200,))
    lin = _linears(model)[0]
    fan_in = 784
    assert abs(lin.weight.std().item() - 1 / math.sqrt(3 * fan_in)) < 1e-3
    ibp_initialize(model, generator=torch.Generator().manual_seed(0))
    assert lin.weight.std().item() == pytest.approx(math.sqrt(2 * math.pi) / fan_in, rel=0.02)


def test_ibp_initialize_is_deterministic_with_generator():
    a = ibp_initialize(create_model("cnn-small", 1, 8, 10), generator=torch.Generator().manual_seed(3))
    b = ibp_initialize(create_model("cnn-small", 1, 8, 10), generator=torch.Generator().manual_seed(3))
    for (na, pa), (nb, pb) in zip(a.features.named_parameters(), b.features.named_parameters()):
        if na.endswith("weight"):
            assert torch.equal(pa, pb), na


@pytest.mark.parametrize("name", ["cnn-small", "mlp"])
def test_ibp_initialize_leaves_few_dead_penultimate_units_without_bn(name):
    """docs/method.md §6, biases (issue #11): in a network without BatchNorm the shrunken IBP weights
    leave each pre-activation ≈ its bias, so PyTorch's default (uniform) biases killed 39–54 of cnn-small's 100
    penultimate units at init on digits (mlp: 21–34). With the biases of BN-free layers zeroed: 5–12."""
    from certkd.data import load_dataset

    train_set, _, info = load_dataset("digits")
    x, _ = train_set.get(torch.arange(256))
    dead = []
    for seed in range(5):
        torch.manual_seed(seed)
        model = create_model(name, info.in_channels, info.input_size, info.num_classes, info.mean, info.std)
        ibp_initialize(model)
        for layer in model.features:  # no BN follows any of them: zero biases
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                assert torch.count_nonzero(layer.bias) == 0
        with torch.no_grad():
            pre = model.features[:-1](x)  # pre-activation of the last ReLU: (N, m)
        assert pre.shape == (256, model.feature_dim)
        dead.append(int((pre <= 0).all(dim=0).sum()))
    assert max(dead) <= 20 and sum(dead) / len(dead) <= 12, dead


def test_ibp_initialize_keeps_bias_of_layers_followed_by_bn():
    model = create_model("cnn7", 1, 8, 10, width=4, linear=16)
    before = copy.deepcopy(model)
    ibp_initialize(model)
    for new, old in zip(model.features, before.features):
        if isinstance(new, (nn.Conv2d, nn.Linear)):
            assert torch.equal(new.bias, old.bias) and torch.count_nonzero(new.bias) > 0


@pytest.mark.parametrize("name, width, linear", [("cnn7-w16", 16, 100), ("cnn7-w32", 32, 200)])
def test_small_cnn7_variants(name, width, linear):
    """CPU-sized CNN7s with BatchNorm (issue #11): the cnn7 layer pattern at width 16/32, named and described."""
    from certkd.models import describe_model

    assert name in list_models() and describe_model(name).startswith("CPU-sized CNN7 with BatchNorm")
    for c, size, k, flat in [(1, 28, 10, 14 * 14 * 2 * width), (3, 32, 10, 16 * 16 * 2 * width), (1, 8, 10, 16 * 2 * width)]:
        model = create_model(name, c, size, k)
        convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
        assert [(m.in_channels, m.out_channels, m.stride[0]) for m in convs] == [
            (c, width, 1), (width, width, 1), (width, 2 * width, 2), (2 * width, 2 * width, 1), (2 * width, 2 * width, 1)]
        kinds = [type(m).__name__ for m in model.features[1:]]
        assert kinds == ["Conv2d", "BatchNorm2d", "ReLU"] * 5 + ["Flatten", "Linear", "BatchNorm1d", "ReLU"]
        (lin,) = _linears(model)
        assert (lin.in_features, lin.out_features) == (flat, linear) and model.feature_dim == linear
        x = torch.rand(4, c, size, size)
        assert model.train()(x).shape == (4, k) and model.eval()(x).shape == (4, k)
        assert model.features(x).shape == (4, linear)
    # the linear width can still be changed, and the spec rebuilds the same model
    model = create_model(name, 1, 28, 10, linear=32)
    assert model.feature_dim == 32
    assert create_model_from_spec(ModelSpec.from_dict(model.spec.to_dict())).feature_dim == 32


def test_every_model_has_a_one_line_description():
    from certkd.models import describe_model

    for name in list_models():
        d = describe_model(name)
        assert d and "\n" not in d, name
