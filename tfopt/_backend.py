"""The few backend facts the core needs, behind small functions.

The core (schedules, sparsity, layers, losses) speaks `keras.ops`; what only
TensorFlow can tell (distribution contexts, init scopes) lives here, imported
lazily (only under the TensorFlow backend), and so does what differs under
JAX, whose train step is stateless (`stateless_steps`, `optimizer_variable`),
so that the core stays readable as backend-agnostic code.
"""

import contextlib
import threading

import keras

from tfopt import _state


def is_tensorflow():
    """True under `KERAS_BACKEND=tensorflow`: the functions below that need
    TensorFlow import it only then (`import tfopt` under JAX loads no TensorFlow)."""
    return keras.backend.backend() == "tensorflow"


def int_dtype():
    """The widest integer dtype of the backend: int64 (TensorFlow's step counters,
    `optimizer.iterations` included, are int64), but int32 under JAX unless
    `jax_enable_x64` is set (JAX has no int64 then, and warns at each cast)."""
    if keras.backend.backend() == "jax":
        import jax  # lazy: the JAX backend only

        return "int64" if jax.config.jax_enable_x64 else "int32"
    return "int64"


def stateless_steps():
    """True where the train step is a pure function of the state it is passed
    (JAX): a variable the optimizer writes (a mask, written by a weight
    constraint) persists only if the optimizer carries it, and a write inside a
    branch of `ops.cond` would leak out of the branch's trace."""
    return keras.backend.backend() == "jax"


def optimizer_variable(optimizer, value, name, dtype):
    """A non-trainable variable holding `value` that `optimizer` owns (through the
    public `optimizer.add_variable`, so it is in `optimizer.variables`): the
    state a stateless train step (JAX's `stateless_apply`) reads and returns, for
    what weight constraints write, since they run in `optimizer.apply`. Make it
    before the step reads its state (before `fit`'s first step). Its buffer is
    its own, even when `value` is another variable's (JAX donates the step's
    state: two variables on one buffer would be donated twice)."""
    from keras import ops

    return optimizer.add_variable(
        shape=tuple(getattr(value, "shape", ())), initializer=lambda shape, dtype=None: ops.copy(ops.cast(value, dtype)),
        dtype=dtype, name=name)


def in_replica_of_strategy():
    """True while tracing inside `strategy.run` of a non-default tf.distribute strategy."""
    if not is_tensorflow():
        return False
    import tensorflow as tf

    return tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context() is False


def in_init_scope(fn):
    """Runs `fn` outside any function being traced (so variables are created eagerly)."""
    if not is_tensorflow():
        return fn()  # JAX and PyTorch build optimizers eagerly, outside the traced step
    import tensorflow as tf

    with tf.init_scope():
        return fn()


def strategy_scope(model):
    """The scope of the strategy `model` was built under (a null scope if none)."""
    if not is_tensorflow():
        return contextlib.nullcontext()  # tf.distribute strategies are TensorFlow's
    import tensorflow as tf

    strategy = getattr(model, "distribute_strategy", None)
    if strategy is None or tf.distribute.has_strategy():
        return contextlib.nullcontext()  # no strategy, or already inside one
    return strategy.scope()


def mean_gradients(model, loss_fn, batches):
    """`{id(variable): numpy mean gradient}` of `loss_fn(y, model(x))` (averaged
    over each batch, then over `batches` of `(x, y)`) for every trainable
    weight, under TensorFlow (a gradient tape) or JAX (`jax.grad` of the forward
    pass in a `keras.StatelessScope`); raises if `batches` is empty."""
    import numpy as np

    variables = model.trainable_weights
    gradients = _gradient_function(model, loss_fn, variables)
    sums = {id(v): np.zeros(v.shape, "float32") for v in variables}
    count = 0
    for x, y in batches:
        for v, g in zip(variables, gradients(x, y)):
            if g is not None:
                sums[id(v)] += np.asarray(g)
        count += 1
    if not count:
        raise ValueError("tfopt.shrink(importance='taylor') got `data` with no batches.")
    return {k: v / count for k, v in sums.items()}


def _gradient_function(model, loss_fn, variables):
    """`(x, y) -> gradients of mean(loss_fn(y, model(x)))` for `variables`, by backend."""
    if is_tensorflow():
        import tensorflow as tf  # lazy: the TensorFlow backend only

        def gradients(x, y):
            with tf.GradientTape() as tape:
                value = tf.reduce_mean(loss_fn(y, model(x, training=False)))
            return tape.gradient(value, variables)

        return gradients
    if keras.backend.backend() == "jax":
        import jax  # lazy: the JAX backend only

        def value(values, x, y):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return keras.ops.mean(loss_fn(y, model(x, training=False)))

        grad = jax.grad(value)
        return lambda x, y: grad([v.value for v in variables], x, y)
    raise ValueError(
        f"`tfopt.shrink(importance='taylor')` differentiates the loss with TensorFlow or JAX, and the Keras "
        f"backend is {keras.backend.backend()!r}. Received: importance='taylor'. Fix: importance='l2', or "
        "KERAS_BACKEND=tensorflow or jax.")


_BATCHED = threading.local()  # per replica thread: statistics waiting for the one collective


