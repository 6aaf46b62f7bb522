"""Fake quantization of a tfopt layer's weights, per its `tfopt.geometry` entry.

Each weight the entry marks `quantize=True` is fake-quantized with the
layer's weight `QuantSpec`: per output channel along the entry's `quant_axis`
when the spec asks for it and the converter accepts it (else per tensor),
depthwise kernels per channel x multiplier (TFLite's layout). A folded
BatchNormalization scales the weight first; a weight LiteRT runs with one
layout (`WeightSpec.litert_layout`: 1-D and 3-D convolutions) is returned in
that layout, for the twin's integer forward pass. Modes the converter cannot fold
(binary, ternary) are computed eagerly while exporting.
"""

from keras import ops

from tfopt import _backend, _state, geometry, quantizers
from tfopt.layers.quantize_activation import when_started

__all__ = ["check_quantizable", "quantized_weights", "quantized_tensor"]


def check_quantizable(layer):
    """Raises if `layer`'s type has no weight that quantization-aware training handles."""
    entry = geometry.of(layer)
    specs = [] if entry is None else [s for s in entry.weights if s.quantize]
    if not specs:
        raise ValueError(
            f"Layer '{layer.name}' ({type(layer).__name__}) got `quantization_aware`, but tfopt does "
            "not quantize this layer type yet (its `tfopt.geometry` entry marks no weight "
            "`quantize=True`). Leave `quantization_aware` off for it (with `tfopt.quantize_model`, "
            "pass `unsupported='float'` or `overrides={name: None}`)."
        )
    # (A weight a sublayer holds is read by a twin of its own computing, through the
    # spec's `holder`: MultiHeadAttention's projections.)
    nested = [s.path for s in specs if "." in s.path and s.holder is None]
    if nested:
        raise ValueError(
            f"Layer '{layer.name}' ({type(layer).__name__}): quantization-aware training reads "
            f"weights held by the layer itself, not by a sublayer ({nested})."
        )


def _layer_spec(weight_spec, spec):
    """The QuantSpec for one weight: per channel only where the geometry allows it."""
    if weight_spec.per_channel and spec.quant_axis is None:
        return quantizers.QuantSpec(**{**weight_spec.get_config(), "per_channel": False})
    return weight_spec


def quantized_weights(layer, weight_spec, step, times, folding=None):
    """`{weight name: fake-quantized tensor}` for every quantized weight of `layer`."""
    out = {}
    for spec, variable in geometry.quantized_weights(layer):
        qspec = _layer_spec(weight_spec, spec)
        flatten = spec.depthwise and qspec.per_channel
        fold = folding is not None and spec.fold

        def read(variable=variable, fold=fold, layout=spec.litert_layout):
            weight = ops.cast(ops.convert_to_tensor(variable), "float32")
            weight = folding.fold(weight) if fold else weight
            # In the layout of the op LiteRT runs (`WeightSpec.litert_layout`).
            return weight if layout is None else layout(layer, weight)

        weight = read()

        def quantize(w=weight, read=read, s=qspec, flatten=flatten, axis=spec.quant_axis):
            shape = tuple(w.shape)
            axis = -1 if (axis is None or flatten) else axis

            def flat(x):
                return ops.reshape(x, shape[:-2] + (shape[-2] * shape[-1],)) if flatten else x

            if not quantizers.get_mode(s.mode).converter_folds and _state.exporting():
                # The converter cannot fold this mode's graph: hand it the
                # values, computed eagerly, behind an exact int8 fake quant.
                values = _backend.in_init_scope(
                    lambda: ops.convert_to_numpy(quantizers.quantize_weight(flat(read()), s, axis)))
                q = quantizers.carry_int8(ops.convert_to_tensor(values), s, axis)
            else:
                q = quantizers.quantize_weight(flat(w), s, axis)
            return ops.reshape(q, shape) if flatten else q

        value = when_started(step, times, quantize, weight)
        out[spec.name] = ops.cast(value, layer.compute_dtype)
    return out


def quantized_tensor(layer, read, spec, step, times, axis=-1):
    """`read()` (a float32 weight tensor) fake-quantized per `spec` once `step`
    reaches the schedule's start, in `layer`'s compute dtype: for twins that
    quantize weights of their own computing (a sublayer's kernel in the
    layout of the op LiteRT runs, a LayerNormalization's gamma)."""
    weight = read()

    def quantize():
        if not quantizers.get_mode(spec.mode).converter_folds and _state.exporting():
            values = _backend.in_init_scope(lambda: ops.convert_to_numpy(quantizers.quantize_weight(read(), spec, axis)))
            return quantizers.carry_int8(ops.convert_to_tensor(values), spec, axis)
        return quantizers.quantize_weight(weight, spec, axis)

    return ops.cast(when_started(step, times, quantize, weight), layer.compute_dtype)
