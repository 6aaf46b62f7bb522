"""`quantize_model`: a quantization-aware copy of a model, planned then rewritten.

`plan(...)` reads the model and decides, layer by layer, what QAT does: which
layers become quantization-aware twins and at which precision, which
BatchNormalizations fold into the layer before them, where ranges go, and what
is left in float. `rewrite(...)` then rebuilds the graph from that plan. Every
decision about a layer *type* comes from `tfopt.geometry`.
"""

import dataclasses
import warnings

import keras
import numpy as np

from tfopt import _backend, _keras_internal, geometry, pruning, quantizers
from tfopt.layers.quantize_activation import QuantizeActivation, QuantizingLayer
from tfopt.transforms import _graph

__all__ = ["quantize_model", "QuantizationPlan", "plan"]


@dataclasses.dataclass
class QuantizationPlan:
    """What `quantize_model` does to each layer (keys are `id(layer)` of the
    Functional form of the model).

    Attributes:
        functional: the model as a Functional one (Sequential models are converted).
        precisions: layers that become quantization-aware twins -> their precision.
        folds: layer -> the BatchNormalization folded into it.
        float_layers: names of layers left in float (with `unsupported="float"`).
        index_readers: names of the layers that read their float input as
            indices (token ids: Embedding, keras-hub token embeddings, layers
            that hold one): their inputs are never fake-quantized.
    """

    functional: keras.Model
    precisions: dict
    folds: dict
    float_layers: list
    index_readers: set = dataclasses.field(default_factory=set)

    @property
    def folded(self):
        """ids of the BatchNormalizations that fold away."""
        return {id(bn) for bn in self.folds.values()}


def _quantizable(layer):
    """A layer whose twin fake-quantizes its weights (in this configuration)."""
    entry = geometry.of(layer)
    # (A composite twin, keras-hub's TransformerEncoder's, quantizes the weights of its sublayers.)
    weighted = entry is not None and (any(s.quantize for s in entry.weights) or getattr(
        geometry.twin_of(layer), "quantization_composite", False))
    return geometry.twin_of(layer) is not None and weighted and _unsupported_configuration(layer) is None


def _unsupported_configuration(layer):
    """Why the layer's twin cannot quantize this configuration of it, or None
    (a twin says so with `quantization_unsupported(layer)`: MultiHeadAttention
    with use_gate=True, ...)."""
    check = getattr(geometry.twin_of(layer), "quantization_unsupported", None)
    return None if check is None or geometry.is_twin(layer) else check(layer)


def _float_with_range(layer):
    """A layer tfopt knows (a `tfopt.geometry` entry with weights) but does not
    fake-quantize: SimpleRNN, subclasses of known types (keras-hub's
    CachedMultiHeadAttention), a configuration its twin does not compute
    (MultiHeadAttention with use_gate=True). It stays float under QAT with a
    range after it; a `representative_data` export calibrates it to integer."""
    entry = geometry.of(layer)
    return (entry is not None and entry.role == geometry.WEIGHTS and not _quantizable(layer)
            and not isinstance(layer, QuantizingLayer))


def _known(layer):
    return _quantizable(layer) or isinstance(layer, QuantizingLayer) or _float_with_range(layer) or geometry.role(
        layer) in (geometry.PASS_THROUGH, geometry.NEEDS_RANGE, geometry.BATCH_NORM)


