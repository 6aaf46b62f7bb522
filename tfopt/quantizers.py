"""Quantization specs and fake-quantization functions for quantization-aware training.

A `QuantSpec` says how one tensor is quantized: bit width, per-channel or
per-tensor, symmetric or not, narrow range or not, or one of the low-bit
modes `"binary"` (sign, as in Larq) and `"ternary"` (-a, 0, a). The functions
here are pure: they take a tensor (and, for activations, its range) and return
the fake-quantized tensor, whose values lie on the quantization grid and whose
gradient is the straight-through estimator.

Affine quantization is `keras.quantizers.fake_quant_with_min_max_vars`, which
the TFLite converter recognises, so a model trained with it converts to
full-integer int8 without representative data.

Defaults follow the TFLite int8 specification: weights per-channel (last
axis), symmetric, narrow range ([-127, 127]); activations per-tensor,
asymmetric ([-128, 127]).

Two registries make a new precision or mode one registration, not a branch:
`register_mode` (how weights of a `QuantSpec.mode` are fake-quantized, how
many levels and stored bits they have, whether the converter can fold the
graph) and `register_precision` (a name such as "int4" for a pair of specs).
"""

import dataclasses

import keras
from keras import ops

from tfopt import _state
from tfopt._arguments import Configurable, python_number

__all__ = [
    "QuantSpec",
    "PRECISIONS",
    "get_precision",
    "get_training_precision",
    "weight_range",
    "fake_quant",
    "quantize_weight",
    "quantize_activation",
    "binary",
    "ternary",
    "carry_int8",
    "QuantizationMode",
    "register_mode",
    "get_mode",
    "register_precision",
    "int_weight_values",
]


@dataclasses.dataclass(frozen=True)
class QuantizationMode:
    """How weights of one `QuantSpec.mode` are quantized.

    Attributes:
        name: the `mode` string.
        quantize: `fn(weight, spec, axis) -> fake-quantized weight` (values on
            the grid, straight-through gradient), per channel along `axis`
            when `spec.per_channel`.
        levels: `fn(spec) -> number of representable values`.
        bits: `fn(spec) -> bits per weight once exported` (reporting).
        min_bits: the smallest `spec.bits` the mode accepts.
        converter_folds: False when the TFLite converter cannot fold the
            mode's graph into constants (sign/threshold ops): `tfopt.export`
            then computes the weights' values eagerly and hands them over
            behind an exact int8 fake-quant.
    """

    name: str
    quantize: object
    levels: object
    bits: object
    min_bits: int = 1
    converter_folds: bool = True


_MODES = {}


def register_mode(mode):
    """Registers a `QuantizationMode` (replacing one of the same name) and returns it."""
    if not isinstance(mode, QuantizationMode):
        raise TypeError(f"`register_mode` takes a QuantizationMode. Received: {mode!r}")
    _MODES[mode.name] = mode
    return mode


def get_mode(name):
    """The registered `QuantizationMode` called `name`."""
    if name not in _MODES:
        raise ValueError(
            f"Unknown quantization mode. Expected one of {sorted(_MODES)} (or a mode added "
            f"with `tfopt.quantizers.register_mode`). Received: mode={name!r}"
        )
    return _MODES[name]


