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
  (registered by the twin itself, with `register_twin`);
- `channels`: how the layer carries channels (the last axis), read by
  `tfopt.shrink` to remove channels, heads and units, and by `macs` to count
  multiply-adds (see `register_channels`).

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
import functools

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
    "register_channels",
    "channel_flow",
    "NEW",
    "SAME",
    "MERGE",
    "CONCAT",
    "FLATTEN",
    "HEADS",
    "macs",
]

WEIGHTS = "weights"  # a layer with optimizable weights
PASS_THROUGH = "pass_through"  # moves or selects values: no range of its own
NEEDS_RANGE = "needs_range"  # makes new values: QAT puts a range after it
BATCH_NORM = "batch_norm"  # folded into the layer before it, or given a range

# How a layer carries channels (the last axis of its inputs and outputs), for `tfopt.shrink`.
NEW = "new"  # makes its own output channels from its input channels (conv, Dense): removable on both sides
SAME = "same"  # per channel: output channel c is made from input channel c only (BN, activations, pooling)
MERGE = "merge"  # element-wise over several inputs (Add, Multiply, ...): their channels are the same ones
CONCAT = "concat"  # concatenation on the channel axis: output channels are the inputs' in order
FLATTEN = "flatten"  # (..., C) -> (... * C): each output unit carries one input channel
HEADS = "heads"  # MultiHeadAttention: heads are removable units; its in/out channels are not


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
        holder: None when `path` reads attributes of the layer; else
            `fn(layer) -> sublayer`, the sublayer that holds the variable
            (as its attribute `name`, the last part of `path`) when Keras
            keeps that sublayer private: MultiHeadAttention's projections,
            read through `tfopt._keras_internal`. `path` then names it for
            messages (`"query_dense.kernel"`).
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
    holder: object = None

    @property
    def name(self):
        """The variable's attribute name (the last part of `path`)."""
        return self.path.rsplit(".", 1)[-1]

    def variable(self, layer):
        """The variable at `path` on a built `layer`."""
        if self.holder is not None:
            return getattr(self.holder(layer), self.name)
        obj = layer
        for part in self.path.split("."):
            obj = getattr(obj, part)
        return obj

    def owner(self, layer):
        """The (sub)layer that holds the variable as an attribute."""
        if self.holder is not None:
            return self.holder(layer)
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
    channels: str | None = None  # NEW, SAME, MERGE, CONCAT, FLATTEN, HEADS; None: unknown (nothing removed)
    size_key: str | None = None  # NEW layers: the config key of their output width ("filters", "units")


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
        entry.channels, entry.size_key = old.channels, old.size_key
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


def register_channels(layer_type, flow, size_key=None):
    """Says how `layer_type` (registered) carries channels, so `tfopt.shrink`
    can remove channels through it: `NEW` (its registered weights' `in_axis`
    reads input channels and `out_axis` makes output channels, as do its
    vectors of output width; `size_key` is the config key of that width),
    `SAME` (per channel: its weights' last axis, or a depthwise kernel's
    channel axis, follows the channels), `MERGE`, `CONCAT`, `FLATTEN` or
    `HEADS`. A `SAME` layer whose config holds its width (Reshape's
    `target_shape`) names that key too. Layers without it stop removal: their inputs and outputs keep
    every channel."""
    if flow not in (NEW, SAME, MERGE, CONCAT, FLATTEN, HEADS):
        raise ValueError(f"`flow` must be one of {(NEW, SAME, MERGE, CONCAT, FLATTEN, HEADS)}. Received: flow={flow!r}")
    if flow == NEW and size_key is None:
        raise ValueError(f"register_channels({layer_type.__name__}, NEW) needs `size_key`, the config key of its width.")
    entry = _REGISTRY.get(layer_type)
    if entry is None:
        entry = register(layer_type, role=PASS_THROUGH if flow == SAME else NEEDS_RANGE)
    entry.channels, entry.size_key = flow, size_key
    return entry


