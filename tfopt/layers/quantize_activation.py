"""`QuantizeActivation`: fake-quantizes a tensor to a range tracked during training."""

import keras
from keras import ops

from tfopt import _backend, _keras_internal, _state, geometry
from tfopt import quantizers
from tfopt._arguments import python_number

__all__ = ["QuantizeActivation", "QuantizedRescaling", "QuantizingLayer", "add_range_weights",
           "track_and_quantize", "when_started"]


class QuantizingLayer:
    """Marks tfopt layers that fake-quantize (what
    `tfopt.callbacks.QuantizationSchedule` schedules). The schedule itself is
    tfopt state (`tfopt._state.QUANTIZATION_TIMES`): integer variables compared
    in-graph with the layer's own step count, so changing it needs no retrace."""

    def is_quantizing(self):
        return True

    def quantization_times(self):
        """This layer's `QuantizationTimes`, or None (quantize from the first
        step, never freeze)."""
        return _state.QUANTIZATION_TIMES.get(self)


def when_started(step, times, quantized_fn, value):
    """`quantized_fn()` once `step >= times.start`, else `value` (in-graph).
    Without a schedule (`times` None), or while exporting, just `quantized_fn()`."""
    if times is None or _state.exporting():
        return quantized_fn()
    return ops.cond(ops.greater_equal(step, times.start), quantized_fn, lambda: value)


def frozen(count, freeze):
    """True (a tensor) once `count` reaches the freeze step `freeze` (a variable), None without one."""
    return None if freeze is None else ops.greater_equal(count, freeze)


def add_range_weights(layer, prefix=""):
    """Adds the float32 `range_min`/`range_max` and integer `range_updates`
    (`_backend.int_dtype()`: int64, int32 under JAX without x64) weights of a
    tracked activation range to `layer` and returns them. The range starts at
    [-6, 6] (as tfmot's), replaced by the first training batch."""
    # Replica-local: every replica writes the same reduced values to its own copy.
    local = _keras_internal.add_replica_local_weight
    lo = local(layer, f"{prefix}range_min", (), "float32", keras.initializers.Constant(-6.0), autocast=False)
    hi = local(layer, f"{prefix}range_max", (), "float32", keras.initializers.Constant(6.0), autocast=False)
    updates = local(layer, f"{prefix}range_updates", (), _backend.int_dtype(), "zeros")
    return lo, hi, updates


def track_and_quantize(inputs, range_weights, spec, momentum, update, times=None, step=None):
    """Fake-quantizes `inputs` to a tracked range (once the count `step`, by
    default the range's own, reaches `times.start`), then, if `update` (and
    while the range's update count is below `times.freeze_ranges`), moves the
    range towards this batch's min/max. The range always includes 0, as
    TFLite requires.

    The batch quantizes with the range as it stood before the batch (the very
    first training batch, which sets the range outright, passes through
    unquantized: the initial [-6, 6] would clip it): so the update needs no
    result in this forward pass, and
    under a tf.distribute strategy every range's min/max is reduced over the
    replicas together, in one collective per step (`_backend.batched_statistics`),
    with the same values as on one device."""
    range_min, range_max, range_updates = range_weights
    lo, hi = ops.convert_to_tensor(range_min), ops.convert_to_tensor(range_max)
    count = ops.convert_to_tensor(range_updates)
    step = count if step is None else step
    # TFLite needs 0 inside the range; lo <= 0 < 1e-6 <= hi keeps it non-empty.
    q_lo, q_hi = ops.minimum(lo, 0.0), ops.maximum(hi, 1e-6)
    outputs = when_started(step, times, lambda: quantizers.quantize_activation(inputs, q_lo, q_hi, spec), inputs)
    if update:
        # Few ops: on small models each op's fixed cost, not the reductions,
        # is most of what QAT adds to a step. (A cond costs a constant ~0.03 ms;
        # a where over the tensor, a pass over it.)
        outputs = ops.cond(ops.equal(count, 0), lambda: inputs, lambda: outputs)
        x = ops.stop_gradient(inputs)
        stop = frozen(count, None if times is None else times.freeze_ranges)

        def apply(reduced):
            batch_lo, batch_hi = -reduced[0], reduced[1]
            old = ops.where(ops.equal(count, 0), 0.0, momentum)  # the first batch sets the range
            new_lo, new_hi = batch_lo + old * (lo - batch_lo), batch_hi + old * (hi - batch_hi)
            if stop is not None:
                new_lo, new_hi = ops.where(stop, lo, new_lo), ops.where(stop, hi, new_hi)
            return [(range_min, new_lo), (range_max, new_hi), (range_updates, count + 1)]

        _backend.reduce_statistics([-ops.cast(ops.min(x), "float32"), ops.cast(ops.max(x), "float32")],
                                   ["max", "max"], apply)
    return outputs


