"""`prune`: a copy of a Sequential or Functional model whose layers prune during `fit`."""

import logging

from tfopt import geometry, pruning
from tfopt import sparsity as sparsity_lib
from tfopt.adapters import keras_hub as _keras_hub
from tfopt.transforms import _graph

__all__ = ["prune"]

log = logging.getLogger("tfopt")


def prune(model, pruning_schedule, structure=None, layers=None):
    """Returns a copy of a Sequential or Functional model whose layers prune during `fit`.

    Every selected Keras layer that has a tfopt twin (Dense, Conv1D/2D/3D and
    their transposes, DepthwiseConv1D/2D, SeparableConv1D/2D, EinsumDense,
    Embedding, LSTM, GRU, SimpleRNN: see `tfopt.geometry.twins()`) is replaced
    by it, with the same name, config and weights. Other layers are copied as
    they are. Nested models and shared layers are kept. The copy is not
    compiled. For subclassed models, or custom layers, use
    `tfopt.callbacks.Pruning` instead; for keras-hub models too (their
    transformer blocks are custom layers, whose kernels the callback prunes in
    place, and a rebuilt graph would not be the keras-hub class): `prune`
    refuses them.

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
    _graph.check_graph_model(model, "prune")
    if _keras_hub.handles(model):
        raise TypeError(
            f"`tfopt.prune` rebuilds a Functional graph by swapping its layers for tfopt twins, and model "
            f"'{model.name}' ({type(model).__name__}) is a keras-hub model: its kernels sit inside custom "
            "transformer-block layers the graph cannot swap (they would stay dense), and the rebuilt model would "
            "not be a keras-hub class. Fix: prune it in place during fit, model.fit(..., "
            "callbacks=[tfopt.callbacks.Pruning(schedule)]), which reaches every block's kernels; for whole "
            "units and heads, tfopt.callbacks.WidthPruning(schedule) or tfopt.shrink.")
    schedule = pruning.get_schedule(pruning_schedule)
    if schedule is None:
        raise ValueError(
            "`tfopt.prune` needs a `pruning_schedule` (a tfopt.schedules object or a preset "
            "such as 'baseline'). Received: pruning_schedule=None"
        )
    structure_obj = pruning.get_structure(structure)
    targets, named = pruning.select_targets(_graph.graph_layers(model), layers, structure_obj, "tfopt.prune")
    for layer, pw in targets:
        sparsity_lib.validate_finite(pw.variable, f"Layer '{layer.name}' weight '{pw.variable.name}'")
    swap, no_twin = set(), []
    for layer, _ in targets:
        if geometry.twin_of(layer) is not None:
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
            return _graph.plain_copy(layer)
        config = layer.get_config()
        config.update(pruning_schedule=schedule, structure=structure_obj)
        return geometry.twin_of(layer).from_config(config)

    clone, pairs = _graph.clone(model, make_layer)
    for old, new in pairs:
        if getattr(old, "weights", None):
            _graph.copy_weights(old, new)
    return clone
