"""Callbacks: prune any model during `fit`, schedule quantization, write TensorBoard summaries."""

from tfopt.callbacks.pruning import Pruning
from tfopt.callbacks.quantization import QuantizationSchedule
from tfopt.callbacks.summaries import TensorBoardSummaries

__all__ = ["Pruning", "QuantizationSchedule", "TensorBoardSummaries"]