@keras.saving.register_keras_serializable(package="tfopt")
class QuantizeActivation(QuantizingLayer, keras.layers.Layer):
    """Fake-quantizes its input to a per-tensor range tracked in-graph.

    Put it where an int8 model needs a range the layers around it do not
    provide: after the model's input, and after ops such as Add, Concatenate
    or an activation layer. The range is an exponential moving average of the
    batch minimum and maximum (the first training batch sets it outright),
    kept in two float32 variables updated inside the train step; under a
    `tf.distribute` strategy each batch statistic is first reduced over all
    replicas, so every replica holds the same range. The range always
    includes 0, as TFLite requires. At inference, or once frozen, the stored
    range is used as is.

    Args:
        bits: activation bit width (default 8, TFLite's int8).
        momentum: weight of the old range in the moving average.
        freeze: do not update the range any more (e.g. late in QAT).

    Call arguments:
        inputs: a float tensor.
        training: update the range from this batch (unless frozen).

    Example:
    >>> import numpy as np
    >>> layer = QuantizeActivation()
    >>> _ = layer(np.array([[-1.0, 0.0, 3.0]], "float32"), training=True)
    >>> float(layer.range_min.numpy()), float(layer.range_max.numpy())
    (-1.0, 3.0)
    """

    def __init__(self, bits=8, momentum=0.99, freeze=False, **kwargs):
        super().__init__(**kwargs)
        bits, momentum = python_number(bits), python_number(momentum)
        self.spec = quantizers.QuantSpec(bits, per_channel=False, symmetric=False, narrow_range=False)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(
                f"QuantizeActivation '{self.name}': `momentum` must be in [0, 1). Received: momentum={momentum!r}"
            )
        self.bits = bits
        self.momentum = momentum
        self.freeze = bool(freeze)
        self.supports_masking = True

    def build(self, input_shape=None):
        self.range_min, self.range_max, self.range_updates = add_range_weights(self)

    def call(self, inputs, training=None):
        return track_and_quantize(
            inputs, (self.range_min, self.range_max, self.range_updates), self.spec,
            self.momentum, update=bool(training) and not self.freeze, times=self.quantization_times(),
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "bits": self.bits, "momentum": self.momentum, "freeze": self.freeze}


@geometry.register_twin(keras.layers.Rescaling)
@keras.saving.register_keras_serializable(package="tfopt")
class QuantizedRescaling(QuantizingLayer, keras.layers.Rescaling):
    """`keras.layers.Rescaling` whose scale and offset constants are
    fake-quantized, so that the int8 converter can quantize its MUL and ADD
    (in quantization-aware conversion, only constants behind a fake-quant op
    get quantization parameters). `tfopt.quantize_model` puts it in place of
    Rescaling; each constant is exactly representable (it is its own range's
    end point), so the layer computes what Rescaling computes.

    Example:
    >>> import numpy as np
    >>> layer = QuantizedRescaling(1 / 127.5, offset=-1.0)
    >>> round(float(layer(np.array([0.0, 255.0], "float32"), training=True)[1]), 3)
    1.0
    """

    def build(self, input_shape=None):
        super().build(input_shape)
        # The product before the offset is a tensor of its own in the
        # converted graph, and needs a range too.
        self.product_range = add_range_weights(self, prefix="product_")

    def call(self, inputs, training=None):
        dtype = self.compute_dtype
        x = ops.cast(inputs, "float32")
        spec = quantizers.QuantSpec(8, symmetric=True, narrow_range=True)

        step = ops.convert_to_tensor(self.product_range[2])
        times = self.quantization_times()

        def constant(value):
            c = ops.cast(ops.convert_to_tensor(value), "float32")
            m = ops.maximum(ops.max(ops.abs(c)), 1e-8)
            return when_started(step, times, lambda: quantizers.fake_quant(c, -m, m, spec), c)

        product = track_and_quantize(
            x * constant(self.scale), self.product_range, quantizers.QuantSpec(8), momentum=0.99,
            update=bool(training), times=times, step=step,
        )
        out = product + constant(self.offset) if self.offset != 0 else product
        return ops.cast(out, dtype)
