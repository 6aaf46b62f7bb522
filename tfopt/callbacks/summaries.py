"""`TensorBoardSummaries`: sparsity per weight and activation ranges in TensorBoard."""

import importlib.util
import os

import keras
import numpy as np
from keras import ops

from tfopt import _keras_internal
from tfopt.reporting import prunable_values, zero_fraction

__all__ = ["TensorBoardSummaries"]


def _ranges(model):
    """(name, min variable, max variable) for every tracked activation range."""
    out = []
    for layer in _keras_internal.all_layers(model):
        for prefix in ("", "output_"):
            lo, hi = getattr(layer, f"{prefix}range_min", None), getattr(layer, f"{prefix}range_max", None)
            if lo is not None and hi is not None:
                out.append((f"{layer.name}/{prefix}range", lo, hi))
        product = getattr(layer, "product_range", None)
        if product is not None:
            out.append((f"{layer.name}/product_range", product[0], product[1]))
    return out


class TensorBoardSummaries(keras.callbacks.Callback):
    """Writes, at the end of each epoch, to `log_dir/tfopt`:

    - `sparsity/<layer>/<weight>`: fraction of zeros of each prunable weight,
      and `sparsity/total` over them (scalars);
    - `weights/<layer>/<weight>`: the weight's values (histograms, nonzeros only,
      so that pruning shows as a shrinking distribution, not a spike at 0);
    - `range/<layer>/min` and `/max`: every tracked activation range of a
      quantization-aware model (scalars).

    Open with `tensorboard --logdir LOG_DIR`. Works beside Keras's own
    `keras.callbacks.TensorBoard` (use the same `log_dir`).

    Example:
    >>> import keras, numpy as np, tempfile, os, tfopt
    >>> model = keras.Sequential([keras.Input((4,)), tfopt.layers.Dense(2, pruning_schedule="baseline")])
    >>> model.compile("sgd", "mse")
    >>> log_dir = tempfile.mkdtemp()
    >>> _ = model.fit(np.ones((4, 4)), np.ones((4, 2)), verbose=0,
    ...               callbacks=[tfopt.callbacks.TensorBoardSummaries(log_dir)])
    >>> os.listdir(log_dir)
    ['tfopt']
    """

    def __init__(self, log_dir, histograms=True):
        super().__init__()
        if importlib.util.find_spec("tensorboard") is None:  # tf.summary writes nothing without it
            raise ImportError(
                "TensorBoardSummaries needs TensorBoard: pip install 'tfopt[tensorboard]' (or tensorboard)."
            )
        self.log_dir = str(log_dir)
        self.histograms = histograms
        self._writer = None

    def _get_writer(self):
        import tensorflow as tf

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "tfopt"))
        return self._writer

    def on_epoch_end(self, epoch, logs=None):
        import tensorflow as tf

        values = []
        with self._get_writer().as_default(step=epoch):
            for layer, pw, value in prunable_values(self.model):
                name = f"{layer.name}/{pw.variable.name}"
                tf.summary.scalar(f"sparsity/{name}", zero_fraction([value]))
                values.append(value)
                if self.histograms:
                    tf.summary.histogram(f"weights/{name}", value[value != 0])
            if values:
                tf.summary.scalar("sparsity/total", zero_fraction(values))
            for name, lo, hi in _ranges(self.model):
                tf.summary.scalar(f"range/{name}/min", float(ops.convert_to_numpy(lo)))
                tf.summary.scalar(f"range/{name}/max", float(ops.convert_to_numpy(hi)))
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