def plan(model, numerical_precision="int8", layers=None, unsupported="error", overrides=None):
    """Decides what `quantize_model` does to each layer of `model`; returns a `QuantizationPlan`."""
    _graph.check_graph_model(model, "quantize_model")
    _training_precision(numerical_precision, "tfopt.quantize_model: `numerical_precision`")
    already = [layer.name for layer in _graph.graph_layers(model)
               if isinstance(layer, QuantizingLayer) and layer.is_quantizing()]
    if already:
        raise ValueError(
            f"tfopt.quantize_model: model '{model.name}' is already quantization-aware (layers "
            f"{already[:5]}{' ...' if len(already) > 5 else ''}). Quantize the float model once; to change "
            "precisions, start again from the float model (or `tfopt.strip(model)` first) with "
            "`overrides=`."
        )
    if unsupported not in ("error", "float"):
        raise ValueError(f"`unsupported` must be 'error' or 'float'. Received: unsupported={unsupported!r}")
    candidates = _graph.graph_layers(model)
    if any(type(layer).__module__.split(".")[0] == "keras_hub" for layer in candidates):
        from tfopt.adapters import keras_hub_quantization  # lazy: keras-hub is optional

        keras_hub_quantization.register()  # its encoder layers' geometry and twins
    chosen, _ = pruning.select_layers(candidates, layers)
    precisions = _precision_overrides(candidates, overrides)
    # (Sublayers of a known layer, such as an LSTM's cell, go with it.)
    inside_known = {id(sub) for layer in candidates if _known(layer) for sub in _keras_internal.all_layers(layer)}
    unknown = [layer for layer in candidates if not _known(layer) and id(layer) not in inside_known]
    if unknown and unsupported == "error":
        raise ValueError(
            "tfopt.quantize_model does not know how to quantize layers "
            f"{[f'{layer.name} ({type(layer).__name__})' for layer in unknown]}. Fix: pass "
            "unsupported='float' to leave them in float (an int8 export then lists them in "
            "`float_ops`, or, with representative_data=, calibrates them to integer), or replace "
            "them with supported layers."
        )
    functional = _graph.to_functional(model)
    reasons = {id(layer): _unsupported_configuration(layer) for layer in chosen}
    kept = [f"{layer.name} ({type(layer).__name__}: {reasons[id(layer)]})" for layer in chosen
            if reasons[id(layer)] is not None and precisions.get(id(layer), numerical_precision)]
    if kept:
        warnings.warn(
            f"tfopt.quantize_model: layers {kept} stay float (a range after each): their quantization-aware "
            "form does not compute that configuration. An int8 export without representative_data runs "
            "them as float ops (listed in `float_ops`); with representative_data= they are calibrated to "
            "integer. Fix: build them in a supported configuration, or export with representative_data=.",
            UserWarning, stacklevel=3)
    selected = {}
    for layer in chosen:
        precision = precisions.get(id(layer), numerical_precision)
        if precision is not None and _quantizable(layer):
            selected[id(layer)] = precision
    return QuantizationPlan(
        functional=functional,
        precisions=selected,
        folds=_batch_norm_folds(functional, selected),
        float_layers=[layer.name for layer in unknown],
        index_readers=_index_readers(functional),
    )