def channel_flow(layer):
    """`(flow, size_key)` of `layer` for `tfopt.shrink`, or `(None, None)`.

    Layer configurations that break the per-channel reading are unknown here:
    grouped or channels_first convolutions, depth multipliers other than 1,
    normalization over another axis, EinsumDense other than a matmul on the
    last axis, concatenation on another axis."""
    entry = of(layer)
    if entry is None or entry.channels is None:
        return None, None
    flow = entry.channels
    if getattr(layer, "data_format", "channels_last") != "channels_last" or getattr(layer, "groups", 1) != 1:
        return None, None
    if getattr(layer, "depth_multiplier", 1) != 1:
        return None, None
    axis = getattr(layer, "axis", -1)
    if flow in (SAME, CONCAT) and isinstance(axis, (list, tuple)):
        axis = axis[0] if len(axis) == 1 else None
    if flow in (SAME, CONCAT) and axis != -1 and isinstance(getattr(layer, "input", None), keras.KerasTensor):
        rank = len(layer.input.shape) if not isinstance(layer.input, list) else len(layer.input[0].shape)
        axis = axis % rank - rank if isinstance(axis, int) else None  # BatchNormalization(axis=3) on rank 4
    if flow in (SAME, CONCAT) and axis != -1 and (flow == CONCAT or role(layer) == BATCH_NORM):
        return None, None
    if isinstance(layer, keras.layers.EinsumDense) and _einsum_last_axis(layer) is None:
        return None, None
    return flow, entry.size_key


def _einsum_last_axis(layer):
    """For an EinsumDense that is a matmul over the last axis ("abc,cd->abd"), True; else None."""
    try:
        inputs, rest = layer.equation.split(",")
        kernel, output = rest.split("->")
    except ValueError:
        return None
    ok = (len(kernel) == 2 and inputs[-1] == kernel[0] and output[-1] == kernel[1]
          and kernel[0] not in output and (layer.bias_axes or kernel[1]) == kernel[1])
    return True if ok else None


def macs(layer, input_shapes, output_shapes, per_timestep=False, parts=False):
    """Multiply-adds of one call of `layer` on one example (batch axis left
    out), from its input and output shapes (lists of tuples, batch first).

    Each kernel entry counts once per output position (Dense, convolutions,
    depthwise ones too) or per input position (transposed convolutions); an
    Embedding is a lookup (0); MultiHeadAttention adds its scores and
    weighted sum to its projections. A recurrent layer (SimpleRNN, LSTM,
    GRU, ConvLSTM1D/2D/3D, a `keras.layers.RNN` of their cells) counts its
    input and recurrent kernels once per timestep (a ConvLSTM's once per
    output position of each timestep), a `Bidirectional` layer its forward
    and backward layers, a `TimeDistributed` layer its layer once per
    timestep. Biases, activations, the element-wise products of gates and
    layers whose weights act element-wise (BatchNormalization, PReLU) are not
    counted: layers without a kernel count 0. None means unknown: a custom
    layer with weights, or a size the shapes leave open (an input of shape
    `(None, None, features)`: its number of timesteps).

    Args:
        layer: a built Keras layer.
        input_shapes: the shapes of its inputs, batch first.
        output_shapes: the shapes of its outputs, batch first.
        per_timestep: for a layer that runs over a time axis (recurrent,
            `Bidirectional`, `TimeDistributed`), the count of one timestep,
            known even where the number of timesteps is not; None for other
            layers.
        parts: instead of a count, `[(layer, count)]`: `layer`'s own count
            first, then those of the layers it wraps (a `Bidirectional`'s
            forward and backward layers, a `TimeDistributed`'s layer), which
            make up its count.

    Example:
    >>> import keras
    >>> conv = keras.layers.Conv2D(8, 3, padding="same")
    >>> conv.build((None, 16, 16, 4))
    >>> macs(conv, [(None, 16, 16, 4)], [(None, 16, 16, 8)])
    73728
    >>> lstm = keras.layers.LSTM(8)  # (4 x 32 + 8 x 32) per timestep
    >>> lstm.build((None, 10, 4))
    >>> macs(lstm, [(None, 10, 4)], [(None, 8)])
    3840
    >>> macs(lstm, [(None, None, 4)], [(None, 8)]), macs(lstm, [(None, None, 4)], [(None, 8)], per_timestep=True)
    (None, 384)
    """
    found = _macs_parts(layer, [tuple(s) for s in input_shapes], [tuple(s) for s in output_shapes], per_timestep)
    return found if parts else found[0][1]


def _product(dims):
    """The product of `dims` as an int, or None if one of them is unknown."""
    import numpy as np

    dims = list(dims)
    return None if any(d is None for d in dims) else int(np.prod(dims, dtype="int64"))


