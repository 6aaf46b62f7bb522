"""tfopt twins of Keras's core layers: Dense, EinsumDense, Embedding."""

import keras

from tfopt.layers.prunable import Prunable, with_keras_signature

__all__ = ["Dense", "EinsumDense", "Embedding"]


@with_keras_signature
@keras.saving.register_keras_serializable(package="tfopt")
class Dense(Prunable, keras.layers.Dense):
    """Drop-in `keras.layers.Dense` that can prune its `kernel` during `fit`.

    Takes every argument of `keras.layers.Dense`, plus `pruning_schedule=` and
    `structure=` (see `tfopt.layers.Prunable`). N:M groups run along the input
    dimension (axis 0 of the `(in, out)` kernel).

    Example:
    >>> import keras, numpy as np, tfopt
    >>> layer = tfopt.layers.Dense(4, pruning_schedule="baseline", name="dense")
    >>> tuple(layer(np.ones((2, 8), "float32")).shape)
    (2, 4)
    >>> [w.name for w in layer.weights]
    ['kernel', 'bias', 'kernel_mask', 'pruning_step']
    """


@with_keras_signature
@keras.saving.register_keras_serializable(package="tfopt")
class EinsumDense(Prunable, keras.layers.EinsumDense):
    """Drop-in `keras.layers.EinsumDense` that can prune its `kernel` during `fit`.

    N:M groups and blocks use axis 0 of the kernel as the input dimension.

    Example:
    >>> import numpy as np, tfopt
    >>> layer = tfopt.layers.EinsumDense("ab,bc->ac", output_shape=4, pruning_schedule="baseline")
    >>> tuple(layer(np.ones((2, 8), "float32")).shape)
    (2, 4)
    """


@with_keras_signature
@keras.saving.register_keras_serializable(package="tfopt")
class Embedding(Prunable, keras.layers.Embedding):
    """Drop-in `keras.layers.Embedding` that can prune its `embeddings` during `fit`.

    N:M groups run along the embedding dimension; "channel" removes whole
    embedding dimensions.

    Example:
    >>> import numpy as np, tfopt
    >>> layer = tfopt.layers.Embedding(100, 8, pruning_schedule="baseline")
    >>> tuple(layer(np.array([[1, 2, 3]])).shape)
    (1, 3, 8)
    """
