"""The model zoo for the experiments: MLP, the edge-of-stability CNN, CIFAR ResNets,
Wide-ResNets, VGG with BatchNorm and a small character-level Transformer.

>>> from samkit.models import create_model, count_parameters
>>> model = create_model("resnet20", (3, 32, 32), 10)
>>> count_parameters(model)
269722
"""

from samkit.models.cnn import SmallCNN
from samkit.models.common import ACTIVATIONS
from samkit.models.mlp import MLP
from samkit.models.registry import count_parameters, create_model, list_models, register_model
from samkit.models.resnet import CifarResNet
from samkit.models.transformer import CharTransformer
from samkit.models.vgg import VGG
from samkit.models.wrn import WideResNet

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "VGG",
    "CharTransformer",
    "CifarResNet",
    "SmallCNN",
    "WideResNet",
    "count_parameters",
    "create_model",
    "list_models",
    "register_model",
]
