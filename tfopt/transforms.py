"""Whole-model transforms: `prune` (swap in tfopt twins) and `strip` (back to Keras)."""

import logging

import keras
import numpy as np
from keras import ops

from tfopt import layers as tfopt_layers
from tfopt import pruning

__all__ = ["prune", "strip", "load_model", "quantize_model"]

log = logging.getLogger("tfopt")

# Exact Keras class -> tfopt twin. Exact, because swapping a user's subclass of
# Dense for tfopt's Dense would drop the subclass's own behaviour; such layers
# are pruned in place by `tfopt.callbacks.Pruning` instead.
_TWINS = {
    cls.keras_class: cls
    for cls in (getattr(tfopt_layers, name) for name in tfopt_layers.__all__)
    if hasattr(cls, "keras_class")
}


def _is_graph_model(model):
    return isinstance(model, keras.Sequential) or (
        isinstance(model, keras.Model) and getattr(model, "_is_graph_network", False)
    ) or type(model).__name__ == "Functional"


def _check_graph_model(model, fn):
    pruning.check_keras3(model)
    if not isinstance(model, keras.Model) or not _is_graph_model(model):
        raise TypeError(
            f"`tfopt.{fn}` rebuilds Sequential and Functional models. Received a subclassed "
            f"model of type {type(model).__name__}, whose layers cannot be swapped from the "
            "outside. Fix: prune it in place with "
            "`model.fit(..., callbacks=[tfopt.callbacks.Pruning(schedule)])`."
        )


def _clone(model, make_layer):
    """Clones `model` (nested models included) with `make_layer(old) -> new` and
    returns the clone and the list of (old, new) layer pairs."""
    pairs = {}

    def clone_function(layer):
        if id(layer) not in pairs:
            pairs[id(layer)] = (layer, make_layer(layer))
        return pairs[id(layer)][1]

    kwargs = {}
    if not isinstance(model, keras.Sequential):
        # Keep the input layers' names (clone_model would call them "keras_tensor").
        kwargs["input_tensors"] = [
            keras.Input(batch_shape=t.shape, dtype=t.dtype, sparse=t.sparse,
                        name=t._keras_history.operation.name)
            for t in model.inputs
        ]
        if len(kwargs["input_tensors"]) == 1:
            kwargs["input_tensors"] = kwargs["input_tensors"][0]
    clone = keras.models.clone_model(model, clone_function=clone_function, recursive=True, **kwargs)
    return clone, list(pairs.values())


def _plain_clone(layer):
    return layer.__class__.from_config(layer.get_config())