def quantize_model(model, numerical_precision="int8", layers=None, unsupported="error", overrides=None):
    """Returns a quantization-aware copy of a Sequential or Functional model.

    Every selected layer with a tfopt twin (Dense, Conv*, DepthwiseConv*,
    SeparableConv*, EinsumDense, Embedding, LayerNormalization,
    MultiHeadAttention) becomes that twin with
    `quantization_aware=numerical_precision`, weights kept.
    LayerNormalization and MultiHeadAttention twins compute in the ops LiteRT
    runs in int8, each intermediate tensor with a range of its own, so a
    transformer exports full integer without representative_data. A
    `tfopt.layers.QuantizeActivation` is put after each model input and after
    each layer that makes new values the int8 converter needs a range for
    (Add, Concatenate, Multiply, average pooling, activations, Rescaling,
    Normalization, BatchNormalization); layers that only move values (Flatten,
    Reshape, max pooling, padding, dropout, ...) keep their input's range.
    Which is which is the layer type's `tfopt.geometry` role.
    Layers tfopt knows but does not fake-quantize (SimpleRNN, subclasses of
    known types such as keras-hub's CachedMultiHeadAttention, and
    configurations a twin does not compute, with a warning) stay float with
    a range after them: an int8 export without data runs them as float ops between
    QUANTIZE/DEQUANTIZE (listed in `float_ops`); with `representative_data`
    every range is calibrated and the file is full-integer.
    keras-hub encoders and GPT-2-, Llama- and Mistral-style decoders (a
    `BertBackbone`, a `GPT2Backbone`, `LlamaBackbone`, `MistralBackbone`, their
    CausalLMs, or a model on their outputs) are quantized too: each encoder or
    decoder block becomes its quantization-aware form
    (`tfopt.adapters.keras_hub_quantization`: twins inside, a range on each
    residual sum), and token, position and segment embeddings fake-quantize
    their tables, so an int8 export without data is full integer. A nested
    model that shares a layer with the rest of the graph (a CausalLM's
    backbone, whose token embedding is also the head) is inlined in the copy,
    so that its `.keras` file keeps the sharing.
    Sequential models come back as Functional ones (a Sequential model cannot
    hold the inserted layers between its own). Activation ranges start at
    [-6, 6] and are set by the first training batch, so fit the copy (a few
    steps at least) before using or exporting it.

    A BatchNormalization that directly follows a quantized layer (its only
    consumer, linear activation) is folded into it: the layer quantizes
    `kernel * gamma / sqrt(variance + epsilon)` and adds the folded bias, so
    the int8 kernel in the exported file is the one that trained. gamma and
    beta train; the moving statistics keep updating during `fit` (estimated
    from the layer's own output, reduced over replicas) until
    `tfopt.callbacks.QuantizationSchedule(freeze_batch_norm=...)` freezes them;
    a non-trainable BatchNormalization keeps its statistics. Other
    BatchNormalizations are kept and get an output range.

    Args:
        model: a Keras 3 Sequential or Functional model.
        numerical_precision: "int8", "int4", "int2", "ternary", "binary"/"bool",
            a `QuantSpec`, or a (weight, activation) spec pair (see
            `tfopt.quantizers.get_precision`).
        layers: which twin-able layers to quantize (name, type, predicate or a
            list of those); None for all.
        unsupported: "error" to refuse layers tfopt does not know how to
            quantize (listed in the message), or "float" to leave them in float
            (`tfopt.export(..., precision="int8")` then reports them in
            `float_ops`).
        overrides: per-layer precisions, `{selector: precision}`, where a
            selector is a layer name, a layer type, a predicate or a tuple of
            those, and a precision is anything `numerical_precision` takes, or
            None to keep those layers in float. The first matching entry wins;
            layers no entry matches get `numerical_precision`. Example:
            `{"predictions": "int8", keras.layers.Conv2D: "int4"}` (a float
            layer in an int8 export runs as float ops, reported in `float_ops`).

    Example:
    >>> import keras, tfopt
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="relu"),
    ...                           keras.layers.Dense(2)])
    >>> qat = tfopt.quantize_model(model)
    >>> [type(layer).__name__ for layer in qat.layers]
    ['InputLayer', 'QuantizeActivation', 'Dense', 'Dense']
    """
    return rewrite(plan(model, numerical_precision, layers, unsupported, overrides))


