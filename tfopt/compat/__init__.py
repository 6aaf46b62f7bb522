"""Compatibility with tensorflow-model-optimization (tfmot).

- `tfopt.compat.tfmot`: tfmot's Keras names (`sparsity.keras.prune_low_magnitude`,
  `quantization.keras.quantize_model`, ...) on Keras 3, so that code written for
  tfmot runs with only its import changed. See docs/migrating_from_tfmot.md.
- `tfopt.compat.from_tfmot(model_or_path)`: a tf_keras model pruned (or, if
  Sequential, quantized) with tfmot, as the equivalent tfopt Keras 3 model.
"""

from tfopt.compat import tfmot
from tfopt.compat.convert import from_tfmot

__all__ = ["tfmot", "from_tfmot"]
