"""`reestimate_batch_norm`: BatchNormalization statistics that match the weights the model has now."""

import keras
import numpy as np
from keras import ops

from tfopt import _keras_internal, geometry

__all__ = ["reestimate_batch_norm"]


def _batch_norms(model):
    """`[(layer, setter of its momentum, its moving statistics)]`: Keras
    BatchNormalization layers, and the BatchNormalizations that
    `quantize_model` folded into tfopt layers."""
    out = []
    for layer in _keras_internal.all_layers(model):
        if geometry.role(layer) == geometry.BATCH_NORM and hasattr(layer, "moving_mean"):
            def set_momentum(value, layer=layer):
                layer.momentum = value
            out.append((layer, layer.momentum, set_momentum, [layer.moving_mean, layer.moving_variance]))
        folding = getattr(layer, "_folding", None)
        if folding is not None:
            def set_momentum(value, folding=folding):
                folding.config["momentum"] = value
            out.append((layer, folding.momentum, set_momentum,
                        [layer.bn_moving_mean, layer.bn_moving_variance]))
    return out


def _batches(data, batch_size):
    """Input batches from an array (or a list/dict of arrays, or an `(x, y)`
    tuple of them), a `tf.data.Dataset` or any iterable of batches."""
    def inputs(batch):
        return batch[0] if isinstance(batch, tuple) else batch

    if isinstance(data, np.ndarray) or (isinstance(data, dict) and data) or (
            isinstance(data, (list, tuple)) and data and all(isinstance(a, np.ndarray) for a in data)):
        x = inputs(data) if isinstance(data, tuple) else data
        first = keras.tree.flatten(x)[0]
        for start in range(0, len(first), batch_size):
            yield keras.tree.map_structure(lambda a: a[start:start + batch_size], x)
        return
    for batch in data:
        yield inputs(batch)


def reestimate_batch_norm(model, data, batch_size=32, steps=None):
    """Recomputes every BatchNormalization's moving mean and variance from `data`.

    A BatchNormalization's moving statistics follow the weights slowly (with
    its `momentum`). After pruning from scratch, `shrink`, or after a callback
    such as `keras.callbacks.EarlyStopping(restore_best_weights=True)` hands
    back weights from another epoch, they can describe weights the model no
    longer has: the model is then much worse in inference (`training=False`)
    than in training. This runs the model in training mode over `data` and sets
    each moving statistic to the exact average of the batch statistics, as if
    every batch had equal weight (a cumulative average, not an exponential
    one). Nothing else changes: the weights, tfopt's masks, activation ranges
    and every other variable are restored after the passes. BatchNormalizations
    that `tfopt.quantize_model` folded into a layer are re-estimated too.

    Args:
        model: a built Keras model.
        data: inputs of the model: an array (or a list or dict of arrays, or an
            `(x, y)` tuple, whose `y` is ignored), a `tf.data.Dataset` or any
            iterable of batches (`x` or `(x, y, ...)`). A few hundred examples
            from the training data are enough.
        batch_size: batch size when `data` is an array.
        steps: at most this many batches (None: all of `data`).

    Returns:
        The number of BatchNormalization layers re-estimated.

    Example:
    >>> import keras, numpy as np, tfopt
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.BatchNormalization()])
    >>> x = np.random.default_rng(0).normal(3.0, 2.0, (256, 4)).astype("float32")
    >>> tfopt.reestimate_batch_norm(model, x)
    1
    >>> bn = model.layers[1]
    >>> bool(np.allclose(bn.moving_mean.numpy(), model.layers[0](x).numpy().mean(0), atol=1e-3))
    True
    """
    if not isinstance(model, keras.Model) or not model.built:
        raise ValueError(
            f"`tfopt.reestimate_batch_norm` needs a built Keras model. Received: model={model!r}. "
            "Fix: build it first (start it with `keras.Input`, or call it on data).")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int. Received: batch_size={batch_size!r}")
    norms = _batch_norms(model)
    if not norms:
        return 0
    statistics = {id(v) for _, _, _, variables in norms for v in variables}
    kept = [(v, ops.convert_to_numpy(v)) for v in model.variables if id(v) not in statistics]
    originals = [(set_momentum, momentum) for _, momentum, set_momentum, _ in norms]
    frozen = [layer for layer, _, _, _ in norms if not layer.trainable]  # a frozen BN would not update
    seen = 0
    try:
        for layer in frozen:
            layer.trainable = True
        for batch in _batches(data, batch_size):
            if steps is not None and seen >= steps:
                break
            for set_momentum, _ in originals:
                set_momentum(seen / (seen + 1.0))  # the first batch replaces, later ones average in
            model(batch, training=True)
            seen += 1
    finally:
        for layer in frozen:
            layer.trainable = False
        for set_momentum, momentum in originals:
            set_momentum(momentum)
        for variable, value in kept:
            variable.assign(value)
    if not seen:
        raise ValueError(
            "`tfopt.reestimate_batch_norm` got `data` with no batches, so no statistic could be "
            f"estimated. Received: data of type {type(data).__name__}. Fix: pass some training inputs.")
    return len(norms)