def rewrite(the_plan):
    """Rebuilds the plan's model as it says: twins, folds, ranges."""
    functional, folds, folded = the_plan.functional, the_plan.folds, the_plan.folded
    split_activations = {}  # id(new twin) -> the activation moved after it
    folded_clones = set()
    pairs = {}

    def make_layer(layer):
        twin = geometry.twin_of(layer)
        if id(layer) in the_plan.precisions:
            # (A twin may read the float layer's config itself: keras-hub's Llama decoder's
            # own `get_config` raises.)
            config = getattr(twin, "source_config", type(layer).get_config)(layer)
            config["quantization_aware"] = the_plan.precisions[id(layer)]
            bn = folds.get(id(layer))
            if bn is not None:
                config["folded_batch_norm"] = {
                    "epsilon": bn.epsilon, "center": bn.center, "scale": bn.scale,
                    # A frozen BatchNormalization keeps its statistics: momentum 1.
                    "momentum": float(bn.momentum) if bn.trainable else 1.0,
                }
            activation = config.get("activation")
            # (Recurrent twins compute their activations themselves, on LiteRT's fixed ranges.)
            if activation not in (None, "linear", "relu", "relu6") and not getattr(
                    twin, "computes_own_activations", False):
                # TFLite fuses only ReLU/ReLU6 into a layer; any other
                # activation runs as its own op and needs its input's range.
                config["activation"] = "linear"
                new = twin.from_config(config)
                split_activations[id(new)] = activation
                return new
            return twin.from_config(config)
        if twin is not None and geometry.role(layer) != geometry.WEIGHTS and not geometry.is_twin(layer):
            return twin.from_config(layer.get_config())  # Rescaling -> QuantizedRescaling
        return _graph.plain_copy(layer)

    def clone_function(layer):
        if id(layer) not in pairs:
            pairs[id(layer)] = (layer, make_layer(layer))
            if id(layer) in folded:
                folded_clones.add(id(pairs[id(layer)][1]))
        return pairs[id(layer)][1]

    inlined = _sharing_nested_models(functional)
    input_quantizers = {}
    unquantized = {}  # id(fake-quantized tensor) -> the tensor before (for index inputs and masks)

    def fake_quantize(x, name):
        out = QuantizeActivation(name=name)(x)
        unquantized[id(out)] = x
        return out

    def quantize_inputs(x):
        if id(x) in input_ids:
            if id(x) not in input_quantizers:
                input_quantizers[id(x)] = fake_quantize(x, f"{x.name}_quantize")
            return input_quantizers[id(x)]
        return x

    def exact(x):
        return unquantized.get(id(x), x)

    def call_function(layer, *args, **kwargs):
        # Token ids and masks are exact: rounded to an activation grid, ids 1, 2
        # and 3 would all look up row 0.
        reads_indices = layer.name in the_plan.index_readers
        args = keras.tree.map_structure(exact if reads_indices else quantize_inputs, args)
        kwargs = {key: keras.tree.map_structure(exact, value) if "mask" in key else value
                  for key, value in kwargs.items()}
        if id(layer) in folded_clones:
            return args[0]  # folded into the layer before it
        if geometry.sums(layer) and len(args) == 1 and isinstance(args[0], (list, tuple)) and len(args[0]) > 2:
            # n - 1 ADD ops: each partial sum needs a range of its own (keras-hub's embeddings
            # add tokens, positions and segments).
            total = args[0][0]
            for i, term in enumerate(args[0][1:-1]):
                total = fake_quantize(layer([total, term], **kwargs), f"{layer.name}_partial_{i}_quantize")
            args = ([total, args[0][-1]],)
        if isinstance(layer, keras.Model) and layer.name in inlined:
            # The nested model's layers join this graph (its own call runs them on these tensors).
            outputs = layer.call(*args, **kwargs)
        else:
            outputs = layer(*args, **kwargs)
        if id(layer) in split_activations:
            outputs = keras.layers.Activation(split_activations[id(layer)], name=f"{layer.name}_activation")(outputs)
            outputs = fake_quantize(outputs, f"{layer.name}_activation_quantize")
        if geometry.role(layer) in (geometry.NEEDS_RANGE, geometry.BATCH_NORM) or _float_with_range(
                layer) or not isinstance(layer, keras.layers.Layer):
            # (A `keras.ops` call in a Functional model, such as MobileNetV3's
            # `x + 3.0` in hard-swish, makes new values too.)
            outputs = keras.tree.map_structure(lambda t: fake_quantize(t, f"{layer.name}_quantize"), outputs)
        return outputs

    # Fresh inputs in the structure of the model's own (a list, a dict of named inputs, ...).
    new_inputs = keras.tree.map_structure(
        lambda t: keras.Input(batch_shape=t.shape, dtype=t.dtype, name=_keras_internal.input_name(t)),
        _graph._single(functional.input))
    # Integer inputs (token ids) are not quantized: they are exact already.
    input_ids = {id(t) for t in keras.tree.flatten(new_inputs) if "float" in keras.backend.standardize_dtype(t.dtype)}
    clone = keras.models.clone_model(
        functional, input_tensors=new_inputs,
        clone_function=clone_function, call_function=call_function, recursive=True,
    )
    for old, new in pairs.values():
        if id(old) in folded:
            continue
        if getattr(old, "weights", None):
            _graph.copy_weights(old, new)
        bn = folds.get(id(old))
        if bn is not None:
            new._folding.set_from(bn)
    # The output structure (a dict of named outputs, as keras-hub backbones
    # return, nested lists, ...) is the model's own, not a flat list.
    return QuantizedModel(clone.input, clone.output, name=clone.name)


