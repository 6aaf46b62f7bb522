"""The forms `tfopt.export` rebuilds some Keras layers in, so that the LiteRT
converter takes them and runs them in integer.

- LSTM, GRU and SimpleRNN are exported unrolled (`unroll=True`): Keras 3's
  recurrent loop (a TensorList while loop) does not convert at all, float or
  int8 ("TensorListReserve"); unrolled, every step is FULLY_CONNECTED,
  LOGISTIC, TANH, MUL and ADD, which have int8 and int16x8 kernels. This needs
  a fixed sequence length (the model's Input).
- LayerNormalization is exported as `IntegerLayerNormalization` when its
  ranges are calibrated: the same values, computed as `(x - mean) *
  rsqrt(var + eps) * gamma + beta`, without the NEG op of Keras's fused form
  (`x * inv - mean * inv`), which LiteRT has no int8 or int16 kernel for.

The rebuilt layers have the same weights in the same order; the model that
`fit` trained is never changed (export converts a copy).
"""

import keras
from keras import ops

from tfopt import geometry

__all__ = ["IntegerLayerNormalization"]


def _unrolled(layer, config):
    try:
        steps = layer.input.shape[1]
    except (AttributeError, ValueError):  # not called in a graph, or called more than once
        steps = 0
    if steps is None:
        raise ValueError(
            f"tfopt.export: layer '{layer.name}' ({type(layer).__name__}) is recurrent, which LiteRT runs "
            "unrolled (Keras 3's RNN loop does not convert), and that needs a fixed sequence length; its "
            f"input has shape {tuple(layer.input.shape)}. Fix: give the model's Input a fixed number of "
            "steps, e.g. keras.Input((steps, features)).")
    return type(layer), {**config, "unroll": True}


for _rnn in (keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN):
    geometry.register_export_form(_rnn)(_unrolled)


class IntegerLayerNormalization(keras.layers.LayerNormalization):
    """`keras.layers.LayerNormalization` computed in ops LiteRT runs in integer
    (module docstring); same weights, same values (to float rounding).

    Example:
    >>> import numpy as np, keras
    >>> x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype("float32")
    >>> a, b = keras.layers.LayerNormalization(), IntegerLayerNormalization()
    >>> bool(np.allclose(a(x), b(x), atol=1e-5))
    True
    """

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        axes = [self.axis] if isinstance(self.axis, int) else list(self.axis)
        mean = ops.mean(x, axis=axes, keepdims=True)
        centered = x - mean
        normalized = centered * ops.rsqrt(ops.mean(centered * centered, axis=axes, keepdims=True) + self.epsilon)
        if self.rms_scaling:  # Keras's rms_scaling divides x (not x - mean) by the standard deviation
            normalized = x * ops.rsqrt(ops.mean(centered * centered, axis=axes, keepdims=True) + self.epsilon)
        shape = [1] * len(x.shape)
        for axis in axes:
            shape[axis] = x.shape[axis]
        if self.scale:
            normalized = normalized * ops.reshape(ops.cast(self.gamma, "float32"), shape)
        if self.center and not self.rms_scaling:
            normalized = normalized + ops.reshape(ops.cast(self.beta, "float32"), shape)
        return ops.cast(normalized, self.compute_dtype)


@geometry.register_export_form(keras.layers.LayerNormalization, calibration_only=True)
def _integer_layer_normalization(layer, config):
    return IntegerLayerNormalization, config
