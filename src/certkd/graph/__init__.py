"""One network representation for every engine: a DAG of layer rules (``docs/adding_a_layer.md``).

``from_module(nn.Module)`` and ``from_onnx(path)`` build a :class:`Network`; IBP, CROWN /
α-CROWN / β-CROWN, the MILP, BaB and ONNX export walk it.
"""
from certkd.graph.convert import fold_batchnorm, from_module
from certkd.graph.layers import Layer, UnsupportedLayerError
from certkd.graph.network import Network, Node
from certkd.graph.onnx_import import from_onnx


__all__ = ["Layer", "Network", "Node", "UnsupportedLayerError", "fold_batchnorm", "from_module", "from_onnx"]