@keras.saving.register_keras_serializable(package="tfopt")
class QuantizedModel(keras.Model):
    """The Functional model `tfopt.quantize_model` returns: a plain Keras
    Functional model, except that under a `tf.distribute` strategy the
    statistics its layers track (activation ranges, folded BatchNormalization
    moments) are reduced over the replicas together, in one collective per
    train step, instead of one per range and per folded layer. A `.keras` file
    of it loads with tfopt imported, as any file with tfopt layers;
    `tfopt.strip` returns a plain `keras.Model`."""

    def call(self, inputs, training=None, mask=None, **kwargs):
        # (The signature is Functional.call's: Keras reads `training` from it.)
        with _backend.batched_statistics():
            return super().call(inputs, training=training, mask=mask, **kwargs)


def _sharing_nested_models(model):
    """Names of the graph models nested in `model` that share a layer with the rest of its
    graph (a keras-hub CausalLM calls its backbone's token embedding again as its head).
    `quantize_model` inlines their layers into the copy: in a `.keras` file Keras cannot
    keep a layer shared between a nested model and its parent (on loading, the second use
    is a new layer, without weights; measured on a float GPT2CausalLM too)."""
    calls = [layer for layer, _ in _keras_internal.ordered_calls(model)]
    nested = [layer for layer in calls if isinstance(layer, keras.Model) and _keras_internal.is_graph_network(layer)]
    inside = {id(m): {id(layer) for layer in _keras_internal.all_layers(m)} for m in nested}
    out = set()
    for m in nested:
        elsewhere = {id(layer) for layer in calls if layer is not m}
        elsewhere |= {i for other in nested if other is not m for i in inside[id(other)]}
        if inside[id(m)] & elsewhere:
            out.add(m.name)
    return out


def _training_precision(precision, where):
    """`quantizers.get_training_precision`, refusing a weight-only precision (an activation spec
    of None): the twins fake-quantize weights and activations together, and without an
    activation spec they would train in float, quantizing nothing."""
    weights, activations = quantizers.get_training_precision(precision, where)
    if activations is None:
        raise ValueError(
            f"{where}: {precision!r} quantizes weights only (its activation spec is None), and "
            "quantize_model's twins fake-quantize weights together with activations: the model "
            "would train in float, quantizing nothing. Fix: for weight-only quantization-aware "
            "training use `tfopt.quantize_weights(model, 'int4_weight_only')` (or 'int8_weight_only', "
            "'int4_block32'); for a full-integer model give an activation spec too, e.g. "
            "(QuantSpec(4, per_channel=True, symmetric=True, narrow_range=True), QuantSpec(8)).")
    return weights, activations


def _precision_overrides(candidates, overrides):
    """id(layer) -> precision from `quantize_model`'s `overrides` (first match wins)."""
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise TypeError(
            "`overrides` must be a dict {selector: precision} (selector: layer name, type, "
            f"predicate or tuple of those). Received: {overrides!r} of type {type(overrides).__name__}"
        )
    out = {}
    for selector, precision in overrides.items():
        if precision is not None:
            _training_precision(precision, f"tfopt.quantize_model: `overrides[{selector!r}]`")
        matched, _ = pruning.select_layers(candidates, selector)
        for layer in matched:
            out.setdefault(id(layer), precision)
    return out


