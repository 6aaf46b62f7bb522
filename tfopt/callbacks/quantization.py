"""`QuantizationSchedule`: when fake quantization starts, and when ranges and
folded BatchNormalization statistics stop moving."""

import numbers

import keras
import numpy as np
from keras import ops

from tfopt import _backend, _keras_internal, _state, strategies
from tfopt._arguments import python_number
from tfopt.callbacks import _common
from tfopt.layers.quantize_activation import QuantizingLayer

__all__ = ["QuantizationSchedule"]


def _check_point(name, value, allow_none):
    if value is None and allow_none:
        return
    ok = (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and (value >= 0 if isinstance(value, numbers.Integral) else 0.0 <= value <= 1.0)
    )
    if not ok:
        raise ValueError(
            f"QuantizationSchedule: `{name}` must be a step count (an int >= 0) or a fraction "
            f"of training (a float in [0, 1]){' or None' if allow_none else ''}. "
            f"Received: {name}={value!r}"
        )


class QuantizationSchedule(keras.callbacks.Callback):
    """Delays fake quantization and freezes ranges and BatchNorm statistics, in-graph.

    Quantization-aware layers (`quantization_aware=` on `tfopt.layers`,
    `QuantizeActivation`, and everything `tfopt.quantize_model` makes) count
    their training steps in a saved variable. This callback tells them, at the
    start of each `fit`, from which step to fake-quantize (before it they train
    in float, while their activation ranges are already tracked), and from which
    step to stop updating their activation ranges and the statistics of folded
    BatchNormalizations. The comparisons run inside the train step, so they
    are exact with `steps_per_execution > 1`, and training resumed from a
    `.keras` file or `BackupAndRestore` goes on from the saved step counts.

    Each point is a number of training steps (an int) or a fraction of this
    `fit`'s steps (a float in [0, 1], resolved from `epochs` and steps per
    epoch). A late start (e.g. `start=0.1`) lets a model trained from scratch
    settle in float first; freezing late (e.g. `freeze_batch_norm=0.8`,
    `freeze_ranges=0.9`) lets the last steps train against the exact ranges
    and scales that the int8 file will use. Without this callback,
    quantization is on from the first step and nothing freezes.

    The points are integer variables kept by tfopt for each layer and compared
    in-graph, so a new schedule in a later `fit` needs no retrace (the first
    one does, once, since it adds the comparisons to the graph; under JAX,
    whose train step reads only the model's and the optimizer's variables,
    a schedule with other points does too). A
    `tfopt.export` ignores the schedule (the converter needs every fake-quant
    op), so export after `start`.

    Args:
        start: the step from which weights and activations are fake-quantized.
        freeze_ranges: the step from which activation ranges stay fixed
            (None: never).
        freeze_batch_norm: the step from which folded BatchNormalization
            moving statistics stay fixed (None: never).

    Example:
    >>> import keras, numpy as np, tfopt
    >>> model = keras.Sequential([keras.Input((4,)), tfopt.layers.Dense(2, quantization_aware="int8")])
    >>> model.compile("sgd", "mse")
    >>> schedule = tfopt.callbacks.QuantizationSchedule(start=0, freeze_ranges=2)
    >>> _ = model.fit(np.ones((8, 4)), np.ones((8, 2)), batch_size=2, verbose=0, callbacks=[schedule])
    >>> int(model.layers[0].output_range_updates.numpy())  # 4 steps seen, range fixed after 2
    4
    """

    def __init__(self, start=0, freeze_ranges=None, freeze_batch_norm=None):
        super().__init__()
        start, freeze_ranges, freeze_batch_norm = map(python_number, (start, freeze_ranges, freeze_batch_norm))
        _check_point("start", start, allow_none=False)
        _check_point("freeze_ranges", freeze_ranges, allow_none=True)
        _check_point("freeze_batch_norm", freeze_batch_norm, allow_none=True)
        self.start = start
        self.freeze_ranges = freeze_ranges
        self.freeze_batch_norm = freeze_batch_norm

    def _resolve(self, name, value):
        if value is None or isinstance(value, numbers.Integral):
            return value
        total = _common.total_steps(self.params)
        if total is None:
            raise ValueError(
                f"QuantizationSchedule: `{name}={value!r}` is a fraction of training, but `fit` "
                "does not know how many steps an epoch has (an infinite or unsized dataset). "
                "Pass `steps_per_epoch=` to `fit`, or give the step as an int."
            )
        return int(round(value * total))

    def on_train_begin(self, logs=None):
        strategies.check(self.model)
        points = [self._resolve(n, getattr(self, n)) for n in ("start", "freeze_ranges", "freeze_batch_norm")]
        quantizing = [layer for layer in _keras_internal.all_layers(self.model)
                      if isinstance(layer, QuantizingLayer) and layer.is_quantizing()]
        if not quantizing:
            raise ValueError(
                f"QuantizationSchedule: model '{self.model.name}' has no quantization-aware layers, "
                "so there is nothing to schedule. Make it quantization-aware first, with "
                "`tfopt.quantize_model(model)` or `quantization_aware=` on tfopt layers."
            )
        # NEVER fits the step counters' integer type (int32 under JAX without x64).
        never = min(_state.QuantizationTimes.NEVER, int(np.iinfo(_backend.int_dtype()).max))
        values = [never if p is None else p for p in points]
        retrace = False
        for layer in quantizing:
            times = _state.QUANTIZATION_TIMES.get(layer)
            if times is None:
                times = _state.QuantizationTimes(*(
                    _common.state_variable(self.model, v, f"{layer.name}_{n}")
                    for v, n in zip(values, ("quantization_start", "freeze_ranges", "freeze_batch_norm"))))
                _state.QUANTIZATION_TIMES.set(layer, times)
                retrace = True  # the comparisons are new to the graph
            variables = (times.start, times.freeze_ranges, times.freeze_batch_norm)
            if _backend.stateless_steps() and [int(ops.convert_to_numpy(v)) for v in variables] != values:
                # JAX's step carries the model's and the optimizer's variables only: these are
                # read as constants when it is traced, so new values need a new trace.
                retrace = True
            for variable, value in zip(variables, values):
                variable.assign(value)
        if retrace:
            _common.retrace(self.model)
