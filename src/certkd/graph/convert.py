"""Build a :class:`~certkd.graph.network.Network` from an ``nn.Module``; graph passes.

Handled: certkd's ``CertifiableNet`` (features then head), ``nn.Sequential`` (nested too),
:class:`~certkd.models.layers.Residual`, every module with a rule class, and other modules
through ``torch.fx`` symbolic tracing (residual ``+``, ``torch.relu``/``sigmoid``/``tanh``, ``torch.flatten``).
Anything else raises :class:`~certkd.graph.layers.UnsupportedLayerError` naming the node.
"""
from __future__ import annotations

import copy
import operator
import weakref
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

import certkd.graph.layers  # noqa: F401  (registers the rule classes)
from certkd.graph.layers.add import AddModule
from certkd.graph.layers.base import Layer, UnsupportedLayerError, rule_class, supported_names
from certkd.graph.layers.batchnorm import BatchNorm, bn_scale_shift
from certkd.graph.layers.conv import Conv2d
from certkd.graph.layers.linear import Linear
from certkd.graph.network import InputLayer, Network, Node
from certkd.models.layers import Residual

#: legacy per-type interval rules (``certkd.bounds.ibp.interval_rule``): interval bounds only
CUSTOM_INTERVAL: Dict[type, Callable] = {}


class CustomInterval(Layer):
    """A layer with only a user-registered interval rule (other engines refuse it)."""

    def __init__(self, module: nn.Module, name: str, fn: Callable):
        self.fn = fn
        super().__init__(module, name)

    def out_shape(self, in_shape):
        return tuple(self.module(torch.zeros((1,) + tuple(in_shape))).shape[1:])

    def interval(self, c, r, p=None):
        return self.fn(self.module, c, r, p)


def _custom(module: nn.Module) -> Optional[Callable]:
    for t in type(module).__mro__:
        if t in CUSTOM_INTERVAL:
            return CUSTOM_INTERVAL[t]
    return None


def _unsupported(module: nn.Module, name: str) -> UnsupportedLayerError:
    return UnsupportedLayerError(
        f"unsupported layer {type(module).__name__} at node '{name or type(module).__name__}' "
        f"(no interval bound rule, CROWN rule or MILP encoding for it); supported: {supported_names()}, "
        "nn.Sequential, Residual")


def make_rule(module: nn.Module, name: str) -> Optional[Layer]:
    """The rule object for a leaf module, or None if the module is a container."""
    fn = _custom(module)
    cls = rule_class(module)
    if fn is not None and (cls is None or CUSTOM_INTERVAL.get(type(module)) is fn):
        return CustomInterval(module, name, fn)
    return None if cls is None else cls(module, name)


class _Builder:
    def __init__(self):
        self.nodes: List[Node] = [Node("input", InputLayer(None, "input"), ())]

    def add(self, name: str, rule: Layer, inputs: Tuple[int, ...]) -> int:
        self.nodes.append(Node(name, rule, tuple(inputs)))
        return len(self.nodes) - 1

    def module(self, m: nn.Module, name: str, src: int) -> int:
        """Append the nodes of module ``m`` applied to node ``src``; returns its output node."""
        rule = make_rule(m, name)
        if rule is not None:
            return self.add(name, rule, (src,))
        if isinstance(m, nn.Sequential):
            for child_name, child in m.named_children():
                src = self.module(child, f"{name}.{child_name}" if name else child_name, src)
            return src
        from certkd.models import CertifiableNet  # late: certkd.models imports nothing from here
        if isinstance(m, CertifiableNet):
            src = self.module(m.features, f"{name}.features" if name else "features", src)
            return self.module(m.head, f"{name}.head" if name else "head", src)
        if isinstance(m, Residual):
            a = self.module(m.shortcut, f"{name}.shortcut", src)
            b = self.module(m.body, f"{name}.body", src)
            return self.add(f"{name}.add", make_rule(AddModule(), f"{name}.add"), (a, b))
        if isinstance(m, Network):
            mapping = {0: src}
            for i, node in enumerate(m.nodes[1:], 1):
                mapping[i] = self.add(node.name, node.rule, tuple(mapping[j] for j in node.inputs))
            return mapping[m.output]
        if not any(True for _ in m.children()):
            raise _unsupported(m, name)
        return self._traced(m, name, src)

    def _traced(self, m: nn.Module, name: str, src: int) -> int:
        import torch.fx as fx

        class Tracer(fx.Tracer):
            def is_leaf_module(self, mod, qualname):
                return make_rule(mod, qualname) is not None

        try:
            graph = Tracer().trace(m)
        except Exception as err:  # not traceable: report the module itself
            raise UnsupportedLayerError(f"{_unsupported(m, name)}; torch.fx could not trace it: "
                                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        where: Dict[str, int] = {}
        out: Optional[int] = None
        prefix = f"{name}." if name else ""
        for node in graph.nodes:
            here = prefix + node.name
            args = [a for a in node.args if isinstance(a, fx.Node)]
            if node.op == "placeholder":
                if where:
                    raise UnsupportedLayerError(f"module {type(m).__name__} at node '{here}' takes several inputs")
                where[node.name] = src
            elif node.op == "call_module":
                mod = m.get_submodule(node.target)
                if len(args) != 1 or len(node.args) != 1 or node.kwargs:
                    raise UnsupportedLayerError(f"call of {type(mod).__name__} at node '{prefix}{node.target}' "
                                                "with other than one tensor argument is not supported")
                where[node.name] = self.module(mod, prefix + str(node.target), where[args[0].name])
            elif node.op in ("call_function", "call_method") and node.target in (operator.add, torch.add, "add") \
                    and len(args) == 2 and len(node.args) == 2:
                where[node.name] = self.add(here, make_rule(AddModule(), here),
                                            (where[args[0].name], where[args[1].name]))
            elif node.target in _FUNCTIONAL and len(args) == 1:
                where[node.name] = self.add(here, make_rule(_FUNCTIONAL[node.target](), here), (where[args[0].name],))
            elif node.target in (torch.flatten, "flatten") and len(args) == 1:
                start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
                if start == 0:
                    raise UnsupportedLayerError(f"flatten at node '{here}' merges the batch dimension")
                where[node.name] = self.add(here, make_rule(nn.Flatten(start, end), here), (where[args[0].name],))
            elif node.op == "output":
                out = where[node.args[0].name] if isinstance(node.args[0], fx.Node) else None
            else:
                raise UnsupportedLayerError(f"unsupported operation {getattr(node.target, '__name__', node.target)} "
                                            f"at node '{here}' of {type(m).__name__}")
        if out is None:
            raise UnsupportedLayerError(f"module {type(m).__name__} at node '{name}' must return one tensor")
        return out


#: activations called as functions in a traced module -> their module
_FUNCTIONAL = {f: m for fs, m in (((torch.relu, torch.nn.functional.relu, "relu"), nn.ReLU),
                                  ((torch.sigmoid, torch.nn.functional.sigmoid, "sigmoid"), nn.Sigmoid),
                                  ((torch.tanh, torch.nn.functional.tanh, "tanh"), nn.Tanh)) for f in fs}

_CACHE: "weakref.WeakKeyDictionary[nn.Module, Tuple[tuple, Network]]" = weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module) -> tuple:
    return tuple(id(m) for m in model.modules())


