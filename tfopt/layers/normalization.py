"""tfopt twin of Keras's LayerNormalization, quantization-aware.

Under quantization-aware training the twin computes layer normalization in
the ops LiteRT runs in integer, each result fake-quantized to a range of its
own, so that an int8 export without calibration data is full integer:

    mean = MEAN(x)                       range "mean"
    centered = x - mean                  range "centered"  (SUB)
    squared = centered * centered        range "squared"   (MUL)
    variance = MEAN(squared)             range "variance"
    shifted = variance + epsilon         range "variance_epsilon" (ADD)
    inverse = RSQRT(shifted)             range "inverse"
    normalized = centered * inverse      range "normalized" (x * inverse with rms_scaling)
    scaled = normalized * gamma          range "scaled" (when a beta follows)
    output = scaled + beta               the layer's output range

(The converter gives a tensor int8 quantization parameters only where a
fake-quant op gives it a range.) `gamma` and `beta` are fake-quantized per
tensor, 8-bit symmetric whatever the kernels' precision: they scale every
feature, and 4 bits there cost more than they save. Keras's own form,
`x * inv - mean * inv`, has a NEG op that LiteRT has no int8 kernel for.
With quantization off the twin is exactly `keras.layers.LayerNormalization`.
"""

import keras
from keras import ops

from tfopt import quantizers
from tfopt.layers import _weight_quantization
from tfopt.layers.base import twin
from tfopt.layers.quantize_activation import track_and_quantize

__all__ = ["LayerNormalization", "inverse_deviation", "PARAMETER_SPEC"]

#: gamma and beta: 8-bit, symmetric, per tensor (a per-channel MUL/ADD constant does not convert).
PARAMETER_SPEC = quantizers.QuantSpec(8, per_channel=False, symmetric=True, narrow_range=True)


def inverse_deviation(centered, axes, epsilon, ranged):
    """`1 / sqrt(mean(centered ** 2) + epsilon)` over `axes`, in LiteRT's integer ops
    (MUL, MEAN, ADD, RSQRT), each result through `ranged(name, tensor)` (ranges
    "squared", "variance", "variance_epsilon", "inverse"). `centered` is `x - mean`
    for a layer normalization, `x` itself for an RMS normalization (keras-hub's Llama).

    Example:
    >>> import numpy as np
    >>> x = np.array([[3.0, -4.0]], "float32")
    >>> round(float(inverse_deviation(x, [-1], 0.0, lambda name, t: t)[0, 0]) ** -2, 4)  # mean(9, 16)
    12.5
    """
    squared = ranged("squared", centered * centered)
    variance = ranged("variance", ops.mean(squared, axis=axes, keepdims=True))
    return ranged("inverse", ops.rsqrt(ranged("variance_epsilon", variance + epsilon)))


class IntegerLayerNormalizationCall:
    """Mixin of the LayerNormalization twin: the quantization-aware forward
    pass in LiteRT's integer ops (module docstring)."""

    INTERMEDIATE_RANGES = ("mean", "centered", "squared", "variance", "variance_epsilon", "inverse", "normalized",
                           "scaled")

    def call(self, inputs, training=None):
        if self.output_quant_spec is None:
            return keras.layers.LayerNormalization.call(self, inputs)
        step = ops.convert_to_tensor(self.output_range_updates)  # before this call's update
        times = self.quantization_times()

        def ranged(name, tensor):
            return self.intermediate(name, tensor, training, step, times)

        def parameter(variable):
            return _weight_quantization.quantized_tensor(
                self, lambda: ops.cast(ops.convert_to_tensor(variable), "float32"), PARAMETER_SPEC, step, times)

        x = ops.cast(inputs, "float32")
        axes = [self.axis] if isinstance(self.axis, int) else list(self.axis)
        shape = [1] * len(x.shape)
        for axis in axes:
            shape[axis] = x.shape[axis]
        mean = ranged("mean", ops.mean(x, axis=axes, keepdims=True))
        centered = ranged("centered", x - mean)
        inverse = inverse_deviation(centered, axes, self.epsilon, ranged)
        # Keras's rms_scaling divides x itself (not x - mean) by the standard deviation.
        outputs = (x if self.rms_scaling else centered) * inverse
        if self.gamma is not None or self.beta is not None:
            outputs = ranged("normalized", outputs)
        if self.gamma is not None:
            outputs = outputs * ops.reshape(parameter(self.gamma), shape)
            if self.beta is not None:
                outputs = ranged("scaled", outputs)
        if self.beta is not None:
            outputs = outputs + ops.reshape(parameter(self.beta), shape)
        outputs = track_and_quantize(
            outputs, (self.output_range_min, self.output_range_max, self.output_range_updates),
            self.output_quant_spec, momentum=0.99, update=bool(training), times=times, step=step)
        return ops.cast(outputs, self.compute_dtype)


LayerNormalization = twin(keras.layers.LayerNormalization, doc="""Drop-in `keras.layers.LayerNormalization` that is quantization-aware.

    Takes every argument of `keras.layers.LayerNormalization` (`rms_scaling`
    included), plus `quantization_aware=` (see `tfopt.layers.Prunable`; its
    `gamma` is never pruned). With `quantization_aware` it computes the
    normalization in the ops LiteRT runs in integer (mean, difference,
    square, mean, add, reciprocal square root, products), each with a range
    tracked in training (`tfopt/layers/normalization.py`), so that
    `tfopt.export(..., precision="int8")` writes it full integer without
    `representative_data`. `tfopt.quantize_model` puts it in place of
    LayerNormalization. Without `quantization_aware` it computes exactly what
    Keras computes.

    Example:
    >>> import keras, numpy as np, tfopt
    >>> x = np.random.default_rng(0).normal(size=(4, 3, 8)).astype("float32")
    >>> layer = tfopt.layers.LayerNormalization(quantization_aware="int8")
    >>> _ = layer(x, training=True)  # the first batch sets the ranges
    >>> y = layer(x)
    >>> bool(np.allclose(y, keras.layers.LayerNormalization()(x), atol=0.05))
    True
    >>> [w.name for w in layer.weights][:4]
    ['gamma', 'beta', 'output_range_min', 'output_range_max']
    """, module=__name__, mixin=IntegerLayerNormalizationCall)
