"""The few TensorFlow facts the core needs, behind small functions.

The core (schedules, sparsity, layers, losses) speaks `keras.ops`; what only
TensorFlow can tell (distribution contexts, init scopes) lives here, imported
lazily, so that the core stays readable as backend-agnostic code.
"""


def in_replica_of_strategy():
    """True while tracing inside `strategy.run` of a non-default tf.distribute strategy."""
    import tensorflow as tf

    return tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context() is False


def in_init_scope(fn):
    """Runs `fn` outside any function being traced (so variables are created eagerly)."""
    import tensorflow as tf

    with tf.init_scope():
        return fn()


def strategy_scope(model):
    """The scope of the strategy `model` was built under (a null scope if none)."""
    import contextlib

    import tensorflow as tf

    strategy = getattr(model, "distribute_strategy", None)
    if strategy is None or tf.distribute.has_strategy():
        return contextlib.nullcontext()  # no strategy, or already inside one
    return strategy.scope()
