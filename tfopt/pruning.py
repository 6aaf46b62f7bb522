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

from tfopt import _backend, _keras_internal, _state, geometry
from tfopt._keras2 import reject_keras2
from tfopt import schedules as schedules_lib
from tfopt import sparsity as sparsity_lib

__all__ = [
    "PrunableWeight",
    "prunable_weights",
    "make_constraint",
    "check_keras3",
    "attach",
    "record_of",
    "masked_value",
    "bake",
    "PRUNING_BACKENDS",
    "check_backend",
]

log = logging.getLogger("tfopt")

#: The Keras backends on which tfopt prunes during `fit` (each is tested): TensorFlow, whose
#: train step writes variables, and JAX, whose stateless step carries tfopt's state in the optimizer.
PRUNING_BACKENDS = ("tensorflow", "jax")


def check_backend(where, backend=None):
    """Raises a ValueError naming `where`, the Keras backend (`backend`, default the
    running one) and the supported ones, when tfopt cannot prune during `fit` there
    (`PRUNING_BACKENDS`). Schedules, and the forward pass of tfopt layers, run on
    any backend; only the mask update in the train step is backend-specific.

    Example:
    >>> check_backend("tfopt.callbacks.Pruning", backend="jax")
    >>> check_backend("tfopt.callbacks.Pruning", backend="torch")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: tfopt.callbacks.Pruning prunes during `fit` under the Keras backends ('tensorflow', 'jax'), ...
    """
    backend = backend or keras.backend.backend()
    if backend not in PRUNING_BACKENDS:
        raise ValueError(
            f"{where} prunes during `fit` under the Keras backends {PRUNING_BACKENDS}, and Keras runs on "
            f"backend {backend!r} here: tfopt's mask updates are not implemented (nor tested) in its train "
            f"step. Received: KERAS_BACKEND={backend!r}. Fix: set KERAS_BACKEND=tensorflow or "
            "KERAS_BACKEND=jax before importing keras (tfopt's schedules, and the forward pass of tfopt "
            "layers, run on any backend).")


class PrunableWeight:
    """A weight to prune, with its input (reduction) and output-channel axes."""

    def __init__(self, variable, in_axis, out_axis):
        self.variable = variable
        self.in_axis = in_axis
        self.out_axis = out_axis

    def __repr__(self):
        return f"PrunableWeight({self.variable.path}, in_axis={self.in_axis}, out_axis={self.out_axis})"


def prunable_weights(layer):
    """Returns the `PrunableWeight`s of a built layer (empty if there are none).

    Order of lookup: the layer's own `prunable_weights()` method (for custom
    layers; it returns variables, whose input axis is taken as 0 for matrices
    and -2 otherwise), the `tfopt.geometry` entry of its type (subclasses
    included), then any trainable float variable attribute named `kernel`.
    """
    custom = getattr(layer, "prunable_weights", None)
    if callable(custom):
        return [
            w if isinstance(w, PrunableWeight) else PrunableWeight(w, 0 if len(w.shape) == 2 else -2, -1)
            for w in custom()
        ]
    if not layer.built:
        return []
    if geometry.of(layer) is not None:
        return [PrunableWeight(v, spec.in_axis, spec.out_axis) for spec, v in geometry.prunable_weights(layer)]
    kernel = getattr(layer, "kernel", None)
    if isinstance(kernel, keras.Variable) and kernel.trainable and len(kernel.shape) >= 2:
        return [PrunableWeight(kernel, 0 if len(kernel.shape) == 2 else -2, -1)]
    return []