@contextlib.contextmanager
def batched_statistics():
    """Within it, in a replica of a tf.distribute strategy, `reduce_statistics`
    defers its reductions; on exit they all go in one collective over one packed
    vector (instead of one collective per activation range and folded
    BatchNormalization). Outside a replica, or nested, it does nothing."""
    if not in_replica_of_strategy() or getattr(_BATCHED, "pending", None) is not None:
        yield
        return
    _BATCHED.pending = []
    try:
        yield
        pending = _BATCHED.pending
    finally:
        _BATCHED.pending = None
    _reduce_packed(pending)


def reduce_statistics(values, reductions, apply):
    """Reduces per-replica statistics over all replicas and calls `apply` with
    the results (lists of tensors, in order; `reductions` says "max" or "sum"
    for each); `apply` returns the `[(variable, new value)]` to write (replica-local
    variables under a strategy: each replica writes its own copy). Without a
    strategy it runs and they are written now; in a `batched_statistics` scope,
    when the scope closes, with every other pending statistic in the same single
    collective; else now, with one collective for these values."""
    pending = getattr(_BATCHED, "pending", None)
    if not in_replica_of_strategy():
        for variable, value in apply(values):
            variable.assign(value)
    elif pending is not None:
        pending.append((values, reductions, apply))
    else:
        _reduce_packed([(values, reductions, apply)])


def _reduce_packed(pending):
    """One collective for every pending statistic, packed into one float32
    vector (each replica's vector gathered as a row); then max or sum per slot
    over the replicas, and each `apply`, whose writes go to replica-local variables
    (`_keras_internal.add_replica_local_weight`)."""
    import tensorflow as tf

    if not pending:
        return
    flat, shapes = [], []
    for values, _, _ in pending:
        for v in values:
            v = tf.cast(v, tf.float32)
            shapes.append(v.shape)  # static: ranges are scalars, moments one value per channel
            flat.append(tf.reshape(v, [-1]))
    sizes = [int(f.shape[0]) for f in flat]
    packed = tf.concat(flat, 0)
    # An all-gather as one all-reduce: each replica fills its own row of a zero
    # matrix (tf.where, so another replica's Inf/NaN never leaks in), the sum
    # holds every replica's row exactly. (MirroredStrategy's all_gather costs
    # two collective ops, one for the shapes.)
    ctx = tf.distribute.get_replica_context()
    own = tf.equal(tf.range(ctx.num_replicas_in_sync), ctx.replica_id_in_sync_group)[:, None]
    rows = tf.where(own, packed[None, :], tf.zeros_like(packed)[None, :])
    gathered = ctx.all_reduce(tf.distribute.ReduceOp.SUM, rows)
    parts = tf.split(gathered, sizes, axis=1)
    i, writes = 0, []
    for values, reductions, apply in pending:
        reduced = []
        for v, how in zip(values, reductions):
            part = parts[i]
            value = tf.reduce_max(part, axis=0) if how == "max" else tf.reduce_sum(part, axis=0)
            reduced.append(tf.cast(tf.reshape(value, shapes[i]), v.dtype))
            i += 1
        writes.extend(apply(reduced))
    # Each replica computed the same values from the same gathered rows: it writes them to
    # its own copy of each (replica-local) variable, with no merge_call.
    for variable, value in writes:
        variable.assign(tf.cast(value, variable.dtype))


def bincount(ids, size):
    """Counts of each value of the int32 `ids` in `[0, size)` (a length-`size` int32
    vector). `keras.ops.bincount` sizes its output from the data, which XLA cannot
    compile; TensorFlow's DenseBincount with a constant size compiles anywhere
    (elsewhere, a segment sum with a static number of segments, which JAX's jit takes)."""
    if not is_tensorflow():
        from keras import ops

        return ops.segment_sum(ops.ones_like(ids), ids, num_segments=size)
    import tensorflow as tf

    return tf.raw_ops.DenseBincount(input=ids, size=tf.constant(size, tf.int32), weights=tf.constant([], tf.int32),
                                    binary_output=False)


def conv(inputs, kernel, strides, padding, data_format, dilation_rate):
    """`keras.ops.conv`, except that in the trace `tfopt.export` converts, a
    dilated 2-D convolution runs as one TensorFlow Conv2D with `dilations`:
    `tf.nn.convolution` splits it into SpaceToBatch, Conv2D and BatchToSpace,
    and after a bias add the converter no longer fuses them, leaving the
    convolution in float in an int8 file. Training keeps `keras.ops.conv`:
    TensorFlow's default CPU kernels (oneDNN off, as on AMD and ARM machines)
    cannot differentiate a Conv2D with `dilations > 1`. Both compute the same."""
    import keras
    from keras import ops

    strides, dilation_rate = tuple(strides), tuple(dilation_rate)
    plain = (
        not _state.exporting()
        or keras.backend.backend() != "tensorflow" or len(inputs.shape) != 4 or data_format != "channels_last"
        or max(dilation_rate) == 1 or max(strides) != 1 or inputs.shape[-1] != kernel.shape[-2]
    )
    if plain:
        return ops.conv(inputs, kernel, strides, padding, data_format, dilation_rate)
    import tensorflow as tf

    return tf.nn.conv2d(inputs, kernel, 1, padding.upper(), "NHWC", dilations=(1,) + dilation_rate + (1,))

