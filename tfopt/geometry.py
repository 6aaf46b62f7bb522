"""Layer geometry: what tfopt may optimize in each Keras layer type, and along which axes.

One entry per layer type, read by pruning, quantization-aware training,
BatchNormalization folding, reporting, export and the model transforms;
nothing else in tfopt asks `isinstance` of Keras layer types. An entry says:

- `weights`: the layer's optimizable weights, each a `WeightSpec` (attribute
  path, input and output axes, quantization axis, depthwise layout, gates);
- `role`: for layers without weights of their own, what quantization-aware
  training does around them (`PASS_THROUGH`: they move values, the input's
  range carries through; `NEEDS_RANGE`: they make new values that need an
  output range of their own; `BATCH_NORM`: folded into the layer before it
  when it can be, else given a range);
- the tfopt *twin*: the drop-in class `tfopt.prune`/`quantize_model` swap in
  (registered by the twin itself, with `register_twin`).

Lookups walk the layer's class hierarchy, so a subclass of a registered type
gets its parent's entry (but is never swapped for a twin: that would drop
the subclass's own behaviour).

Add your own layer type with one call:

>>> import keras
>>> class Gated(keras.layers.Layer):
...     def build(self, input_shape):
...         self.w = self.add_weight(shape=(input_shape[-1], 4), name="w")
...     def call(self, x):
...         return x @ self.w
>>> _ = register(Gated, weights=[WeightSpec("w", in_axis=0, out_axis=1)])
>>> layer = Gated()
>>> layer.build((None, 8))
>>> [(spec.path, tuple(variable.shape)) for spec, variable in weights_of(layer)]
[('w', (8, 4))]
"""

import dataclasses

import keras

from tfopt import _keras_internal

__all__ = [
    "WeightSpec",
    "Geometry",
    "PASS_THROUGH",
    "NEEDS_RANGE",
    "BATCH_NORM",
    "WEIGHTS",
    "register",
    "register_twin",
    "of",
    "weights_of",
    "prunable_weights",
    "quantized_weights",
    "fold_weight",
    "twin_of",
    "twins",
    "role",
    "is_twin",
    "expand_height",
    "unroll_depth",
    "register_export_form",
    "export_form",
]