def prune(model, pruning_schedule, structure=None, layers=None):
    """Returns a copy of a Sequential or Functional model whose layers prune during `fit`.

    Every selected Keras layer that has a tfopt twin (Dense, Conv1D/2D/3D and
    their transposes, DepthwiseConv1D/2D, SeparableConv1D/2D, EinsumDense,
    Embedding) is replaced by it, with the same name, config and weights.
    Other layers are copied as they are. Nested models and shared layers are
    kept. The copy is not compiled. For subclassed models, or custom layers,
    use `tfopt.callbacks.Pruning` instead.

    Args:
        model: a Keras 3 Sequential or Functional model.
        pruning_schedule: a `tfopt.schedules.SparsitySchedule` or preset name.
        structure: see `tfopt.sparsity.get`.
        layers: which layers to prune: None (all that can be), a name, a type,
            a predicate, or a list of those. A layer named here that cannot be
            pruned is an error; with None, layers the structure does not fit
            are left dense with a warning.

    Returns:
        A new, uncompiled `keras.Model`.

    Example:
    >>> import keras, tfopt
    >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, name="hidden"),
    ...                           keras.layers.Dense(2, name="head")])
    >>> pruned = tfopt.prune(model, "baseline", layers="hidden")
    >>> [type(layer).__module__.split(".")[0] for layer in pruned.layers]
    ['tfopt', 'keras']
    """
    _check_graph_model(model, "prune")
    schedule = pruning.get_schedule(pruning_schedule)
    if schedule is None:
        raise ValueError(
            "`tfopt.prune` needs a `pruning_schedule` (a tfopt.schedules object or a preset "
            "such as 'baseline'). Received: pruning_schedule=None"
        )
    structure_obj = pruning.get_structure(structure)
    candidates = [layer for layer in pruning.all_layers(model) if not isinstance(layer, keras.Model)]
    targets, named = pruning.select_targets(candidates, layers, structure_obj, "tfopt.prune")
    swap, no_twin = set(), []
    for layer, _ in targets:
        if type(layer) in _TWINS or type(layer) in _TWINS.values():
            swap.add(id(layer))
        elif named:
            raise TypeError(
                f"Layer '{layer.name}' ({type(layer).__name__}) has a kernel but no "
                "tfopt twin, so `tfopt.prune` cannot swap it. Fix: prune it in place "
                "with `tfopt.callbacks.Pruning(schedule, layers=[...])`, which works on "
                "any layer with a kernel."
            )
        else:
            no_twin.append(layer.name)
    if no_twin:
        log.warning("tfopt.prune: layers %s have a kernel but no tfopt twin; they stay dense. "
                    "Prune them with tfopt.callbacks.Pruning instead.", no_twin)

    def make_layer(layer):
        if id(layer) not in swap:
            return _plain_clone(layer)
        twin = _TWINS.get(type(layer), type(layer))
        config = layer.get_config()
        config.update(pruning_schedule=schedule, structure=structure_obj)
        return twin.from_config(config)

    clone, pairs = _clone(model, make_layer)
    for old, new in pairs:
        if getattr(old, "weights", None):
            values = [ops.convert_to_numpy(v) for v in old.weights]
            current = new.get_weights()
            new.set_weights(values[: len(current)] + current[len(values):])
    return clone


def strip(model):
    """Returns a plain Keras model with the pruning masks baked into the weights.

    For Sequential and Functional models, a new model where every tfopt layer is
    replaced by its Keras namesake (same name, config and weights, no mask or
    step), which loads without tfopt. Quantization-aware layers become float
    layers; a BatchNormalization folded into a layer stays folded (the layer
    gets the folded kernel and bias). Masks attached by
    `tfopt.callbacks.Pruning` are baked in and their constraints dropped.

    For subclassed models, the model itself is stripped in place and returned:
    weights are multiplied by their masks and tfopt constraints removed (the
    classes of its layers are the user's and are kept).

    Example:
    >>> import keras, tfopt
    >>> pruned = keras.Sequential([keras.Input((4,)), tfopt.layers.Dense(2, pruning_schedule="baseline")])
    >>> stripped = tfopt.strip(pruned)
    >>> type(stripped.layers[0]).__module__.startswith("keras"), len(stripped.weights)
    (True, 2)
    """
    pruning.check_keras3(model)
    if not isinstance(model, keras.Model) or not _is_graph_model(model):
        for layer in pruning.all_layers(model):
            for pw in pruning.prunable_weights(layer):
                _bake(pw.variable)
        return model

    def make_layer(layer):
        if isinstance(layer, tfopt_layers.Prunable):
            config = layer.get_config()
            for key in tfopt_layers.Prunable.TFOPT_ARGUMENTS:
                config.pop(key, None)
            if layer.folded_batch_norm is not None:
                config["use_bias"] = True  # the folded BatchNormalization's bias
            return layer.keras_class.from_config(config)
        return _plain_clone(layer)

    clone, pairs = _clone(model, make_layer)
    for old, new in pairs:
        if not getattr(new, "weights", None):
            continue
        if isinstance(old, tfopt_layers.Prunable):
            new.set_weights(old.keras_weights())
        else:
            new.set_weights([_masked_value(v) for v in old.weights[: len(new.weights)]])
    return clone


