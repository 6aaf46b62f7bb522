"""What tfopt's callbacks share: the length of the running `fit`, a retrace,
and tfopt-owned variables made the way the model's strategy wants them."""

import keras

from tfopt import _backend

__all__ = ["total_steps", "retrace", "state_variable"]


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
