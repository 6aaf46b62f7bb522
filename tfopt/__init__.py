"""tfopt: pruning, quantization-aware training and distillation for Keras 3.

Public API:

- `tfopt.layers`: drop-in Keras layers that prune during `fit`.
- `tfopt.schedules`, `tfopt.sparsity`: when to prune, and what shape the zeros take.
- `tfopt.callbacks.Pruning`: prune any model, subclassed included, during `fit`.
- `tfopt.prune(model, schedule)`: a pruning copy of a Sequential/Functional model.
- `tfopt.strip(model)`: a plain Keras model with the masks baked in.
- `tfopt.shrink(model, fraction)`: a smaller dense model, channels/heads/units removed
  (`tfopt.plan_shrink` says which first).
- `tfopt.summary(model)`: per-layer sparsity table, printed and returned.
- `tfopt.export(model, path)`: LiteRT file, checked in the interpreter, with sizes.
- `tfopt.export_generator(causal_lm, path)`: a keras-hub causal LM as one LiteRT file with
  prefill/decode signatures and a key-value cache (`tfopt.litert.Generator` runs it).
- `tfopt.quantize_model(model)`, `tfopt.quantizers`, `tfopt.callbacks.QuantizationSchedule`:
  quantization-aware training to a full-integer LiteRT model.
- `tfopt.quantize_weights(model, "int4_block32")`: int4/int8 weight-only QAT in place
  (keras-hub LMs included) for the weight-quantized LiteRT precisions.
- `tfopt.distillation`: teacher-student distillation, cached (`attach_teacher` +
  `DistillationLoss`) or online (`Distiller`).
- `tfopt.plot_sparsity(model, path)`, `tfopt.plot_accuracy_vs_size(rows, path)`: PNG plots.
- `tfopt.compat.tfmot`, `tfopt.compat.from_tfmot`: tfmot's names on Keras 3, and tfmot models converted.
- `tfopt.strategies`: `auto()`, `Mirrored`, `TPU`, `MultiWorker` and their helpers.
- `tfopt.geometry`: which weights of each Keras layer type tfopt optimizes, along
  which axes; `tfopt.geometry.register` adds your own layer type.
"""

__version__ = "0.1.0"

from tfopt import _logs  # noqa: E402  (imports nothing heavy)

if _logs.is_cli():  # `python -m tfopt`: quiet TensorFlow before it loads (see tfopt/_logs.py)
    _logs.quiet_logs()

from tfopt import (  # noqa: E402
    callbacks, compat, distillation, geometry, layers, quantizers, schedules, sparsity, strategies,
)
from tfopt.exporting import ExportReport, export  # noqa: E402
from tfopt._export.generation import GeneratorReport, export_generator  # noqa: E402
from tfopt.plots import plot_accuracy_vs_size, plot_sparsity  # noqa: E402
from tfopt.reporting import summary  # noqa: E402
from tfopt.transforms import (  # noqa: E402
    ShrinkPlan, load_model, plan_shrink, prune, quantize_model, quantize_weights, reestimate_batch_norm, shrink, strip,
)

__all__ = [
    "callbacks",
    "distillation",
    "geometry",
    "layers",
    "quantizers",
    "schedules",
    "sparsity",
    "strategies",
    "compat",
    "prune",
    "strip",
    "shrink",
    "plan_shrink",
    "ShrinkPlan",
    "load_model",
    "quantize_model",
    "quantize_weights",
    "reestimate_batch_norm",
    "summary",
    "export",
    "ExportReport",
    "export_generator",
    "GeneratorReport",
    "plot_sparsity",
    "plot_accuracy_vs_size",
]