def _times(count, factor):
    return None if count is None or factor is None else count * factor


def _macs_parts(layer, input_shapes, output_shapes, per_timestep):
    """`[(layer, count)]`: `layer` first, then the layers it wraps (see `macs`)."""
    if isinstance(layer, keras.layers.Bidirectional):
        sequence = input_shapes[:1]  # then the initial states, if any
        found = [_macs_parts(inner, sequence, _output_shapes(inner, sequence[0], output_shapes), per_timestep)
                 for inner in (layer.forward_layer, layer.backward_layer)]
        forward, backward = found[0][0][1], found[1][0][1]
        return [(layer, None if forward is None or backward is None else forward + backward)] + found[0] + found[1]
    if isinstance(layer, keras.layers.TimeDistributed):  # its layer on each timestep: (batch, time, ...)
        inner = _macs_parts(layer.layer, [s[:1] + s[2:] for s in input_shapes], [s[:1] + s[2:] for s in output_shapes],
                            False)
        steps = 1 if per_timestep else input_shapes[0][1]
        return [(layer, _times(inner[0][1], steps))] + [(sub, _times(count, steps)) for sub, count in inner]
    if isinstance(layer, keras.layers.RNN):
        return [(layer, _times(_recurrent_step_macs(layer, output_shapes), 1 if per_timestep else input_shapes[0][1]))]
    counter = _macs_counter(layer)
    if counter is not None:  # a composite layer described elsewhere (tfopt.adapters): its parts too
        if per_timestep:
            return [(layer, None)]
        found = counter(layer, input_shapes, output_shapes)
        return list(found) if isinstance(found, (list, tuple)) else [(layer, found)]
    return [(layer, None if per_timestep else _layer_macs(layer, input_shapes, output_shapes))]


_MACS = {}  # layer type -> fn(layer, input_shapes, output_shapes) -> count or [(layer, count), ...]


