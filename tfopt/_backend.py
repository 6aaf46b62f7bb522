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


def cross_replica_min_max(lo, hi):
    """Global (min, max) of scalar statistics over all replicas of the running
    strategy (the same values on every replica); identity without one.

    `all_reduce` offers only SUM and MEAN (a mean of maxima is not a maximum),
    so the replicas' values are all-gathered and reduced here."""
    import tensorflow as tf

    if not in_replica_of_strategy():
        return lo, hi
    ctx = tf.distribute.get_replica_context()
    both = tf.stack([-tf.reshape(lo, []), tf.reshape(hi, [])])[None, :]
    gathered = ctx.all_gather(both, axis=0)
    top = tf.reduce_max(gathered, axis=0)
    return -top[0], top[1]


def cross_replica_sum(values):
    """Sums of a list of tensors over all replicas of the running strategy (the
    same on every replica); identity without one."""
    import tensorflow as tf

    if not in_replica_of_strategy():
        return values
    return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, values)


def conv(inputs, kernel, strides, padding, data_format, dilation_rate):
    """`keras.ops.conv`, except that a dilated 2-D convolution runs as one
    TensorFlow Conv2D with `dilations`: `tf.nn.convolution` splits it into
    SpaceToBatch, Conv2D and BatchToSpace, and after a bias add the converter
    no longer fuses them, leaving the convolution in float in an int8 file."""
    import keras
    from keras import ops

    strides, dilation_rate = tuple(strides), tuple(dilation_rate)
    plain = (
        keras.backend.backend() != "tensorflow" or len(inputs.shape) != 4 or data_format != "channels_last"
        or max(dilation_rate) == 1 or max(strides) != 1 or inputs.shape[-1] != kernel.shape[-2]
    )
    if plain:
        return ops.conv(inputs, kernel, strides, padding, data_format, dilation_rate)
    import tensorflow as tf

    return tf.nn.conv2d(inputs, kernel, 1, padding.upper(), "NHWC", dilations=(1,) + dilation_rate + (1,))

