"""tfopt: pruning, quantization-aware training and distillation for Keras 3."""

__version__ = "0.1.0"

from tfopt import callbacks, layers, schedules, sparsity  # noqa: E402
