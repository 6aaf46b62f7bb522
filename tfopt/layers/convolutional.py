"""tfopt twins of Keras's convolution layers."""

import keras

from tfopt.layers.prunable import Prunable, with_keras_signature

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


def _twin(keras_cls, weight, nm_axis):
    doc = f"""Drop-in `keras.layers.{keras_cls.__name__}` that can prune `{weight}` during `fit`.

    Takes every argument of `keras.layers.{keras_cls.__name__}`, plus
    `pruning_schedule=` and `structure=` (see `tfopt.layers.Prunable`).
    N:M groups run along {nm_axis}.
    """
    cls = type(keras_cls.__name__, (Prunable, keras_cls), {"__doc__": doc, "__module__": __name__})
    cls = keras.saving.register_keras_serializable(package="tfopt")(cls)
    return with_keras_signature(cls)


_IN = "the input-channel axis (-2) of the kernel"
Conv1D = _twin(keras.layers.Conv1D, "kernel", _IN)
Conv2D = _twin(keras.layers.Conv2D, "kernel", _IN)
Conv3D = _twin(keras.layers.Conv3D, "kernel", _IN)
Conv1DTranspose = _twin(keras.layers.Conv1DTranspose, "kernel", "the input-channel axis (-1) of the kernel")
Conv2DTranspose = _twin(keras.layers.Conv2DTranspose, "kernel", "the input-channel axis (-1) of the kernel")
Conv3DTranspose = _twin(keras.layers.Conv3DTranspose, "kernel", "the input-channel axis (-1) of the kernel")
DepthwiseConv1D = _twin(keras.layers.DepthwiseConv1D, "kernel", "the channel axis (-2)")
DepthwiseConv2D = _twin(keras.layers.DepthwiseConv2D, "kernel", "the channel axis (-2)")
SeparableConv1D = _twin(keras.layers.SeparableConv1D, "pointwise_kernel", _IN)
SeparableConv2D = _twin(keras.layers.SeparableConv2D, "pointwise_kernel", _IN)

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