@keras.saving.register_keras_serializable(package="tfopt")
class QuantSpec(Configurable):
    """How to quantize one tensor.

    Args:
        bits: bit width of affine quantization, 2..16 (ignored by "binary"
            and "ternary", which are 1 and 2 bits).
        per_channel: one range per output channel (last axis of the weight)
            instead of one per tensor. Weights only.
        symmetric: range `[-m, m]` with zero exactly representable.
        narrow_range: drop the lowest code (int8: [-127, 127]), as TFLite's
            weight spec requires.
        mode: "affine" (fake quantization), "binary" (sign times the mean
            magnitude per channel, straight-through gradient) or "ternary"
            ({-a, 0, a}, threshold 0.7 of the mean magnitude).

    Example:
    >>> QuantSpec(8, per_channel=True, symmetric=True, narrow_range=True).levels
    255
    """

    def __init__(self, bits=8, per_channel=False, symmetric=False, narrow_range=False, mode="affine"):
        bits = python_number(bits)
        if mode not in _MODES:
            raise ValueError(f"QuantSpec: `mode` must be one of {tuple(_MODES)}. Received: mode={mode!r}")
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
            raise ValueError(
                f"QuantSpec: `bits` must be an int from 1 to 16. Received: bits={bits!r}. "
                "For 1-bit weights use mode='binary' (or precision 'binary')."
            )
        if bits < _MODES[mode].min_bits:
            raise ValueError(
                f"QuantSpec: {mode} quantization needs at least {_MODES[mode].min_bits} bits. "
                f"Received: bits={bits}. For 1-bit weights use mode='binary'."
            )
        self.bits = bits
        self.per_channel = bool(per_channel)
        self.symmetric = bool(symmetric)
        self.narrow_range = bool(narrow_range)
        self.mode = mode

    @property
    def levels(self):
        """Number of representable values."""
        return _MODES[self.mode].levels(self)

    @property
    def stored_bits(self):
        """Bits per weight once exported (1 for binary, 2 for ternary)."""
        return _MODES[self.mode].bits(self)

    def get_config(self):
        return {
            "bits": self.bits,
            "per_channel": self.per_channel,
            "symmetric": self.symmetric,
            "narrow_range": self.narrow_range,
            "mode": self.mode,
        }


def _weights(bits, mode="affine"):
    return QuantSpec(bits, per_channel=True, symmetric=True, narrow_range=True, mode=mode)


def _activations(bits=8):
    return QuantSpec(bits, per_channel=False, symmetric=False, narrow_range=False)


#: Named precisions: `(weight spec, activation spec)`. `"float16"` is an
#: export-only precision (no fake quantization in training): both are None.
PRECISIONS = {}