def _masked_value(variable):
    value = ops.convert_to_numpy(variable)
    info = getattr(variable, "_tfopt_prune_info", None)
    if info is not None:
        value = value * ops.convert_to_numpy(info["mask"])
    return value


def _bake(variable):
    if getattr(variable, "_tfopt_prune_info", None) is None:
        return
    variable.assign(_masked_value(variable))
    if pruning.is_pruning_constraint(variable.constraint):
        variable.constraint = pruning.inner_constraint(variable)
    variable._tfopt_prune_info = None


def load_model(path, **kwargs):
    """`keras.models.load_model` with tfopt's classes registered.

    A `.keras` file that holds tfopt layers needs tfopt imported before Keras
    reads it (Keras imports only its own packages while loading, and a `.keras`
    file runs no code). Calling this, or `import tfopt` before
    `keras.models.load_model`, does that. Files written from `tfopt.strip(model)`
    need neither. `kwargs` go to Keras unchanged; `safe_mode` stays on unless
    you turn it off.
    """
    return keras.models.load_model(path, **kwargs)


# Layers that move or select values without making new ones: the quantization
# of their input carries through, so they need no range of their own.
_PASS_THROUGH = (
    keras.layers.InputLayer, keras.layers.Flatten, keras.layers.Reshape, keras.layers.Permute,
    keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.MaxPooling3D,
    keras.layers.GlobalMaxPooling1D, keras.layers.GlobalMaxPooling2D, keras.layers.GlobalMaxPooling3D,
    keras.layers.Dropout, keras.layers.SpatialDropout1D, keras.layers.SpatialDropout2D,
    keras.layers.ZeroPadding1D, keras.layers.ZeroPadding2D, keras.layers.ZeroPadding3D,
    keras.layers.Cropping1D, keras.layers.Cropping2D, keras.layers.Cropping3D,
    keras.layers.UpSampling1D, keras.layers.UpSampling2D, keras.layers.Identity,
    keras.layers.ActivityRegularization, keras.layers.GaussianNoise, keras.layers.GaussianDropout,
)

# Layers that make new values the int8 converter supports, given a range for
# their output: tfopt puts a `QuantizeActivation` after each.
_NEEDS_OUTPUT_RANGE = (
    keras.layers.Add, keras.layers.Subtract, keras.layers.Multiply, keras.layers.Average,
    keras.layers.Maximum, keras.layers.Minimum, keras.layers.Concatenate,
    keras.layers.AveragePooling1D, keras.layers.AveragePooling2D, keras.layers.AveragePooling3D,
    keras.layers.GlobalAveragePooling1D, keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalAveragePooling3D, keras.layers.Activation, keras.layers.ReLU,
    keras.layers.LeakyReLU, keras.layers.PReLU, keras.layers.ELU, keras.layers.Softmax,
    keras.layers.Rescaling, keras.layers.Normalization, keras.layers.BatchNormalization,
)


def _to_functional(model):
    """A Functional model calling the same layers as `model` (Sequential models,
    nested ones included, become Functional; others are returned as they are)."""
    if not isinstance(model, keras.Sequential):
        return model
    inputs = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype)
    x = inputs
    for layer in model.layers:
        x = _to_functional(layer)(x) if isinstance(layer, keras.Model) else layer(x)
    return keras.Model(inputs, x, name=model.name)


