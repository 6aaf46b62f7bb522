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

A LayerNormalization nested in a custom layer (a keras-io `TransformerBlock`
holding attention, two LayerNormalizations and a feed-forward Sequential) is
reached too: `export_copy` gives a copy of the custom layer, and
`use_nested_forms` turns its nested LayerNormalizations into
`IntegerLayerNormalization`s once it is built (same state, same weights: only
the ops change). A custom layer Keras cannot re-create from its config is
kept as it is, with a warning naming the nested layers that stay float.
"""

import warnings

import keras
from keras import ops

from tfopt import _keras_internal, geometry

__all__ = ["IntegerLayerNormalization", "export_copy", "use_nested_forms"]


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


def nested_forms(layer, calibrating):
    """`[(sublayer, form class)]` for the layers nested in `layer` (not a
    model) whose export form only changes their class to one computing the
    same values from the same state (IntegerLayerNormalization)."""
    if isinstance(layer, keras.Model) or not isinstance(layer, keras.layers.Layer):
        return []  # (an op in the graph, such as keras-hub's `x[:, 0, :]`, holds no layer)
    out = []
    for sub in _keras_internal.all_layers(layer):
        form = geometry.export_form(sub, calibrating)
        if form is not None and form[0] is not type(sub) and issubclass(form[0], type(sub)) \
                and form[1] == sub.get_config():
            out.append((sub, form[0]))
    return out


def export_copy(layer, calibrating):
    """For the export form of a model: `layer` itself when no layer nested in
    it has an export form, else a copy of it re-created from its config (call
    it, set its weights, then `use_nested_forms(copy, calibrating)`). A layer
    Keras cannot re-create from its config is returned as it is, with a
    warning naming the nested layers that then stay in their Keras form.

    Example:
    >>> import keras
    >>> class Block(keras.layers.Layer):
    ...     def __init__(self, **kwargs):
    ...         super().__init__(**kwargs)
    ...         self.norm = keras.layers.LayerNormalization()
    ...     def call(self, x):
    ...         return self.norm(x)
    >>> block = Block(name="block")
    >>> _ = block(keras.ops.ones((1, 4)))
    >>> copy = export_copy(block, calibrating=True)
    >>> _ = copy(keras.ops.ones((1, 4)))
    >>> copy.set_weights(block.get_weights())
    >>> use_nested_forms(copy, calibrating=True)
    >>> type(copy.norm).__name__, type(block.norm).__name__
    ('IntegerLayerNormalization', 'LayerNormalization')
    """
    nested = nested_forms(layer, calibrating)
    if not nested:
        return layer
    try:
        return type(layer).from_config(layer.get_config())
    except Exception as error:  # (a custom layer whose __init__ takes no **kwargs, ...)
        names = [f"{sub.name} ({type(sub).__name__})" for sub, _ in nested]
        reason = (str(error).strip().splitlines() or [""])[-1]
        warnings.warn(
            f"tfopt.export: layers {names} inside layer '{layer.name}' ({type(layer).__name__}) stay in their "
            f"Keras form (LayerNormalization keeps a NEG op, which LiteRT runs in float only), because "
            f"'{layer.name}' cannot be re-created from its config ({type(error).__name__}: {reason}). Fix: let "
            f"{type(layer).__name__}.__init__ take **kwargs and return every argument from get_config().",
            UserWarning, stacklevel=2)
        return layer


def use_nested_forms(copy, calibrating):
    """Puts the layers nested in `copy` (made by `export_copy`, built, its
    weights set) in their export form: same state and weights, other ops."""
    for sub, form in nested_forms(copy, calibrating):
        sub.__class__ = form
