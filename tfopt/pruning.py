"""The pruning engine shared by `tfopt.layers`, `tfopt.callbacks.Pruning` and `tfopt.prune`.

How a weight is pruned: its mask is a non-trainable Keras variable, and the
weight's `constraint` (which Keras optimizers apply in-graph after every
update) is wrapped so that, after the user's own constraint, it

1. asks the schedule whether this step updates the mask, and to what sparsity;
2. if so (and the weights are finite), recomputes the mask from the magnitudes
   of the *already masked* weights, so pruned weights stay pruned;
3. returns `weight * mask`, so the stored weights are sparse at every step
   (checkpoints written during training are already sparse).

The forward pass is untouched: it costs nothing between mask updates, and a
layer at zero sparsity computes exactly what Keras computes.
"""

import logging

import keras
from keras import ops

from tfopt import _backend
from tfopt._compat import reject_keras2
from tfopt import schedules as schedules_lib
from tfopt import sparsity as sparsity_lib

__all__ = ["PrunableWeight", "prunable_weights", "make_constraint", "check_keras3"]

log = logging.getLogger("tfopt")


class PrunableWeight:
    """A weight to prune, with its input (reduction) and output-channel axes."""

    def __init__(self, variable, in_axis, out_axis):
        self.variable = variable
        self.in_axis = in_axis
        self.out_axis = out_axis

    def __repr__(self):
        return f"PrunableWeight({self.variable.path}, in_axis={self.in_axis}, out_axis={self.out_axis})"


# (layer type, weight attribute, input axis, output axis); first isinstance match wins.
_REGISTRY = [
    (keras.layers.SeparableConv1D, "pointwise_kernel", -2, -1),
    (keras.layers.SeparableConv2D, "pointwise_kernel", -2, -1),
    (keras.layers.DepthwiseConv1D, "kernel", -2, -2),
    (keras.layers.DepthwiseConv2D, "kernel", -2, -2),
    (keras.layers.Conv1DTranspose, "kernel", -1, -2),
    (keras.layers.Conv2DTranspose, "kernel", -1, -2),
    (keras.layers.Conv3DTranspose, "kernel", -1, -2),
    (keras.layers.Embedding, "embeddings", -1, -1),
    (keras.layers.EinsumDense, "kernel", 0, -1),
    (keras.layers.Dense, "kernel", 0, -1),
    (keras.layers.Conv1D, "kernel", -2, -1),
    (keras.layers.Conv2D, "kernel", -2, -1),
    (keras.layers.Conv3D, "kernel", -2, -1),
]


def weight_spec(layer):
    """Returns `(attribute, in_axis, out_axis)` for a known Keras layer type, else None."""
    for cls, attr, in_axis, out_axis in _REGISTRY:
        if isinstance(layer, cls):
            return attr, in_axis, out_axis
    return None


def prunable_weights(layer):
    """Returns the `PrunableWeight`s of a built layer (empty if there are none).

    Order of lookup: the layer's own `prunable_weights()` method (for custom
    layers; it returns variables, whose input axis is taken as 0 for matrices
    and -2 otherwise), the registry of Keras layer types (subclasses included),
    then any trainable float variable attribute named `kernel`.
    """
    custom = getattr(layer, "prunable_weights", None)
    if callable(custom):
        return [
            w if isinstance(w, PrunableWeight) else PrunableWeight(w, 0 if len(w.shape) == 2 else -2, -1)
            for w in custom()
        ]
    if not layer.built:
        return []
    spec = weight_spec(layer)
    if spec is not None:
        attr, in_axis, out_axis = spec
        return [PrunableWeight(getattr(layer, attr), in_axis, out_axis)]
    kernel = getattr(layer, "kernel", None)
    if isinstance(kernel, keras.Variable) and kernel.trainable and len(kernel.shape) >= 2:
        return [PrunableWeight(kernel, 0 if len(kernel.shape) == 2 else -2, -1)]
    return []


def make_constraint(mask, step_fn, schedule_fn, structure, in_axis, out_axis, inner=None, after=None):
    """Returns a weight constraint that updates `mask` on schedule and applies it.

    Args:
        mask: the mask variable (same shape and dtype as the weight).
        step_fn: returns the current step (a tensor) when called in the train step.
        schedule_fn: returns the schedule to use; called at trace time, so a
            schedule resolved from `fit`'s length is picked up.
        structure: a `tfopt.sparsity.Structure`.
        inner: the user's constraint, applied first.
        after: called after the mask is assigned (for example to count steps).
    """

    def apply(weight):
        if inner is not None:
            weight = inner(weight)
        should_prune, sparsity = schedule_fn()(step_fn())
        current = ops.convert_to_tensor(mask)

        def recompute():
            # Never from NaN/Inf magnitudes: keep the previous mask then.
            finite = ops.all(ops.isfinite(weight))
            masked = ops.multiply(weight, current)  # pruned weights stay pruned
            new = structure.mask(masked, sparsity, in_axis, out_axis)
            return ops.where(finite, new, current)

        if _backend.in_replica_of_strategy():
            # Writing a synchronized variable inside a cond branch needs a
            # merge_call, which TF does not allow in control flow: assign
            # after the cond (one mask write per step).
            new_mask = ops.cond(should_prune, recompute, lambda: current)
            mask.assign(new_mask)
        else:
            # No strategy: write the mask only on update steps.
            def update():
                new = recompute()
                mask.assign(new)
                return new

            new_mask = ops.cond(should_prune, update, lambda: current)
        if after is not None:
            after()
        return ops.multiply(weight, new_mask)

    return _PruningConstraint(apply, inner)


