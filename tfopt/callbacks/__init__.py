"""Callbacks: prune any model during `fit` (weights, or whole channels with `WidthPruning`), schedule quantization, drive distillation schedules, write TensorBoard summaries."""

from tfopt.callbacks.distillation import DistillationSchedule
from tfopt.callbacks.pruning import Pruning
from tfopt.callbacks.quantization import QuantizationSchedule
from tfopt.callbacks.summaries import TensorBoardSummaries
from tfopt.callbacks.width_pruning import WidthPruning

__all__ = ["Pruning", "WidthPruning", "QuantizationSchedule", "TensorBoardSummaries", "DistillationSchedule"]
