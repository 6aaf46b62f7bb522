"""Callbacks: prune any model during `fit`, log sparsity, schedule quantization."""

from tfopt.callbacks.pruning import Pruning
from tfopt.callbacks.quantization import QuantizationSchedule

__all__ = ["Pruning", "QuantizationSchedule"]