def _reads_indices(layer, node):
    """True if `layer`, called at `node` on one float tensor, reads it as
    indices (an Embedding, a keras-hub token embedding, CategoryEncoding, a
    custom layer or nested model holding one): its output ignores the
    fraction of its input (1.0 and 1.4 give the same output) but not the
    integer (1.0 and 2.0 do not). Layers whose weights multiply their input
    (those a BatchNormalization folds into) and layers without weights of
    their own read values; they are not probed."""
    inputs = _keras_internal.node_inputs(node)
    if (len(inputs) != 1 or "float" not in keras.backend.standardize_dtype(inputs[0].dtype)
            or not isinstance(layer, keras.layers.Layer) or _keras_internal.is_input_layer(layer)
            or isinstance(layer, QuantizingLayer) or not layer.weights):
        return False
    known = geometry.reads_indices(layer)
    if known is not None:
        # (A probe cannot tell a normalization from a lookup: LayerNormalization is blind
        # to a shift of its input, and rounding once made it look like a lookup.)
        return known
    # Ids 1, 2, 1, 2, ... along the last axis; the same ids plus a fraction; the other ids.
    shape = tuple(1 if size is None else size for size in inputs[0].shape)
    ids = 1.0 + np.indices(shape)[-1] % 2
    try:
        one, fraction, other = (
            [np.asarray(keras.ops.convert_to_numpy(t)) for t in keras.tree.flatten(layer(probe.astype("float32")))]
            for probe in (ids, ids + 0.4, 3.0 - ids))
    except Exception:  # a layer that takes no such probe reads values as far as tfopt can tell
        return False
    return (all(np.array_equal(a, b) for a, b in zip(one, fraction))
            and not all(np.array_equal(a, c) for a, c in zip(one, other)))


def _index_readers(model):
    """Names of the layers whose float inputs are indices (`_reads_indices`),
    and of the layers that only move values (Reshape, Flatten, ...) on their
    way to such a layer: `quantize_model` keeps those inputs exact."""
    calls = _keras_internal.graph_calls(model)
    readers = {layer.name for layer, node in calls if _reads_indices(layer, node)}
    consumers = {}
    for layer, node in calls:
        for tensor in _keras_internal.node_inputs(node):
            consumers.setdefault(id(tensor), []).append(layer)
    changed = True
    while changed:
        changed = False
        for layer, node in calls:
            if layer.name in readers or geometry.role(layer) != geometry.PASS_THROUGH or \
                    _keras_internal.is_input_layer(layer):
                continue
            users = [user for tensor in _keras_internal.node_outputs(node) for user in consumers.get(id(tensor), [])]
            if users and all(user.name in readers for user in users):
                readers.add(layer.name)
                changed = True
    return readers


def _batch_norm_folds(model, selected):
    """Finds (layer -> BatchNormalization) pairs that QAT folds: the BN's only
    input comes from a selected layer whose type can take a fold, with a linear
    activation; the BN is that layer's only consumer, it normalizes the last
    axis, and neither is called more than once in the model's graph."""
    calls, consumers = {}, {}
    for layer, node in _keras_internal.graph_calls(model):
        calls.setdefault(id(layer), []).append(node)
        for tensor in _keras_internal.node_inputs(node):
            consumers.setdefault(id(_keras_internal.producer(tensor)), []).append(layer)
    folds = {}
    for layer, node in _keras_internal.graph_calls(model):
        bn = layer
        if geometry.role(bn) != geometry.BATCH_NORM or len(calls[id(bn)]) != 1:
            continue
        inputs = _keras_internal.node_inputs(node)
        if len(inputs) != 1 or bn.axis not in (-1, len(inputs[0].shape) - 1):
            continue
        producer = _keras_internal.producer(inputs[0])
        if (
            id(producer) in selected
            and geometry.fold_weight(producer) is not None
            and len(calls.get(id(producer), [])) == 1
            and consumers.get(id(producer)) == [bn]
            and getattr(producer, "activation", None) in (None, keras.activations.linear)
        ):
            folds[id(producer)] = bn
    return folds