WEIGHTS = "weights"  # a layer with optimizable weights
PASS_THROUGH = "pass_through"  # moves or selects values: no range of its own
NEEDS_RANGE = "needs_range"  # makes new values: QAT puts a range after it
BATCH_NORM = "batch_norm"  # folded into the layer before it, or given a range


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One optimizable weight of a layer type.

    Args:
        path: attribute path from the layer to the variable (`"kernel"`,
            `"cell.recurrent_kernel"`).
        in_axis: the input-channel (reduction) axis: N:M groups run along it.
        out_axis: the output-channel axis: the "channel" structure removes
            slices along it, a folded BatchNormalization scales it.
        quant_axis: the axis of per-channel quantization as the TFLite converter
            sees the weight, or None for per-tensor only (Dense kernels:
            per-channel ones make the converter fail).
        depthwise: the weight is `(..., channels, multiplier)` and its output
            channels are `channels * multiplier` (TFLite's layout): per-channel
            ranges and folding use the flattened last two axes.
        gates: the output axis stacks this many gate blocks (LSTM 4, GRU 3).
        prune: pruned by `tfopt.prune`, the twins and the Pruning callback.
        quantize: fake-quantized by quantization-aware training.
        fold: a BatchNormalization that follows the layer folds into this weight.
        litert_layout: None when LiteRT holds the weight in the Keras layout;
            else `fn(layer, weight) -> weight` giving the layout of the op
            LiteRT runs instead (`expand_height`: a 1-D convolution runs as a
            2-D one; `unroll_depth`: a 3-D convolution as a 2-D one over depth
            slices, LiteRT's CONV_3D being float only). Quantization-aware
            training fake-quantizes the weight in that layout, the one whose
            channels the converter quantizes (per-channel ranges on the Keras
            layout make it fail: "'tfl.reshape' op requires output type ...
            cast compatible"), and the twin computes in it.
    """

    path: str
    in_axis: int = 0
    out_axis: int = -1
    quant_axis: int | None = None
    depthwise: bool = False
    gates: int = 1
    prune: bool = True
    quantize: bool = True
    fold: bool = False
    litert_layout: object = None

    @property
    def name(self):
        """The variable's attribute name (the last part of `path`)."""
        return self.path.rsplit(".", 1)[-1]

    def variable(self, layer):
        """The variable at `path` on a built `layer`."""
        obj = layer
        for part in self.path.split("."):
            obj = getattr(obj, part)
        return obj

    def owner(self, layer):
        """The (sub)layer that holds the variable as an attribute."""
        obj = layer
        for part in self.path.split(".")[:-1]:
            obj = getattr(obj, part)
        return obj

    def channels(self, shape):
        """Number of output channels of a weight of this `shape`."""
        return shape[-2] * shape[-1] if self.depthwise else shape[self.out_axis]

    def channel_shape(self, shape):
        """Shape a per-output-channel vector broadcasts to against the weight."""
        rank = len(shape)
        if self.depthwise:
            return (1,) * (rank - 2) + tuple(shape[-2:])
        out = self.out_axis % rank
        return tuple(shape[out] if i == out else 1 for i in range(rank))


def expand_height(layer, weight):
    """`(k, ...)` -> `(1, k, ...)`: a 1-D convolution's kernel as a 2-D one's."""
    from keras import ops

    return ops.expand_dims(weight, 0)


def unroll_depth(layer, weight):
    """`(kd, kh, kw, in, out)` -> `(kh, kw, kd * in, out)`: a 3-D convolution's
    kernel as that of a 2-D convolution over `kd` depth slices stacked on the
    channel axis (channels_last, ungrouped layers; others keep their kernel)."""
    from keras import ops

    if getattr(layer, "groups", 1) != 1:
        return weight
    kd, kh, kw, cin, cout = weight.shape
    return ops.reshape(ops.transpose(weight, (1, 2, 0, 3, 4)), (kh, kw, kd * cin, cout))


@dataclasses.dataclass
class Geometry:
    """The registry entry of one layer type (see the module docstring)."""

    layer_type: type
    weights: tuple = ()
    role: str = WEIGHTS
    twin: type | None = None
    export_form: object = None  # fn(layer, config) -> (class, config), see `register_export_form`
    export_form_calibration_only: bool = False


_REGISTRY = {}  # layer type -> Geometry


def register(layer_type, weights=(), role=None):
    """Registers (or replaces) the geometry of `layer_type` and returns it.

    Args:
        layer_type: a `keras.layers.Layer` subclass.
        weights: its `WeightSpec`s.
        role: `PASS_THROUGH`, `NEEDS_RANGE` or `BATCH_NORM` for layers without
            optimizable weights; default `WEIGHTS`.
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, keras.layers.Layer)):
        raise TypeError(
            "`tfopt.geometry.register` takes a Keras layer class. Received: "
            f"layer_type={layer_type!r} of type {type(layer_type).__name__}"
        )
    weights = tuple(weights)
    bad = [w for w in weights if not isinstance(w, WeightSpec)]
    if bad:
        raise TypeError(
            f"`tfopt.geometry.register({layer_type.__name__}, weights=...)` takes `WeightSpec`s. "
            f"Received: {bad!r}"
        )
    if role is None:
        role = WEIGHTS
    if role not in (WEIGHTS, PASS_THROUGH, NEEDS_RANGE, BATCH_NORM):
        raise ValueError(
            f"`role` must be one of {(WEIGHTS, PASS_THROUGH, NEEDS_RANGE, BATCH_NORM)}. Received: role={role!r}"
        )
    old = _REGISTRY.get(layer_type)
    entry = Geometry(layer_type, weights, role, twin=old.twin if old else None)
    if old is not None:
        entry.export_form, entry.export_form_calibration_only = old.export_form, old.export_form_calibration_only
    _REGISTRY[layer_type] = entry
    return entry


def register_twin(keras_type):
    """Class decorator: marks the decorated class as the tfopt twin of
    `keras_type` (which must be registered). `tfopt.prune` and
    `tfopt.quantize_model` swap exact instances of `keras_type` for it."""

    def decorate(twin):
        entry = _REGISTRY.get(keras_type)
        if entry is None:
            raise ValueError(
                f"{twin.__name__}: register the geometry of {keras_type.__name__} "
                "(`tfopt.geometry.register`) before its twin."
            )
        entry.twin = twin
        twin.keras_class = keras_type
        return twin

    return decorate


def register_export_form(keras_type, calibration_only=False):
    """Decorator: registers `fn(layer, config) -> (class, config)`, how
    `tfopt.export` rebuilds layers of `keras_type` (a registered type, and its
    subclasses) so that the LiteRT converter takes them: RNNs unrolled,
    LayerNormalization without the NEG op LiteRT has no integer kernel for.
    `calibration_only`: only when activation ranges are calibrated
    (`representative_data`), where the form matters."""

    def decorate(fn):
        entry = _REGISTRY.get(keras_type)
        if entry is None:
            raise ValueError(f"register the geometry of {keras_type.__name__} before its export form.")
        entry.export_form, entry.export_form_calibration_only = fn, calibration_only
        return fn

    return decorate


def export_form(layer, calibrating):
    """The `(class, config)` `tfopt.export` rebuilds `layer` as, or None to keep it."""
    entry = of(layer)
    if entry is None or entry.export_form is None or (entry.export_form_calibration_only and not calibrating):
        return None
    return entry.export_form(layer, layer.get_config())


def of(layer):
    """The `Geometry` of a layer (or layer class), from its nearest registered
    class; None if neither it nor a parent is registered."""
    cls = layer if isinstance(layer, type) else type(layer)
    for klass in cls.__mro__:
        entry = _REGISTRY.get(klass)
        if entry is not None:
            return entry
    return None


def role(layer):
    """The layer's role (`WEIGHTS`, `PASS_THROUGH`, ...), or None if unknown."""
    entry = of(layer)
    return None if entry is None else entry.role


def weights_of(layer, which=None):
    """`[(WeightSpec, variable)]` of a built layer, optionally only those with
    `which` ("prune", "quantize" or "fold") set."""
    entry = of(layer)
    if entry is None:
        return []
    try:  # (while the layer builds, `built` is still False but its weights exist)
        return [(spec, spec.variable(layer)) for spec in entry.weights if which is None or getattr(spec, which)]
    except AttributeError:  # not built yet
        return []


def prunable_weights(layer):
    """`[(WeightSpec, variable)]` that pruning applies to."""
    return weights_of(layer, "prune")


def quantized_weights(layer):
    """`[(WeightSpec, variable)]` that quantization-aware training fake-quantizes."""
    return weights_of(layer, "quantize")


def fold_weight(layer):
    """The `WeightSpec` a following BatchNormalization folds into, or None."""
    entry = of(layer)
    return next((spec for spec in entry.weights if spec.fold), None) if entry else None


def twin_of(layer):
    """The tfopt twin class to swap for `layer`: for exact instances of a
    registered Keras type (never for subclasses); a twin is its own. None otherwise."""
    if is_twin(layer):
        return type(layer)
    entry = _REGISTRY.get(type(layer))
    return None if entry is None else entry.twin


def is_twin(layer):
    """True for instances of tfopt's twin classes."""
    return getattr(type(layer), "keras_class", None) is not None and any(
        e.twin is not None and isinstance(layer, e.twin) for e in _REGISTRY.values()
    )


def twins():
    """`{Keras type: twin}` for every registered twin."""
    return {t: e.twin for t, e in _REGISTRY.items() if e.twin is not None}


# --- the table ---------------------------------------------------------------------------
L = keras.layers

# Dense-like: per-tensor quantization (per-channel Dense kernels make the converter fail).
register(L.Dense, [WeightSpec("kernel", in_axis=0, out_axis=-1, fold=True)])
register(L.EinsumDense, [WeightSpec("kernel", in_axis=0, out_axis=-1, fold=True)])
register(L.Embedding, [WeightSpec("embeddings", in_axis=-1, out_axis=-1)])

# Convolutions: kernel (..., in, out), per output channel; 1-D ones run as 2-D in LiteRT.
# Convolutions: kernel (..., in, out), per output channel; LiteRT runs 1-D and 3-D ones as 2-D.
for _conv, _layout in ((L.Conv1D, expand_height), (L.Conv2D, None), (L.Conv3D, unroll_depth)):
    register(_conv, [WeightSpec("kernel", in_axis=-2, out_axis=-1, quant_axis=-1, fold=True, litert_layout=_layout)])
# Transposed: kernel (..., out, in); per tensor.
for _conv in (L.Conv1DTranspose, L.Conv2DTranspose, L.Conv3DTranspose):
    register(_conv, [WeightSpec("kernel", in_axis=-1, out_axis=-2, fold=True)])
# Depthwise: kernel (..., channels, multiplier), per channel x multiplier.
for _conv, _layout in ((L.DepthwiseConv1D, expand_height), (L.DepthwiseConv2D, None)):
    register(_conv, [WeightSpec("kernel", in_axis=-2, out_axis=-2, quant_axis=-1, depthwise=True, fold=True,
                                litert_layout=_layout)])
# Separable: a depthwise kernel (quantized only) then a pointwise one; LiteRT
# runs them as two ops, with a range between them (the twins compute so).
for _conv, _layout in ((L.SeparableConv1D, expand_height), (L.SeparableConv2D, None)):
    register(_conv, [
        WeightSpec("depthwise_kernel", in_axis=-2, out_axis=-2, quant_axis=-1, depthwise=True, prune=False,
                   litert_layout=_layout),
        WeightSpec("pointwise_kernel", in_axis=-2, out_axis=-1, quant_axis=-1, fold=True, litert_layout=_layout),
    ])

# Recurrent layers: (in, gates * units) kernels, pruned; int8 comes later (issue 12).
for _rnn, _gates in ((L.LSTM, 4), (L.GRU, 3), (L.SimpleRNN, 1)):
    register(_rnn, [
        WeightSpec("cell.kernel", in_axis=0, out_axis=1, gates=_gates, quantize=False),
        WeightSpec("cell.recurrent_kernel", in_axis=0, out_axis=1, gates=_gates, quantize=False),
    ])

# Described for structural pruning and int8 of transformers (issues 12, 13); their
# EinsumDense sublayers are pruned as EinsumDense layers today.
register(L.MultiHeadAttention, [
    WeightSpec(f"_{part}_dense.kernel", in_axis=0, out_axis=1, prune=False, quantize=False)
    for part in ("query", "key", "value")
] + [WeightSpec("_output_dense.kernel", in_axis=0, out_axis=-1, prune=False, quantize=False)])
register(L.LayerNormalization, [WeightSpec("gamma", in_axis=None, out_axis=-1, prune=False, quantize=False)])
# ConvNeXt's per-channel LayerScale (`x * gamma`): float under QAT, integer once calibrated.
_layer_scale = _keras_internal.convnext_layer_scale()
if _layer_scale is not None:
    register(_layer_scale, [WeightSpec("gamma", in_axis=None, out_axis=-1, prune=False, quantize=False)])

for _layer in (
    L.InputLayer, L.Flatten, L.Reshape, L.Permute,
    L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D,
    # TFLite's int8 AVERAGE_POOL_2D requires its output on its input's scale.
    L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D,
    L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D,
    L.Dropout, L.SpatialDropout1D, L.SpatialDropout2D,
    L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D,
    L.Cropping1D, L.Cropping2D, L.Cropping3D,
    L.UpSampling1D, L.UpSampling2D, L.Identity,
    L.ActivityRegularization, L.GaussianNoise, L.GaussianDropout,
):
    register(_layer, role=PASS_THROUGH)

for _layer in (
    L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum, L.Concatenate,
    L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalAveragePooling3D,
    L.Activation, L.ReLU, L.LeakyReLU, L.PReLU, L.ELU, L.Softmax,
    L.Rescaling, L.Normalization,
):
    register(_layer, role=NEEDS_RANGE)

register(L.BatchNormalization, role=BATCH_NORM)

del L, _conv, _layout, _rnn, _gates, _layer, _layer_scale
