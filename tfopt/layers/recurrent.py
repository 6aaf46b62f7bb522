"""tfopt twins of Keras's recurrent layers: LSTM, GRU, SimpleRNN (pruning).

Their `kernel` and `recurrent_kernel` (held by the layer's `cell`) are pruned,
each with its own mask (`kernel_mask`, `recurrent_kernel_mask`) and one
`pruning_step`; the `tfopt.geometry` entries say so. Quantization-aware
training of recurrent layers is not available yet: `quantization_aware=`
is refused with a message.
"""

import keras

from tfopt.layers.base import twin

__all__ = ["LSTM", "GRU", "SimpleRNN"]

LSTM = twin(keras.layers.LSTM, module=__name__)
GRU = twin(keras.layers.GRU, module=__name__)
SimpleRNN = twin(keras.layers.SimpleRNN, module=__name__)

LSTM.__doc__ += """
    Example:
    >>> import numpy as np, tfopt
    >>> layer = tfopt.layers.LSTM(4, pruning_schedule="baseline", name="lstm")
    >>> tuple(layer(np.ones((2, 5, 3), "float32")).shape)
    (2, 4)
    >>> [w.name for w in layer.weights if "mask" in w.name or "step" in w.name]
    ['kernel_mask', 'recurrent_kernel_mask', 'pruning_step']
"""