def register_macs(layer_type, fn):
    """Registers how `macs` counts layers of `layer_type` (and its subclasses)
    that the table cannot: composite layers (keras-hub's transformer blocks,
    registered by `tfopt.adapters`). `fn(layer, input_shapes, output_shapes)`
    returns the count of one call on one example, None if unknown, or
    `[(layer, count), (sublayer, count), ...]`: the layer's count first, then
    its sublayers' shares (which `tfopt.summary` shows on their rows).

    Example:
    >>> import keras
    >>> class Twice(keras.layers.Layer):
    ...     def build(self, input_shape):
    ...         self.inner = keras.layers.Dense(4)
    ...         self.inner.build(input_shape)
    ...     def call(self, x):
    ...         return self.inner(x) + self.inner(x)
    >>> register_macs(Twice, lambda layer, ins, outs: 2 * macs(layer.inner, ins, outs))
    >>> layer = Twice()
    >>> layer.build((None, 4))
    >>> macs(layer, [(None, 4)], [(None, 4)])
    32
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, keras.layers.Layer)) or not callable(fn):
        raise TypeError(
            "`tfopt.geometry.register_macs` takes a Keras layer class and a function fn(layer, input_shapes, "
            f"output_shapes). Received: layer_type={layer_type!r}, fn={fn!r}")
    _MACS[layer_type] = fn


def _macs_counter(layer):
    for klass in type(layer).__mro__:
        if klass in _MACS:
            return _MACS[klass]
    return None


def _output_shapes(layer, input_shape, fallback):
    """The output shapes of `layer` called on `input_shape` (a layer a wrapper calls), else `fallback`."""
    try:
        shape = layer.compute_output_shape(input_shape)
    except Exception:  # noqa: BLE001 (any layer's own shape inference; the fallback is the wrapper's)
        return fallback
    if isinstance(shape, (list, tuple)) and shape and isinstance(shape[0], (list, tuple)):
        return [tuple(s) for s in shape]
    return [tuple(shape)]


_DENSE_CELLS = (keras.layers.SimpleRNNCell, keras.layers.LSTMCell, keras.layers.GRUCell)
_CONV_RNNS = (keras.layers.ConvLSTM1D, keras.layers.ConvLSTM2D, keras.layers.ConvLSTM3D)


def _recurrent_step_macs(layer, output_shapes):
    """Multiply-adds of one timestep of a Keras recurrent layer: its cells'
    input and recurrent kernels once each (a ConvLSTM's once per output
    position); None for cells tfopt does not know."""
    cell = layer.cell
    cells = list(cell.cells) if isinstance(cell, keras.layers.StackedRNNCells) else [cell]
    positions = 1
    if isinstance(layer, _CONV_RNNS):
        out = output_shapes[0][2 if layer.return_sequences else 1:]  # batch and time aside
        channels_last = getattr(cell, "data_format", "channels_last") == "channels_last"
        positions = _product(out[:-1] if channels_last else out[1:])
    elif not all(isinstance(c, _DENSE_CELLS) for c in cells):
        return None
    try:
        per_position = sum(_product(c.kernel.shape) + _product(c.recurrent_kernel.shape) for c in cells)
    except AttributeError:  # not built
        return None
    return _times(per_position, positions)


def _layer_macs(layer, input_shapes, output_shapes):
    """`macs` of a layer that does not run over time."""
    entry = of(layer)
    if entry is None:
        return 0 if not getattr(layer, "weights", None) else None
    if not entry.weights:  # BatchNormalization, PReLU, ...: element-wise, like biases and activations
        return 0
    if isinstance(layer, keras.layers.MultiHeadAttention):
        q, v = input_shapes[0], input_shapes[1] if len(input_shapes) > 1 else input_shapes[0]
        k = input_shapes[2] if len(input_shapes) > 2 else v
        tq, ts = _product(q[1:-1]), _product(v[1:-1])
        h, dk = layer.num_heads, layer.key_dim
        dv = layer.value_dim or dk
        out = output_shapes[0][-1]
        if None in (tq, ts, q[-1], k[-1], v[-1], out):
            return None
        return (tq * q[-1] * h * dk + ts * k[-1] * h * dk + ts * v[-1] * h * dv  # projections
                + tq * ts * h * (dk + dv) + tq * h * dv * out)  # scores, weighted sum, output
    if isinstance(layer, keras.layers.EinsumDense):
        return _einsum_macs(layer, input_shapes[0], output_shapes[0])
    total = 0
    out_positions = _product(output_shapes[0][1:-1]) if output_shapes else 1
    in_positions = _product(input_shapes[0][1:-1])
    for spec, variable in weights_of(layer):
        if isinstance(layer, keras.layers.Embedding):
            continue  # a lookup
        if spec.gates > 1 or spec.path.startswith("cell.") or (spec.in_axis == -1 and spec.out_axis == -2):
            positions = in_positions  # a registered recurrent layer: per time step; transposed conv: per input
        else:  # convolutions (depthwise too) and Dense: each kernel entry once per output position
            positions = out_positions
        if positions is None:
            return None
        total += _product(variable.shape) * positions
    return total


def _einsum_macs(layer, input_shape, output_shape):
    """Every distinct index of an EinsumDense once (the batch's aside, the
    leading axes an ellipsis stands for included); None if one is unknown."""
    inputs, rest = layer.equation.split(",")
    kernel, output = rest.split("->")
    sizes = {}
    for letters, shape in ((inputs.replace("...", ""), input_shape), (kernel, tuple(layer.kernel.shape)),
                           (output.replace("...", ""), output_shape)):
        for letter, size in zip(letters, shape[len(shape) - len(letters):]):
            if size is not None:
                sizes[letter] = int(size)
            else:
                sizes.setdefault(letter, None)
    if inputs.startswith("..."):  # the axes between the batch and the named ones
        sizes["..."] = _product(input_shape[1:len(input_shape) - len(inputs) + 3])
    elif inputs[0] in output and inputs[0] not in kernel:
        sizes.pop(inputs[0], None)  # the batch
    return _product(sizes.values())


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


def outputs_probabilities(layer):
    """True when `layer`'s output is a softmax over its last axis: an
    `activation="softmax"` (Dense, Activation, ...) or a `keras.layers.Softmax`
    on the last axis. (Read by distillation, which must not take probabilities
    for logits.)

    Example:
    >>> import keras
    >>> outputs_probabilities(keras.layers.Softmax()), outputs_probabilities(keras.layers.Dense(3))
    (True, False)
    """
    if isinstance(layer, keras.layers.Softmax):
        axis = layer.axis
        return axis == -1 or axis == [-1] or axis == (-1,)
    activation = getattr(layer, "activation", None)
    return activation is keras.activations.softmax or getattr(activation, "__name__", None) == "softmax"


def sums(layer):
    """True for a `keras.layers.Add`: the converter writes an Add of n > 2 inputs as
    n - 1 ADD ops, and `tfopt.quantize_model` gives each partial sum a range."""
    return isinstance(layer, keras.layers.Add)


def reads_indices(layer):
    """True for a lookup (an `Embedding`, keras-hub's token embeddings): its
    float input is indices. False for the other layers tfopt knows (they read
    values); None for a layer tfopt does not know (`tfopt.quantize_model`
    probes those)."""
    if isinstance(layer, keras.layers.Embedding):
        return True
    return None if of(layer) is None else False


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

# Recurrent layers: (in, gates * units) kernels, pruned; LSTM and GRU quantized per
# tensor by their twins' own recurrence (tfopt/layers/recurrent.py); SimpleRNN float.
for _rnn, _gates in ((L.LSTM, 4), (L.GRU, 3), (L.SimpleRNN, 1)):
    register(_rnn, [
        WeightSpec("cell.kernel", in_axis=0, out_axis=1, gates=_gates, quantize=_rnn is not L.SimpleRNN),
        WeightSpec("cell.recurrent_kernel", in_axis=0, out_axis=1, gates=_gates, quantize=_rnn is not L.SimpleRNN),
    ])

# Transformers (issues 12, 13, 22): MultiHeadAttention's EinsumDense sublayers are pruned
# as EinsumDense layers; its twin fake-quantizes their kernels per tensor, in the 2-D
# layout of the FULLY_CONNECTED ops LiteRT runs (`tfopt/layers/attention.py`).
register(L.MultiHeadAttention, [
    WeightSpec(f"{_part}_dense.kernel", in_axis=0, out_axis=1 if _part != "output" else -1, prune=False,
               holder=functools.partial(_keras_internal.attention_projection, part=_part))
    for _part in ("query", "key", "value", "output")
])
# Its twin computes it in LiteRT's integer ops, gamma (and beta) 8-bit per tensor
# (`tfopt/layers/normalization.py`).
register(L.LayerNormalization, [WeightSpec("gamma", in_axis=None, out_axis=-1, prune=False)])
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

# How each type carries channels, for `tfopt.shrink` (layers not listed keep all their channels).
for _layer, _key in ((L.Dense, "units"), (L.EinsumDense, "output_shape"), (L.Embedding, "output_dim"),
                     (L.Conv1D, "filters"), (L.Conv2D, "filters"), (L.Conv3D, "filters"),
                     (L.Conv1DTranspose, "filters"), (L.Conv2DTranspose, "filters"),
                     (L.Conv3DTranspose, "filters"), (L.SeparableConv1D, "filters"),
                     (L.SeparableConv2D, "filters")):
    register_channels(_layer, NEW, _key)
for _layer in (
    L.BatchNormalization, L.DepthwiseConv1D, L.DepthwiseConv2D,
    L.Activation, L.ReLU, L.LeakyReLU, L.PReLU, L.ELU,
    L.MaxPooling1D, L.MaxPooling2D, L.MaxPooling3D, L.AveragePooling1D, L.AveragePooling2D, L.AveragePooling3D,
    L.GlobalMaxPooling1D, L.GlobalMaxPooling2D, L.GlobalMaxPooling3D,
    L.GlobalAveragePooling1D, L.GlobalAveragePooling2D, L.GlobalAveragePooling3D,
    L.Dropout, L.SpatialDropout1D, L.SpatialDropout2D, L.GaussianNoise, L.GaussianDropout,
    L.ZeroPadding1D, L.ZeroPadding2D, L.ZeroPadding3D, L.Cropping1D, L.Cropping2D, L.Cropping3D,
    L.UpSampling1D, L.UpSampling2D, L.Identity, L.ActivityRegularization,
):
    register_channels(_layer, SAME)
for _layer in (L.Add, L.Subtract, L.Multiply, L.Average, L.Maximum, L.Minimum):
    register_channels(_layer, MERGE)
register_channels(L.Concatenate, CONCAT)
register_channels(L.Flatten, FLATTEN)
register_channels(L.Reshape, SAME, "target_shape")  # when it keeps the last axis (tfopt.shrink checks)
register_channels(L.MultiHeadAttention, HEADS)
if _layer_scale is not None:
    register_channels(_layer_scale, SAME)

del L, _conv, _layout, _rnn, _gates, _layer, _layer_scale, _key