# --- the pruning state of a variable ----------------------------------------------------
def attach(variable, mask, schedule, structure, in_axis, out_axis, step_fn, owner, length_fn, after=None,
           carried=False):
    """Prunes `variable` from now on: wraps its constraint (the user's own still
    runs first, see `make_constraint`) and records what prunes it, for strip,
    summary and export. `owner` is the tfopt layer or callback that attached it.
    `carried` says that `mask` and the step are optimizer-owned variables (or
    the optimizer's `iterations`), the state JAX's stateless optimizer update
    reads and returns; a tfopt layer's own mask and step are layer weights,
    which it cannot write (`tfopt.callbacks.Pruning` lends the layer
    optimizer-owned copies during `fit`). Returns the constraint."""
    name = getattr(owner, "name", None)  # a layer's (callbacks have none)
    where = (f"Layer '{name}' ({type(owner).__name__}) with a pruning_schedule" if isinstance(name, str)
             else f"tfopt.callbacks.{type(owner).__name__}")
    uncarried = None
    if not carried:
        uncarried = (
            f"Layer '{getattr(owner, 'name', owner)}' ({type(owner).__name__}) has its own pruning_schedule "
            f"({schedule!r}); under the JAX backend its masks and step persist during `fit` only through "
            "`tfopt.callbacks.Pruning()`, which carries them in the optimizer's state. Received: weight "
            f"'{variable.name}' trained without it. Fix: model.fit(..., callbacks=[tfopt.callbacks.Pruning()]).")
    constraint = make_constraint(mask, step_fn, schedule, structure, in_axis, out_axis,
                                 inner=inner_constraint(variable), after=after, length_fn=length_fn,
                                 uncarried_error=uncarried, where=where)
    variable.constraint = constraint
    _state.PRUNED.set(variable, _state.PruneRecord(mask, structure, schedule, in_axis, out_axis, owner=owner))
    return constraint


def record_of(variable):
    """The `PruneRecord` of a pruned variable, or None."""
    return _state.PRUNED.get(variable)


def masked_value(variable):
    """The variable's value (numpy) with its mask applied, if it has one."""
    value = ops.convert_to_numpy(variable)
    record = record_of(variable)
    if record is not None:
        value = value * ops.convert_to_numpy(record.mask)
    return value


def bake(variable):
    """Multiplies a pruned variable by its mask and detaches pruning from it
    (its constraint goes back to the user's own)."""
    if record_of(variable) is None:
        return
    variable.assign(masked_value(variable))
    if is_pruning_constraint(variable.constraint):
        variable.constraint = inner_constraint(variable)
    _state.PRUNED.pop(variable)


def make_constraint(mask, step_fn, schedule, structure, in_axis, out_axis, inner=None, after=None,
                    length_fn=None, mask_fn=None, uncarried_error=None, before=None, where=None):
    """Returns a weight constraint that updates `mask` on schedule and applies it.

    Args:
        mask: the mask variable (same shape and dtype as the weight; replica-local,
            `synchronization="on_read"`, when made under a strategy).
        step_fn: returns the current step (a tensor) when called in the train step.
        schedule: the `SparsitySchedule`.
        structure: a `tfopt.sparsity.Structure`.
        inner: the user's constraint, applied first.
        after: called after the mask is assigned (for example to count steps).
        length_fn: for a schedule in percentages of training, returns the
            variable holding the length of the running `fit` (read in-graph,
            so a new length needs no retrace); called while tracing, it may
            raise to say that nothing gave the length.
        mask_fn: computes the new mask on an update step, `mask_fn(masked_weight,
            sparsity)`, instead of `structure.mask(masked_weight, sparsity,
            in_axis, out_axis)`: for masks that come from more than this weight
            (`WidthPruning`'s channel groups, shared by every kernel that reads
            or writes a channel).
        uncarried_error: raised (a ValueError) when the constraint runs in a
            stateless train step (JAX), where `mask` and the step would not
            persist: the message says which callback carries them.
        before: called as `before(should_prune, sparsity)` in the train step,
            after the schedule and before the mask, outside the branches of
            the update's `ops.cond`: for state besides `mask` that the step
            writes (`WidthPruning`'s keep vectors under JAX, where a write
            inside a branch would leak out of the branch's trace).
        where: who prunes (a layer, a callback), named in the error that the
            first train step raises on a backend tfopt cannot prune on
            (`check_backend`; the callbacks check when they are attached).
    """
    if mask_fn is None:
        def mask_fn(masked, sparsity):
            return structure.mask(masked, sparsity, in_axis, out_axis)

    def apply(weight):
        check_backend(where or "tfopt pruning")
        if uncarried_error is not None and _backend.stateless_steps():
            raise ValueError(uncarried_error)
        if inner is not None:
            weight = inner(weight)
        total = ops.convert_to_tensor(length_fn()) if schedule.is_relative else None
        should_prune, sparsity = schedule(step_fn(), total)
        if before is not None:
            before(should_prune, sparsity)
        current = ops.convert_to_tensor(mask)

        def compute():
            # Never from NaN/Inf magnitudes: keep the previous mask then.
            finite = ops.all(ops.isfinite(weight))
            masked = ops.multiply(weight, current)  # pruned weights stay pruned
            return ops.where(finite, mask_fn(masked, sparsity), current)

        if _backend.stateless_steps():
            # JAX traces the branches of the cond as functions of their own: a write
            # inside one would leak out of its trace, so the mask is written after.
            new_mask = ops.cond(should_prune, compute, lambda: current)
            mask.assign(new_mask)
        else:
            # Written on update steps only. Under a strategy the mask is replica-local (every
            # replica computes the same mask from the same synchronized weights and writes its
            # own copy): no merge_call, which TF would not allow inside the cond.
            def update():
                new = compute()
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
        self.inner = inner

    def __call__(self, weight):
        return self._fn(weight)