class _PruningConstraint(keras.constraints.Constraint):
    """The wrapped constraint set on a pruned variable (a `Constraint` instance,
    as Keras < 3.12 requires of `variable.constraint`). Never serialized: layer
    configs keep the user's own constraint."""

    def __init__(self, fn, inner):
        self._fn = fn
        self._tfopt_inner = inner

    def __call__(self, weight):
        return self._fn(weight)


def inner_constraint(variable):
    """The user's constraint under a tfopt pruning constraint (or the constraint itself)."""
    c = variable.constraint
    return getattr(c, "_tfopt_inner", c)


def is_pruning_constraint(constraint):
    return constraint is not None and hasattr(constraint, "_tfopt_inner")


def check_keras3(obj, arg="model"):
    """Raises a clear error when `obj` comes from tf_keras (Keras 2) or tfmot."""
    reject_keras2(obj, arg)
    if not isinstance(obj, (keras.layers.Layer, keras.Model)) and arg == "model":
        raise TypeError(
            f"`{arg}` must be a Keras 3 `keras.Model`. Received: {arg}={obj!r} of type "
            f"{type(obj).__name__}"
        )


def resolve_schedule(schedule, total_steps):
    return schedule.resolve(total_steps) if schedule.is_relative else schedule


def get_schedule(identifier):
    if identifier is not None and not isinstance(identifier, (str, dict, schedules_lib.SparsitySchedule)):
        reject_keras2(identifier, "pruning_schedule")
    return schedules_lib.get(identifier)


def get_structure(identifier):
    if identifier is not None and not isinstance(
        identifier, (str, dict, tuple, list, sparsity_lib.Structure)
    ):
        reject_keras2(identifier, "structure")
    return sparsity_lib.get(identifier)


def _matches(selector, layer):
    if isinstance(selector, str):
        return layer.name == selector
    if isinstance(selector, type):
        return isinstance(layer, selector)
    return bool(selector(layer))


def _check_selector(item):
    if not (isinstance(item, (str, type)) or callable(item)):
        raise TypeError(
            "`layers` selects layers by name (str), by type (a Keras layer class) or by "
            f"predicate (callable taking a layer). Received an item {item!r} of type "
            f"{type(item).__name__}"
        )


def check_layers_arg(selector):
    """Validates a `layers=` argument (None, name, type, predicate, or a list of them)."""
    if selector is None:
        return
    items = list(selector) if isinstance(selector, (list, tuple, set)) else [selector]
    for item in items:
        _check_selector(item)


def select_layers(candidates, selector):
    """Returns the layers of `candidates` that `selector` picks, and whether it named them.

    `selector` is None (every candidate), a name, a type, a predicate, or a
    list of those. Names that match no layer raise, listing the names there are.
    """
    if selector is None:
        return list(candidates), False
    check_layers_arg(selector)
    items = list(selector) if isinstance(selector, (list, tuple, set)) else [selector]
    names = {layer.name for layer in candidates}
    missing = [item for item in items if isinstance(item, str) and item not in names]
    if missing:
        raise ValueError(
            f"`layers` names {missing}, which are not layers of this model. "
            f"Layer names are: {sorted(names)}"
        )
    return [layer for layer in candidates if any(_matches(i, layer) for i in items)], True


def select_targets(candidates, selector, structure, who):
    """The `(layer, PrunableWeight)` pairs to prune among `candidates`.

    Layers named by `selector` must be prunable and fit `structure` (else
    ValueError); with `selector=None`, layers that `structure` does not fit are
    left out with a warning naming them, from `who`.
    """
    chosen, named = select_layers(candidates, selector)
    targets, skipped = [], []
    for layer in chosen:
        weights = prunable_weights(layer)
        if not weights and named:
            raise no_prunable_weights_error(layer)
        for pw in weights:
            where = f"Layer '{layer.name}' ({type(layer).__name__}) weight '{pw.variable.name}'"
            try:
                structure.validate(pw.variable.shape, pw.in_axis, pw.out_axis, where)
            except ValueError:
                if named:
                    raise
                skipped.append(layer.name)
                continue
            targets.append((layer, pw))
    if skipped:
        log.warning(
            "%s: structure %r does not fit layers %s; they stay dense. Select layers "
            "with `layers=` to silence this.", who, structure, skipped,
        )
    return targets, named


def no_prunable_weights_error(layer):
    return ValueError(
        f"Layer '{layer.name}' ({type(layer).__name__}) has no prunable weights, but it was "
        "selected explicitly with `layers=`. tfopt prunes layers with a `kernel` "
        "(Dense, Conv*, EinsumDense, ...) or `embeddings`. To prune a custom layer, give "
        "it a `prunable_weights()` method returning its variables to prune, or leave it "
        f"out of `layers`. Received: layer={layer.name!r}"
    )


def all_layers(model):
    """Every layer inside `model`, nested models' layers included, each once."""
    seen, out = set(), []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if id(layer) not in seen:
            seen.add(id(layer))
            out.append(layer)
    return out