def quantize_model(model, numerical_precision="int8", layers=None, unsupported="error", overrides=None):
    """Returns a quantization-aware copy of a Sequential or Functional model.

    Every selected layer with a tfopt twin (Dense, Conv*, DepthwiseConv*,
    SeparableConv*, EinsumDense, Embedding) becomes that twin with
    `quantization_aware=numerical_precision`, weights kept. A
    `tfopt.layers.QuantizeActivation` is put after each model input and after
    each layer that makes new values the int8 converter needs a range for
    (Add, Concatenate, Multiply, average pooling, activations, Rescaling,
    Normalization, BatchNormalization); layers that only move values (Flatten,
    Reshape, max pooling, padding, dropout, ...) keep their input's range.
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
    from tfopt import quantizers
    from tfopt.layers import QuantizeActivation
    from tfopt.layers.quantize_activation import QuantizedRescaling

    _check_graph_model(model, "quantize_model")
    quantizers.get_precision(numerical_precision)  # validate before any work
    if unsupported not in ("error", "float"):
        raise ValueError(f"`unsupported` must be 'error' or 'float'. Received: unsupported={unsupported!r}")
    candidates = [layer for layer in pruning.all_layers(model) if not isinstance(layer, keras.Model)]
    chosen, _ = pruning.select_layers(candidates, layers)
    precisions = _precision_overrides(candidates, overrides)
    chosen = [layer for layer in chosen if precisions.get(id(layer), numerical_precision) is not None]
    chosen_ids = {id(layer) for layer in chosen}
    unknown = [
        f"{layer.name} ({type(layer).__name__})"
        for layer in candidates
        if type(layer) not in _TWINS and not isinstance(layer, tfopt_layers.Prunable)
        and not isinstance(layer, _PASS_THROUGH + _NEEDS_OUTPUT_RANGE + (QuantizeActivation,))
    ]
    if unknown and unsupported == "error":
        raise ValueError(
            f"tfopt.quantize_model does not know how to quantize layers {unknown}. Fix: pass "
            "unsupported='float' to leave them in float (the int8 export then reports them as "
            "float ops), or replace them with supported layers."
        )

    functional = _to_functional(model)
    folds = _batch_norm_folds(functional, chosen_ids)  # id(producer) -> BatchNormalization
    folded_bns = {id(bn) for bn in folds.values()}

    def make_layer(layer):
        twin = _TWINS.get(type(layer), type(layer) if isinstance(layer, tfopt_layers.Prunable) else None)
        if twin is not None and id(layer) in chosen_ids:
            config = layer.get_config()
            config["quantization_aware"] = precisions.get(id(layer), numerical_precision)
            bn = folds.get(id(layer))
            if bn is not None:
                config["folded_batch_norm"] = {
                    "epsilon": bn.epsilon, "center": bn.center, "scale": bn.scale,
                    # A frozen BatchNormalization keeps its statistics: momentum 1.
                    "momentum": float(bn.momentum) if bn.trainable else 1.0,
                }
            activation = config.get("activation")
            if activation not in (None, "linear", "relu", "relu6"):
                # TFLite fuses only ReLU/ReLU6 into a layer; any other
                # activation runs as its own op and needs its input's range.
                config["activation"] = "linear"
                new = twin.from_config(config)
                split_activations[id(new)] = activation
                return new
            return twin.from_config(config)
        if type(layer) is keras.layers.Rescaling:
            return QuantizedRescaling.from_config(layer.get_config())
        return _plain_clone(layer)

    input_quantizers = {}
    split_activations = {}  # id(new twin) -> the activation moved after it

    def call_function(layer, *args, **kwargs):
        def quantize_inputs(x):
            if id(x) in input_ids:
                if id(x) not in input_quantizers:
                    input_quantizers[id(x)] = QuantizeActivation(name=f"{x.name}_quantize")(x)
                return input_quantizers[id(x)]
            return x

        args = keras.tree.map_structure(quantize_inputs, args)
        if id(layer) in folded_bn_clones:
            return args[0]  # folded into the layer before it
        outputs = layer(*args, **kwargs)
        if id(layer) in split_activations:
            outputs = keras.layers.Activation(split_activations[id(layer)], name=f"{layer.name}_activation")(outputs)
            outputs = QuantizeActivation(name=f"{layer.name}_activation_quantize")(outputs)
        if isinstance(layer, _NEEDS_OUTPUT_RANGE) or not isinstance(layer, keras.layers.Layer):
            # (A `keras.ops` call in a Functional model, such as MobileNetV3's
            # `x + 3.0` in hard-swish, makes new values too.)
            outputs = keras.tree.map_structure(
                lambda t: QuantizeActivation(name=f"{layer.name}_quantize")(t), outputs)
        return outputs

    new_inputs = [
        keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t._keras_history.operation.name)
        for t in functional.inputs
    ]
    input_ids = {id(t) for t in new_inputs}
    pairs = {}
    folded_bn_clones = set()

    def clone_function(layer):
        if id(layer) not in pairs:
            pairs[id(layer)] = (layer, make_layer(layer))
            if id(layer) in folded_bns:
                folded_bn_clones.add(id(pairs[id(layer)][1]))
        return pairs[id(layer)][1]

    clone = keras.models.clone_model(
        functional, input_tensors=new_inputs if len(new_inputs) > 1 else new_inputs[0],
        clone_function=clone_function, call_function=call_function, recursive=True,
    )
    for old, new in pairs.values():
        if id(old) in folded_bns:
            continue
        if getattr(old, "weights", None):
            _copy_weights(old, new)
        bn = folds.get(id(old))
        if bn is not None:
            channels = new.bn_moving_mean.shape
            new.bn_gamma.assign(ops.convert_to_numpy(bn.gamma) if bn.scale else np.ones(channels))
            new.bn_beta.assign(ops.convert_to_numpy(bn.beta) if bn.center else np.zeros(channels))
            new.bn_moving_mean.assign(ops.convert_to_numpy(bn.moving_mean))
            new.bn_moving_variance.assign(ops.convert_to_numpy(bn.moving_variance))
    return clone


def _copy_weights(old, new):
    """Copies `old`'s weights into `new` by name when the names say which is
    which (a pruned twin's mask and step sit after the ranges a quantized one
    adds), else in order; weights only `new` has keep their initial values."""
    names = [v.name for v in old.weights]
    targets = {v.name: v for v in new.weights}
    if len(set(names)) == len(names) and len(targets) == len(new.weights) and all(n in targets for n in names):
        for v in old.weights:
            targets[v.name].assign(ops.convert_to_numpy(v))
        return
    values = [ops.convert_to_numpy(v) for v in old.weights]
    current = new.get_weights()
    new.set_weights(values[: len(current)] + current[len(values):])


def _precision_overrides(candidates, overrides):
    """id(layer) -> precision from `quantize_model`'s `overrides` (first match wins)."""
    from tfopt import quantizers

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
            try:
                quantizers.get_precision(precision)
            except ValueError as e:
                raise ValueError(f"`overrides[{selector!r}]`: {e}") from None
        matched, _ = pruning.select_layers(candidates, selector)
        for layer in matched:
            out.setdefault(id(layer), precision)
    return out