def inner_constraint(variable):
    """The user's constraint under a tfopt pruning constraint (or the constraint itself)."""
    c = variable.constraint
    return c.inner if isinstance(c, _PruningConstraint) else c


def is_pruning_constraint(constraint):
    return isinstance(constraint, _PruningConstraint)


def check_keras3(obj, arg="model"):
    """Raises a clear error when `obj` comes from tf_keras (Keras 2) or tfmot."""
    reject_keras2(obj, arg)
    if not isinstance(obj, (keras.layers.Layer, keras.Model)) and arg == "model":
        raise TypeError(
            f"`{arg}` must be a Keras 3 `keras.Model`. Received: {arg}={obj!r} of type "
            f"{type(obj).__name__}"
        )


def get_schedule(identifier):
    if identifier is not None and not isinstance(identifier, (str, dict, schedules_lib.SparsitySchedule)):
        reject_keras2(identifier, "pruning_schedule")
    return schedules_lib.get(identifier)


def get_structure(identifier, schedule=None, where=None):
    """The `Structure` for `identifier`; with `where` (who asks), refuses a
    structure given without a schedule (it would never prune) and gives None
    when there is no schedule."""
    if where is not None and schedule is None:
        if identifier is not None:
            raise ValueError(
                f"{where} got structure={identifier!r} but no `pruning_schedule`, so it would never "
                "prune. Pass `pruning_schedule=` too (for example 'baseline')."
            )
        return None
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
    targets, skipped, seen = [], [], set()
    for layer in chosen:
        weights = prunable_weights(layer)
        if not weights and named:
            raise no_prunable_weights_error(layer)
        for pw in weights:
            if id(pw.variable) in seen:
                continue  # reached twice (an RNN's cell and the RNN itself)
            seen.add(id(pw.variable))
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


def unknown_weight_layers(layers):
    """Names of layers with trainable weights of rank >= 2 of their own that
    tfopt cannot prune (no geometry entry, no `kernel`, no `prunable_weights()`):
    a custom layer in the style of Keras's guide (`self.w = self.add_weight(...)`)."""
    out = []
    for layer in layers:
        if geometry.of(layer) is not None or prunable_weights(layer) or not layer.built:
            continue
        if any(v.trainable and len(v.shape) >= 2 for v in _keras_internal.own_variables(layer)):
            out.append(f"{layer.name} ({type(layer).__name__})")
    return out


def no_prunable_weights_error(layer):
    return ValueError(
        f"Layer '{layer.name}' ({type(layer).__name__}) has no prunable weights, but it was "
        "selected explicitly with `layers=`. tfopt prunes layers with a `kernel` "
        "(Dense, Conv*, EinsumDense, ...) or `embeddings`. To prune a custom layer, give "
        "it a `prunable_weights()` method returning its variables to prune, or leave it "
        f"out of `layers`. Received: layer={layer.name!r}"
    )

