"""Drop-in Keras layers that prune (and, later, quantize) during `fit`.

Each class takes every argument of its Keras namesake plus
`pruning_schedule=` and `structure=`, keeps the same weight names, and with
no schedule computes exactly what the Keras layer computes.
"""

from tfopt.layers.convolutional import (
    Conv1D,
    Conv1DTranspose,
    Conv2D,
    Conv2DTranspose,
    Conv3D,
    Conv3DTranspose,
    DepthwiseConv1D,
    DepthwiseConv2D,
    SeparableConv1D,
    SeparableConv2D,
)
from tfopt.layers.core import Dense, EinsumDense, Embedding
from tfopt.layers.prunable import Prunable
from tfopt.layers.quantize_activation import QuantizeActivation

__all__ = [
    "Prunable",
    "QuantizeActivation",
    "Dense",
    "EinsumDense",
    "Embedding",
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "Conv1DTranspose",
    "Conv2DTranspose",
    "Conv3DTranspose",
    "DepthwiseConv1D",
    "DepthwiseConv2D",
    "SeparableConv1D",
    "SeparableConv2D",
]
