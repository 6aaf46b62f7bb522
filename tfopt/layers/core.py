"""tfopt twins of Keras's core layers: Dense, EinsumDense, Embedding."""

import keras
from keras import ops

from tfopt.layers.base import twin


class IntegerDense:
    """Mixin of the Dense twin: under quantization-aware training, inputs of
    rank > 2 (sequences, transformers) are multiplied with an einsum, which the
    converter turns into one int8 FULLY_CONNECTED; Keras's `matmul` there
    becomes a BATCH_MATMUL-derived FULLY_CONNECTED, RESHAPE and ADD that the
    converter leaves in float. Same values as Keras's Dense."""

    def integer_call(self, inputs, training=None, step=None, times=None):
        if len(inputs.shape) <= 2:
            return keras.layers.Dense.call(self, inputs)
        x = times_kernel(inputs, self.kernel)
        if self.bias is not None:
            x = x + self.bias
        return x if self.activation is None else self.activation(x)

def times_kernel(x, kernel):
    """`x @ kernel` over the last axis of `x` (any rank), as an einsum with every
    axis named. The converter writes it as one int8 FULLY_CONNECTED (IntegerDense);
    TensorFlow differentiates an einsum written with `...` 100x slower (measured,
    TF 2.21: 116 ms against 1.1 ms for (8, 64, 64) x (64, 256), forward and
    backward), which made QAT steps of transformers 10-20x a float step.

    Example:
    >>> import numpy as np
    >>> tuple(times_kernel(np.ones((2, 3, 4), "float32"), np.ones((4, 5), "float32")).shape)
    (2, 3, 5)
    """
    axes = "abcdefgh"[:len(x.shape) - 1]
    return ops.einsum(f"{axes}i,io->{axes}o", x, kernel)


__all__ = ["Dense", "EinsumDense", "Embedding"]

Dense = twin(keras.layers.Dense, doc="""Drop-in `keras.layers.Dense` that can prune and quantize its `kernel` during `fit`.

    Takes every argument of `keras.layers.Dense`, plus `pruning_schedule=`,
    `structure=`, `quantization_aware=` and `folded_batch_norm=` (see
    `tfopt.layers.Prunable`). N:M groups run along the input dimension (axis 0
    of the `(in, out)` kernel).

    Example:
    >>> import keras, numpy as np, tfopt
    >>> layer = tfopt.layers.Dense(4, pruning_schedule="baseline", name="dense")
    >>> tuple(layer(np.ones((2, 8), "float32")).shape)
    (2, 4)
    >>> [w.name for w in layer.weights]
    ['kernel', 'bias', 'kernel_mask', 'pruning_step']
    """, module=__name__, mixin=IntegerDense)

EinsumDense = twin(keras.layers.EinsumDense, doc="""Drop-in `keras.layers.EinsumDense` that can prune and quantize its `kernel` during `fit`.

    N:M groups and blocks use axis 0 of the kernel as the input dimension.

    Example:
    >>> import numpy as np, tfopt
    >>> layer = tfopt.layers.EinsumDense("ab,bc->ac", output_shape=4, pruning_schedule="baseline")
    >>> tuple(layer(np.ones((2, 8), "float32")).shape)
    (2, 4)
    """, module=__name__)

Embedding = twin(keras.layers.Embedding, doc="""Drop-in `keras.layers.Embedding` that can prune and quantize its `embeddings` during `fit`.

    N:M groups run along the embedding dimension; "channel" removes whole
    embedding dimensions.

    Example:
    >>> import numpy as np, tfopt
    >>> layer = tfopt.layers.Embedding(100, 8, pruning_schedule="baseline")
    >>> tuple(layer(np.array([[1, 2, 3]])).shape)
    (1, 3, 8)
    """, module=__name__)
