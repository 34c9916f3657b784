"""One rule class per layer type (see ``docs/adding_a_layer.md``); importing registers them."""
from certkd.graph.layers.base import Layer, UnsupportedLayerError, register, rule_class
from certkd.graph.layers.activation import Activation, Relaxation
from certkd.graph.layers.add import Add, AddModule
from certkd.graph.layers.avgpool import AvgPool2d
from certkd.graph.layers.batchnorm import BatchNorm, bn_scale_shift
from certkd.graph.layers.conv import Conv2d
from certkd.graph.layers.identity import Identity
from certkd.graph.layers.leaky_relu import LeakyReLU
from certkd.graph.layers.linear import Linear
from certkd.graph.layers.pad import ConstantPad, Pad
from certkd.graph.layers.relu import ReLU
from certkd.graph.layers.reshape import Flatten, Reshape
from certkd.graph.layers.sigmoid import Sigmoid
from certkd.graph.layers.tanh import Tanh
from certkd.graph.layers.scale_shift import ElementwiseAffine, NormalizeRule, ScaleShift, ScaleShiftModule
from certkd.graph.layers.transpose import Permute, Transpose

__all__ = ["Activation", "Add", "AddModule", "AvgPool2d", "BatchNorm", "ConstantPad", "Conv2d", "ElementwiseAffine",
           "Flatten", "Identity", "Layer", "LeakyReLU", "Linear", "NormalizeRule", "Pad", "Permute", "ReLU",
           "Relaxation", "Reshape", "ScaleShift", "ScaleShiftModule", "Sigmoid", "Tanh", "Transpose", "UnsupportedLayerError",
           "bn_scale_shift", "register", "rule_class"]
