"""Rebuilding Sequential and Functional models layer by layer (shared by the transforms)."""

import warnings

import keras
from keras import ops

from tfopt import _keras_internal, pruning

__all__ = ["check_graph_model", "clone", "plain_copy", "copy_weights", "to_functional", "graph_layers", "rewrap",
           "set_cut_weights"]


def check_graph_model(model, fn):
    """Refuses models whose layers cannot be swapped from the outside, or that
    have no weights yet."""
    pruning.check_keras3(model)
    if not isinstance(model, keras.Model) or not _keras_internal.is_graph_network(model):
        raise TypeError(
            f"`tfopt.{fn}` rebuilds Sequential and Functional models. Received a subclassed "
            f"model of type {type(model).__name__}, whose layers cannot be swapped from the "
            "outside. Fix: prune it in place with "
            "`model.fit(..., callbacks=[tfopt.callbacks.Pruning(schedule)])`."
        )
    if not model.built or not model.inputs:
        raise ValueError(
            f"`tfopt.{fn}` needs a built model, with its weights, and model '{model.name}' was never "
            "built (a Sequential model without `keras.Input`, never called). Fix: start it with "
            "`keras.Input(shape)`, or call `model.build((None, ...))` (or the model on data) first."
        )


def graph_layers(model):
    """Every layer of `model` that is not itself a model."""
    return [layer for layer in _keras_internal.all_layers(model) if not isinstance(layer, keras.Model)]


def _named_inputs(model):
    """Fresh `keras.Input`s like `model`'s, keeping their names (clone_model
    would call them "keras_tensor") and their structure (a tensor, a list, a
    dict of named inputs)."""
    return keras.tree.map_structure(
        lambda t: keras.Input(batch_shape=t.shape, dtype=t.dtype, sparse=t.sparse,
                              name=_keras_internal.input_name(t)),
        _single(model.input))


def _single(structure):
    """A list of one input as that input (how Keras itself calls one-input models)."""
    return structure[0] if isinstance(structure, (list, tuple)) and len(structure) == 1 else structure


def clone(model, make_layer, call_function=None):
    """Clones `model` (nested models included) with `make_layer(old) -> new` and
    returns the clone and the list of (old, new) layer pairs."""
    pairs = {}

    def clone_function(layer):
        if id(layer) not in pairs:
            pairs[id(layer)] = (layer, make_layer(layer))
        return pairs[id(layer)][1]

    kwargs = {}
    if call_function is not None:
        kwargs["call_function"] = call_function
    if not isinstance(model, keras.Sequential):
        kwargs["input_tensors"] = _named_inputs(model)
    copy = keras.models.clone_model(model, clone_function=clone_function, recursive=True, **kwargs)
    return copy, list(pairs.values())


def plain_copy(layer):
    """A fresh layer of the same class and config; a layer holding Python code
    (`Lambda`) is reused as it is: it has no weights, and re-reading its
    config would need unsafe deserialization of code already in memory.

    A layer Keras cannot re-create from its config (a custom layer whose
    `__init__` takes no `**kwargs`, as many are written, refuses the `name`
    and `dtype` Keras passes back) is reused as well, with a warning: the
    result then shares that layer, and its weights, with the model it came
    from. tfopt changes nothing inside such a layer, so the result computes
    what it should."""
    if _keras_internal.holds_python_code(layer):
        return layer
    try:
        config = layer.get_config()
        return layer.__class__.from_config(config)
    except (TypeError, ValueError, NotImplementedError) as e:
        cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        cause = cause if len(cause) <= 160 else cause[:157] + "..."
        warnings.warn(
            f"Layer '{layer.name}' ({type(layer).__name__}) cannot be re-created from its config "
            f"({cause}), so the new model reuses this layer object: it shares the layer and its "
            "weights with the model it came from. Fix: make the layer re-creatable: an `__init__` "
            "that takes `**kwargs` and passes them to `super().__init__(**kwargs)`, a `get_config` "
            "that returns every constructor argument, and no lambda or local function in its arguments.",
            stacklevel=3)
        return layer


def copy_weights(old, new):
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


def rewrap(model, cls=keras.Model):
    """A model of class `cls` over the same graph (inputs, outputs and layers) as
    the Functional `model`: how `quantize_model` makes its `QuantizedModel` and
    `strip` turns one back into a plain Functional model."""
    outputs = model.output  # the structure the model returns (a tensor, a list, a dict)
    return cls(_single(model.inputs) if not isinstance(model.input, dict) else model.input,
               _single(outputs) if isinstance(outputs, (list, tuple)) else outputs, name=model.name)


def to_functional(model):
    """A Functional model calling the same layers as `model` (Sequential models,
    nested ones included, become Functional; others are returned as they are)."""
    if not isinstance(model, keras.Sequential):
        return model
    inputs = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype)
    x = inputs
    for layer in model.layers:
        x = to_functional(layer)(x) if isinstance(layer, keras.Model) else layer(x)
    return keras.Model(inputs, x, name=model.name)


def set_cut_weights(layer, values, what, describe):
    """Sets the rebuilt `layer`'s weights to the cut `values` of `what` (the
    layer or block they were cut from), after checking their shapes: a
    mismatch is a tfopt bug, reported with `describe` (what to send)."""
    expected = [tuple(v.shape) for v in layer.weights]
    got = [tuple(v.shape) for v in values]
    if expected != got:
        raise RuntimeError(
            f"tfopt.shrink: {what} rebuilt with weight shapes {expected}, but the cut weights have shapes {got}. "
            f"This is a tfopt bug; please report it with {describe}.")
    layer.set_weights(values)

