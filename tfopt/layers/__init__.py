"""Drop-in Keras layers that prune and quantize during `fit`.

Each class takes every argument of its Keras namesake plus
`pruning_schedule=`, `structure=`, `quantization_aware=` and
`folded_batch_norm=`, keeps the same weight names, and with none of them
computes exactly what the Keras layer computes. Each twin is registered in
`tfopt.geometry` when its class is made (`tfopt.layers.base.twin`).
"""

from tfopt.layers.attention import MultiHeadAttention
from tfopt.layers.base import Prunable
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
from tfopt.layers.litert_forms import IntegerLayerNormalization
from tfopt.layers.normalization import LayerNormalization
from tfopt.layers.quantize_activation import QuantizeActivation, QuantizedRescaling
from tfopt.layers.recurrent import GRU, LSTM, SimpleRNN

__all__ = [
    "Prunable",
    "QuantizeActivation",
    "QuantizedRescaling",
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
    "LSTM",
    "GRU",
    "SimpleRNN",
    "LayerNormalization",
    "MultiHeadAttention",
    "IntegerLayerNormalization",
]
