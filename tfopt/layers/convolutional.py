"""tfopt twins of Keras's convolution layers (axes in `tfopt.geometry`)."""

import keras

from tfopt.layers.base import twin

__all__ = [
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

Conv1D = twin(keras.layers.Conv1D, module=__name__)
Conv2D = twin(keras.layers.Conv2D, module=__name__)
Conv3D = twin(keras.layers.Conv3D, module=__name__)
Conv1DTranspose = twin(keras.layers.Conv1DTranspose, module=__name__)
Conv2DTranspose = twin(keras.layers.Conv2DTranspose, module=__name__)
Conv3DTranspose = twin(keras.layers.Conv3DTranspose, module=__name__)
DepthwiseConv1D = twin(keras.layers.DepthwiseConv1D, module=__name__)
DepthwiseConv2D = twin(keras.layers.DepthwiseConv2D, module=__name__)
SeparableConv1D = twin(keras.layers.SeparableConv1D, module=__name__)
SeparableConv2D = twin(keras.layers.SeparableConv2D, module=__name__)

Conv2D.__doc__ += """
    Example:
    >>> import keras, numpy as np, tfopt
    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 1)),
    ...     tfopt.layers.Conv2D(4, (3, 3), activation="relu", pruning_schedule="baseline"),
    ...     keras.layers.Flatten(),
    ...     keras.layers.Dense(10),
    ... ])
    >>> model.compile("adam", "mse")
    >>> _ = model.fit(np.ones((4, 8, 8, 1)), np.ones((4, 10)), verbose=0)
    >>> round(float((model.layers[0].kernel.numpy() == 0).mean()), 2)
    0.5
"""
