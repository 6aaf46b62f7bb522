"""Whole-model transforms of Sequential and Functional models.

- `prune` (`transforms/prune.py`): swap in the tfopt twins that prune;
- `strip` (`transforms/strip.py`): back to plain Keras layers;
- `shrink` (`transforms/shrink.py`): remove channels, heads and units;
- `reestimate_batch_norm` (`transforms/batch_norm.py`): BatchNormalization
  statistics recomputed for the weights the model has now;
- `quantize_model` (`transforms/quantize.py`): plan, then rewrite, a
  quantization-aware copy;
- `quantize_weights` (`transforms/weight_quantization.py`): int4/int8 weight-only
  quantization-aware training, in place (keras-hub models included).
"""

from tfopt.transforms.batch_norm import reestimate_batch_norm
from tfopt.transforms.prune import prune
from tfopt.transforms.quantize import quantize_model
from tfopt.transforms.weight_quantization import quantize_weights
from tfopt.transforms.shrink import ShrinkPlan, plan_shrink, shrink
from tfopt.transforms.strip import load_model, strip

__all__ = ["prune", "strip", "load_model", "quantize_model", "quantize_weights", "shrink", "plan_shrink", "ShrinkPlan", "reestimate_batch_norm"]
