"""What tfopt's callbacks share: the length of the running `fit`, a retrace,
and tfopt-owned variables made the way the model's strategy wants them (or,
under JAX, carried by the optimizer)."""

import keras

from tfopt import _backend, _state

__all__ = ["total_steps", "retrace", "state_variable", "carried_variable", "own_optimizer_variables"]

# optimizer -> the variables tfopt lent it (`carried_variable`), in the order made.
_CARRIED = _state.ObjectRegistry()


def total_steps(params):
    """Steps of the running `fit` (epochs x steps per epoch), or None if unknown
    (an infinite or unsized dataset without `steps_per_epoch`)."""
    if params and params.get("steps") and params.get("epochs"):
        return int(params["epochs"]) * int(params["steps"])
    return None


def retrace(model):
    """Drops the model's traced train/test/predict functions, so the next call
    traces again with what changed in its structure (new constraints, new
    schedule variables). Never needed for a change of a variable's value."""
    for attr in ("test_function", "predict_function"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if getattr(model, "train_function", None) is not None:
        model.make_train_function(force=True)


def state_variable(model, value, name, dtype=None):
    """A non-trainable tfopt-owned variable (not tracked by any layer, not
    saved), created eagerly under the strategy `model` was built with. It is
    written from the host (between steps), so it is mirrored, not replica-local
    like the state the replicas write (`_keras_internal.replica_local_variable`).
    `dtype` defaults to the backend's widest integer (`_backend.int_dtype()`)."""
    dtype = dtype or _backend.int_dtype()

    def make():
        with _backend.strategy_scope(model):
            return keras.Variable(value, dtype=dtype, trainable=False, name=name,
                                  aggregation="only_first_replica")

    return _backend.in_init_scope(make)


def carried_variable(optimizer, value, name, dtype):
    """`_backend.optimizer_variable`: a variable holding `value` that `optimizer`
    carries through JAX's stateless train step (a mask, a pruning step, the length
    of the running `fit`). `optimizer` then saves and loads only its own
    variables (`own_optimizer_variables`), as it does under TensorFlow, where
    tfopt lends it none: Keras skips an optimizer's whole saved state, its
    `iterations` included, when the file holds another number of variables than
    the optimizer, so a `.keras` file with tfopt's in it would lose the step and
    the slots when loaded into a fresh optimizer. The callbacks re-derive their
    masks from the zeros of the loaded weights, as under TensorFlow."""
    variable = _backend.optimizer_variable(optimizer, value, name, dtype)
    carried = _CARRIED.get(optimizer)
    if carried is None:
        carried = []
        _CARRIED.set(optimizer, carried)
        _save_own_variables_only(optimizer)
    carried.append(variable)
    return variable


def own_optimizer_variables(optimizer):
    """`optimizer.variables` without those tfopt lent it (`carried_variable`)."""
    lent = {id(v) for v in _CARRIED.get(optimizer, ())}
    return [v for v in optimizer.variables if id(v) not in lent]


def _save_own_variables_only(optimizer):
    """Gives `optimizer` (the instance) Keras's `save_own_variables` and
    `load_own_variables` over `own_optimizer_variables` instead of all its
    variables. A file that holds another count (one saved with tfopt's
    variables) goes to Keras's own `load_own_variables`, which says why it
    skips it."""
    keras_load = optimizer.load_own_variables

    def save_own_variables(store):
        for i, variable in enumerate(own_optimizer_variables(optimizer)):
            store[str(i)] = variable.numpy()

    def load_own_variables(store):
        own = own_optimizer_variables(optimizer)
        if len(store.keys()) != len(own):
            return keras_load(store)
        for i, variable in enumerate(own):
            variable.assign(store[str(i)])

    optimizer.save_own_variables = save_own_variables
    optimizer.load_own_variables = load_own_variables