def _batch_norm_folds(model, chosen_ids):
    """Finds (layer -> BatchNormalization) pairs that QAT folds: the BN's only
    input comes from a selected twin-able layer with a linear activation, the
    BN is that layer's only consumer, it normalizes the last axis, and neither
    is shared."""
    consumers = {}
    for layer in pruning.all_layers(model):
        for node in layer._inbound_nodes:
            for tensor in node.input_tensors:
                producer = tensor._keras_history.operation
                consumers.setdefault(id(producer), []).append(layer)
    folds = {}
    for bn in pruning.all_layers(model):
        if not isinstance(bn, keras.layers.BatchNormalization) or len(bn._inbound_nodes) != 1:
            continue
        inputs = bn._inbound_nodes[0].input_tensors
        if len(inputs) != 1 or bn.axis not in (-1, len(inputs[0].shape) - 1):
            continue
        producer = inputs[0]._keras_history.operation
        if (
            (type(producer) in _TWINS or isinstance(producer, tfopt_layers.Prunable))
            and id(producer) in chosen_ids
            and len(producer._inbound_nodes) == 1
            and consumers.get(id(producer)) == [bn]
            and getattr(producer, "activation", None) in (None, keras.activations.linear)
        ):
            folds[id(producer)] = bn
    return folds