def register_precision(name, weight_spec, activation_spec):
    """Names a `(weight spec, activation spec)` pair, usable wherever a precision
    is taken (`quantization_aware=`, `quantize_model`, `overrides`).

    Example:
    >>> register_precision("int6", QuantSpec(6, per_channel=True, symmetric=True, narrow_range=True),
    ...                    QuantSpec(8))
    >>> get_precision("int6")[0].bits
    6
    >>> del PRECISIONS["int6"]
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"`register_precision`: `name` must be a non-empty string. Received: name={name!r}")
    for arg, spec in (("weight_spec", weight_spec), ("activation_spec", activation_spec)):
        if spec is not None and not isinstance(spec, QuantSpec):
            raise TypeError(f"`register_precision`: `{arg}` must be a QuantSpec or None. Received: {spec!r}")
    PRECISIONS[name.lower()] = (weight_spec, activation_spec)


def get_precision(identifier):
    """Returns `(weight_spec, activation_spec)` for a precision.

    Accepts True (int8), a name in `PRECISIONS`, a `QuantSpec` (used for the
    weights, with int8 activations), or a `(weight_spec, activation_spec)` pair.

    Example:
    >>> w, a = get_precision("int4")
    >>> w.bits, w.per_channel, a.bits, a.symmetric
    (4, True, 8, False)
    """
    if identifier is True:
        identifier = "int8"
    if isinstance(identifier, str):
        key = identifier.lower()
        if key not in PRECISIONS:
            raise ValueError(
                f"Unknown precision: {identifier!r}. Expected one of {sorted(PRECISIONS)}, "
                "True (int8), or a `tfopt.quantizers.QuantSpec`."
            )
        return PRECISIONS[key]
    if isinstance(identifier, QuantSpec):
        return identifier, _activations(8)
    if isinstance(identifier, dict):
        return get_precision(keras.saving.deserialize_keras_object(identifier))
    if isinstance(identifier, (tuple, list)) and len(identifier) == 2:
        w, a = (keras.saving.deserialize_keras_object(s) if isinstance(s, dict) else s for s in identifier)
        if all(s is None or isinstance(s, QuantSpec) for s in (w, a)):
            if a is not None and a.per_channel:
                raise ValueError(
                    "Activation specs must be per-tensor (ranges are tracked per tensor). "
                    f"Received an activation spec with per_channel=True: {a!r}"
                )
            return w, a
    raise ValueError(
        f"Cannot read a precision from {identifier!r} of type {type(identifier).__name__}. "
        f"Expected True, one of {sorted(PRECISIONS)}, a `QuantSpec`, or a "
        "(weight QuantSpec, activation QuantSpec) pair."
    )


def get_training_precision(identifier, where):
    """`get_precision(identifier)` for quantization-aware training: refuses a
    precision that fake-quantizes nothing (the export-only "float16"), and
    prefixes errors with `where`."""
    try:
        specs = get_precision(identifier)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if specs == (None, None):
        raise ValueError(
            f"{where}: {identifier!r} quantizes nothing during training; float16 is an export "
            "precision. Fix: train in float and export with `tfopt.export(model, path, "
            "precision='float16')`, or pick a training precision such as 'int8'."
        )
    return specs


def weight_range(weight, spec, axis=-1):
    """The `(min, max)` a weight is quantized with: per channel along `axis` or
    per tensor, symmetric or not; never an empty range.

    Example:
    >>> import numpy as np
    >>> lo, hi = weight_range(np.array([[-2.0, 0.5], [1.0, -0.25]], "float32"), QuantSpec(8, per_channel=True, symmetric=True))
    >>> np.asarray(lo).tolist(), np.asarray(hi).tolist()
    ([-2.0, -0.5], [2.0, 0.5])
    """
    weight = ops.convert_to_tensor(weight)
    if spec.per_channel:
        axis = axis % len(weight.shape)
        reduce_axes = tuple(i for i in range(len(weight.shape)) if i != axis)
    else:
        reduce_axes = None
    if spec.symmetric:
        # max |w| as max(max w, -min w): two reads, no |w| written (a pass less over a big kernel).
        m = ops.maximum(ops.max(weight, axis=reduce_axes), ops.negative(ops.min(weight, axis=reduce_axes)))
        if spec.per_channel:
            # An all-zero channel (pruned away) gets the largest channel's
            # range: its zeros stay zeros, and the converter's bias scale
            # (input scale x weight scale) stays large enough for its bias to
            # fit int32 (a 1e-8 range saturates it and corrupts the channel).
            m = ops.where(ops.greater(m, 1e-8), m, ops.max(m))
        m = ops.maximum(m, 1e-8)
        return -m, m
    lo = ops.minimum(ops.min(weight, axis=reduce_axes), 0.0)
    hi = ops.maximum(ops.max(weight, axis=reduce_axes), 0.0)
    return lo, ops.maximum(hi, lo + 1e-8)


def fake_quant(x, min_value, max_value, spec, axis=None):
    """Affine fake quantization of `x` to `spec.bits` within `[min, max]`
    (straight-through gradient inside the range)."""
    return keras.quantizers.fake_quant_with_min_max_vars(
        _read(x), min_value, max_value, num_bits=spec.bits, narrow_range=spec.narrow_range, axis=axis
    )


def _read(x):
    """A tensor from `x` (a backend variable such as a `tf.Variable` is read)."""
    x = ops.convert_to_tensor(x)
    return x if hasattr(x, "ndim") else ops.copy(x)


def _ste(x, quantized):
    """`quantized` forward (exactly: `x - stop_gradient(x)` is 0), identity backward."""
    return ops.stop_gradient(quantized) + (x - ops.stop_gradient(x))


def _channel_mean_abs(w, axis):
    axis = axis % len(w.shape)
    reduce_axes = tuple(i for i in range(len(w.shape)) if i != axis)
    return ops.mean(ops.abs(w), axis=reduce_axes, keepdims=True)


def binary(w, axis=-1):
    """Sign of `w` scaled by its mean magnitude per channel; straight-through
    gradient, clipped to |w| <= 1 as in Larq's `ste_sign`.

    Example:
    >>> import numpy as np
    >>> np.asarray(binary(np.array([[0.5], [-1.5]], "float32"))).ravel().tolist()
    [1.0, -1.0]
    """
    w = _read(w)
    scale = ops.stop_gradient(_channel_mean_abs(w, axis))
    sign = ops.where(w >= 0, 1.0, -1.0)
    clipped = ops.clip(w, -1.0, 1.0)
    return _ste(clipped, sign * scale)


def ternary(w, axis=-1):
    """Ternary weights {-a, 0, a} (Li & Liu, Ternary Weight Networks, 2016):
    threshold 0.7 x mean |w| per channel, `a` the mean magnitude above it.

    Example:
    >>> import numpy as np
    >>> [round(float(v), 2) for v in np.asarray(ternary(np.array([[1.0], [-1.0], [0.1], [0.9]], "float32"))).ravel()]
    [0.97, -0.97, 0.0, 0.97]
    """
    w = _read(w)
    axis = axis % len(w.shape)
    reduce_axes = tuple(i for i in range(len(w.shape)) if i != axis)
    threshold = 0.7 * _channel_mean_abs(w, axis)
    keep = ops.cast(ops.abs(w) > threshold, w.dtype)
    count = ops.maximum(ops.sum(keep, axis=reduce_axes, keepdims=True), 1.0)
    alpha = ops.sum(ops.abs(w) * keep, axis=reduce_axes, keepdims=True) / count
    q = ops.sign(w) * keep * alpha
    return _ste(w, ops.stop_gradient(q))


def quantize_weight(w, spec, axis=-1):
    """Fake-quantizes a weight per `spec` (per-channel ranges along `axis`),
    with the function of its registered mode."""
    if spec is None:
        return w
    return _MODES[spec.mode].quantize(w, spec, axis)


def _quantize_affine(w, spec, axis=-1):
    w = _read(w)
    if _state.exporting():  # the converter folds the FakeQuant op itself into int8 weights
        return _affine_values(w, spec, axis)

    # The weight's range holds every weight, so the straight-through gradient is the
    # identity: said directly, the backward pass skips TensorFlow's FakeQuant gradient (a
    # pass over the weight plus two reductions for the range, unused). Measured in one
    # process, interleaved: the 784-512-512-10 MLP's QAT step 1.26x -> 1.21x of plain.
    @ops.custom_gradient
    def quantize(x):
        def grad(*args, upstream=None):
            return args[0] if upstream is None else upstream

        return _affine_values(x, spec, axis), grad

    return quantize(w)


def _affine_values(w, spec, axis):
    w_dtype, shape = w.dtype, w.shape
    x = ops.cast(w, "float32")
    axis = axis % len(shape)
    # TF's per-channel fake quant (and its gradient) wants the channel last and
    # rank <= 4; otherwise quantize a (rest, channels) matrix. The TFLite
    # converter reads the direct form only, so reshape just when needed.
    reshaped = spec.per_channel and (axis != len(shape) - 1 or len(shape) > 4)
    if reshaped:
        moved = ops.moveaxis(x, axis, -1)
        x = ops.reshape(moved, (-1, shape[axis]))
    lo, hi = weight_range(x, spec, -1)
    out = fake_quant(x, ops.stop_gradient(lo), ops.stop_gradient(hi), spec, axis=-1 if spec.per_channel else None)
    if reshaped:
        out = ops.moveaxis(ops.reshape(out, moved.shape), -1, axis)
    return ops.cast(out, w_dtype)


def carry_int8(q, spec, axis=-1):
    """Passes binary/ternary weights through an 8-bit symmetric fake quant.

    Exact for `{-a, 0, a}` per channel (`a` is the range's end) when
    `spec.per_channel`; with one range per tensor, each channel's `a` is
    rounded to the int8 grid of the largest, as the int8 file stores it. The
    converter needs the FakeQuant op to store such weights as int8."""
    carrier = QuantSpec(8, per_channel=spec.per_channel, symmetric=True, narrow_range=True)
    return quantize_weight(q, carrier, axis)


def quantize_activation(x, min_value, max_value, spec):
    """Fake-quantizes an activation to its tracked `[min, max]` range (float32
    quantizer math whatever the compute dtype, as in mixed precision)."""
    if spec is None:
        return x
    dtype = x.dtype
    out = fake_quant(ops.cast(x, "float32"), min_value, max_value, spec)
    return ops.cast(out, dtype)


def int_weight_values(w, bits, block_size=0):
    """Quantize-dequantize of a 2-D `(inputs, outputs)` weight exactly as LiteRT's
    quantizer (`litert-quantizer` 0.11, min-max, symmetric) stores it.

    One scale per output column (`block_size=0`), or per block of `block_size`
    consecutive inputs of each column. The scale is `max |w| / qmax` (qmax = 7
    for int4, 127 for int8); integers are `round(w / scale)` (half to even),
    clipped to [-8, 7] for int4 and to the narrow [-127, 127] for 8 bits; a
    blockwise scale is rounded to bfloat16 then float16, as the file stores it.
    Re-quantizing the result gives back the same integers and scales, so a
    weight trained on this grid is written to the file unchanged.
    Straight-through gradient (identity). `keras.ops` only.

    Example:
    >>> import numpy as np
    >>> w = np.array([[0.7, -0.1], [0.25, 0.2]], "float32")
    >>> np.round(np.asarray(int_weight_values(w, 4), "float64"), 3).tolist()  # (2.5 and -3.5 round to even)
    [[0.7, -0.114], [0.2, 0.2]]
    """
    w = _read(w)
    dtype, shape = w.dtype, w.shape
    if len(shape) != 2:
        raise ValueError(f"int_weight_values: `w` must be a 2-D (inputs, outputs) weight. Received: shape {tuple(shape)}")
    if block_size and shape[0] % block_size:
        raise ValueError(
            f"int_weight_values: block_size={block_size} must divide the input dimension {shape[0]}. Fix: pick a "
            "block size that divides it, or block_size=0 (one scale per output).")
    qmax = 2.0 ** (bits - 1) - 1
    qmin = -qmax if bits >= 8 else -qmax - 1  # (8 bits and more: narrow range, as the quantizer)
    x = ops.cast(w, "float32")
    if block_size:
        x = ops.reshape(x, (shape[0] // block_size, block_size, shape[1]))
    bound = ops.max(ops.abs(x), axis=-2, keepdims=True)
    scale = ops.maximum(bound, 1e-9) / qmax
    if block_size:  # the file keeps blockwise scales in float16 with a 7-bit mantissa
        scale = ops.cast(ops.cast(ops.cast(scale, "bfloat16"), "float16"), "float32")
    values = ops.clip(ops.round(x / scale), qmin, qmax) * scale
    values = ops.cast(ops.reshape(values, shape), dtype)
    return _ste(w, ops.stop_gradient(values))


# --- the registered modes and precisions ----------------------------------------------------
def _affine_levels(spec):
    return 2**spec.bits - (1 if spec.narrow_range else 0)


register_mode(QuantizationMode("affine", quantize=_quantize_affine, levels=_affine_levels,
                               bits=lambda spec: spec.bits, min_bits=2))
register_mode(QuantizationMode("binary", quantize=lambda w, spec, axis: carry_int8(binary(w, axis), spec, axis),
                               levels=lambda spec: 2, bits=lambda spec: 1, converter_folds=False))
register_mode(QuantizationMode("ternary", quantize=lambda w, spec, axis: carry_int8(ternary(w, axis), spec, axis),
                               levels=lambda spec: 3, bits=lambda spec: 2, converter_folds=False))

register_precision("int8", _weights(8), _activations(8))
register_precision("int4", _weights(4), _activations(8))
register_precision("int2", _weights(2), _activations(8))
register_precision("ternary", _weights(2, "ternary"), _activations(8))
register_precision("binary", _weights(1, "binary"), _activations(8))
register_precision("bool", _weights(1, "binary"), _activations(8))
register_precision("float16", None, None)
