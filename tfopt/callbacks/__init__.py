"""Callbacks: prune any model during `fit`, log sparsity."""

from tfopt.callbacks.pruning import Pruning

__all__ = ["Pruning"]
