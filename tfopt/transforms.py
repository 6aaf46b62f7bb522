"""Whole-model transforms: `prune` (swap in tfopt twins) and `strip` (back to Keras)."""

import logging

import keras
from keras import ops

from tfopt import layers as tfopt_layers
from tfopt import pruning

__all__ = ["prune", "strip", "load_model"]

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
        if old.weights:
            values = [ops.convert_to_numpy(v) for v in old.weights]
            current = new.get_weights()
            new.set_weights(values[: len(current)] + current[len(values):])
    return clone


def strip(model):
    """Returns a plain Keras model with the pruning masks baked into the weights.

    For Sequential and Functional models, a new model where every tfopt layer is
    replaced by its Keras namesake (same name, config and weights, no mask or
    step), which loads without tfopt. Masks attached by
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
            return layer.keras_class.from_config(config)
        return _plain_clone(layer)

    clone, pairs = _clone(model, make_layer)
    for old, new in pairs:
        n = len(new.weights)
        if n:
            new.set_weights([_masked_value(v) for v in old.weights[:n]])
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