def from_module(model: nn.Module) -> Network:
    """The graph of ``model`` (sharing its layer modules; cached until its module tree changes).

    Raises :class:`~certkd.graph.layers.UnsupportedLayerError` naming an unsupported layer/node.
    """
    if isinstance(model, Network):
        return model
    key = _fingerprint(model)
    hit = _CACHE.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    b = _Builder()
    rule = make_rule(model, "")
    if rule is not None:
        rule.name = type(model).__name__
        b.add(rule.name, rule, (0,))
    else:
        b.module(model, "", 0)
    net = Network(b.nodes)
    try:
        _CACHE[model] = (key, net)
    except TypeError:  # pragma: no cover - not weak-referenceable
        pass
    return net


def _fold_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A copy of Conv2d/Linear ``layer`` with eval-mode ``bn`` applied to its output (float64 fold)."""
    w = layer.weight.detach().double()
    b = layer.bias.detach().double() if layer.bias is not None else w.new_zeros(w.shape[0])
    scale, shift = bn_scale_shift(bn, bn.running_mean.detach().double(), bn.running_var.detach().double())
    new = copy.deepcopy(layer)
    if new.bias is None:
        new.bias = nn.Parameter(layer.weight.new_zeros(w.shape[0]))
    with torch.no_grad():
        new.weight.copy_((w * scale.view(-1, *([1] * (w.dim() - 1)))).to(layer.weight.dtype))
        new.bias.copy_((b * scale + shift).to(layer.weight.dtype))
    return new


def foldable(prev: Layer, bn: Layer, any_mode: bool = False) -> bool:
    """Whether eval-mode BatchNorm ``bn`` can be folded into the Conv2d/Linear ``prev``
    (``any_mode``: fold its running statistics even if the layer is in train mode)."""
    if not isinstance(bn, BatchNorm) or bn.module.running_mean is None or not (any_mode or bn.eval_ready()):
        return False
    m = bn.module
    if type(prev) is Conv2d:
        return isinstance(m, nn.BatchNorm2d) and prev.module.out_channels == m.num_features
    return type(prev) is Linear and isinstance(m, nn.BatchNorm1d) and prev.module.out_features == m.num_features


def fold_batchnorm(net: Network, any_mode: bool = False) -> Network:
    """A copy of ``net`` with every eval-mode BatchNorm that is the only consumer of a Conv2d/Linear
    folded into it (same function up to rounding; export and CROWN use it)."""
    consumers = net.consumers()
    nodes: List[Node] = []
    mapping: Dict[int, int] = {}
    folded: Dict[int, int] = {}
    for i, node in enumerate(net.nodes):
        if i in folded:  # the BN after a folded layer: alias of the new layer node
            mapping[i] = folded[i]
            continue
        nxt = consumers[i]
        if len(nxt) == 1 and foldable(node.rule, net.nodes[nxt[0]].rule, any_mode):
            bn = net.nodes[nxt[0]]
            new = type(node.rule)(_fold_into(node.rule.module, bn.rule.module), node.name)
            nodes.append(Node(node.name, new, tuple(mapping[j] for j in node.inputs)))
            mapping[i] = folded[nxt[0]] = len(nodes) - 1
            continue
        nodes.append(Node(node.name, node.rule, tuple(mapping[j] for j in node.inputs)))
        mapping[i] = len(nodes) - 1
    return Network(nodes)


__all__ = ["CUSTOM_INTERVAL", "fold_batchnorm", "foldable", "from_module", "make_rule"]
