"""Sparsity schedules: when to update pruning masks, and to what sparsity.

A schedule maps the training step to `(should_prune, sparsity)`, exactly like
tfmot's `PruningSchedule`. Each schedule is a pure function (usable on Python
ints and on tensors inside a traced train step) plus a thin serializable class
whose config is exactly the function's arguments.

Steps may be given relative to the length of training as strings such as
`"75%"`. They are resolved from `model.fit`'s `epochs` and `steps_per_epoch`
by `tfopt.callbacks.Pruning`, which must then be in the callback list: it
keeps the length of the running `fit` in a variable, and the schedule is
resolved against it inside the train step (`schedule(step, total_steps)`), so
a new `fit` of another length needs no retrace.
"""

import re

import keras
from keras import ops

from tfopt import _backend
from tfopt._keras2 import reject_keras2
from tfopt._arguments import Configurable, python_number

__all__ = [
    "SparsitySchedule",
    "ConstantSparsity",
    "PolynomialDecay",
    "constant_sparsity",
    "polynomial_decay",
    "PRESETS",
    "get",
]

_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def _in_range_and_turn(step, begin_step, end_step, frequency):
    """tfmot's update rule: every `frequency` steps from `begin_step` through
    `end_step` (forever when `end_step` is -1), plus `end_step` itself so that
    the final sparsity is always reached. Steps are compared in the backend's
    widest integer (int64, int32 under JAX without x64)."""
    dtype = _backend.int_dtype()
    step = ops.cast(step, dtype)
    begin_step = ops.cast(begin_step, dtype)
    open_end = isinstance(end_step, int) and end_step < 0
    in_range = ops.greater_equal(step, begin_step)
    if not open_end:
        in_range = ops.logical_and(in_range, ops.less_equal(step, end_step))
    turn = ops.equal(ops.mod(step - begin_step, ops.cast(frequency, dtype)), 0)
    if not open_end:
        turn = ops.logical_or(turn, ops.equal(step, end_step))
    return ops.logical_and(in_range, turn)


def constant_sparsity(step, target_sparsity, begin_step=0, end_step=-1, frequency=100):
    """Returns `(should_prune, sparsity)` for a constant target at `step`.

    Example:
    >>> should, s = constant_sparsity(200, 0.5, begin_step=0, frequency=100)
    >>> bool(should), round(float(s), 2)
    (True, 0.5)
    """
    should = _in_range_and_turn(step, begin_step, end_step, frequency)
    return should, ops.convert_to_tensor(target_sparsity, "float32")


def polynomial_decay(
    step, initial_sparsity, final_sparsity, begin_step, end_step, power=3, frequency=100
):
    """Returns `(should_prune, sparsity)` for tfmot's polynomial ramp.

    `sparsity = final + (initial - final) * (1 - progress) ** power`, where
    `progress` is the clipped fraction of `[begin_step, end_step]` done.

    Example:
    >>> _, s = polynomial_decay(50, 0.0, 0.8, begin_step=0, end_step=100, power=1)
    >>> round(float(s), 4)
    0.4
    """
    should = _in_range_and_turn(step, begin_step, end_step, frequency)
    begin = ops.cast(begin_step, "float32")
    progress = (ops.cast(step, "float32") - begin) / (ops.cast(end_step, "float32") - begin)
    progress = ops.clip(progress, 0.0, 1.0)
    sparsity = final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** power
    return should, ops.cast(sparsity, "float32")


def _check_sparsity(name, value, schedule):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"{schedule}: `{name}` must be a number in [0, 1). Received: {name}={value!r}"
        )
    if not 0.0 <= value < 1.0:
        raise ValueError(
            f"{schedule}: `{name}` must be in [0, 1) (1.0 would remove every weight). "
            f"Received: {name}={value!r}. Use for example {name}=0.8 for 80% sparsity."
        )


def _check_step(name, value, schedule, allow_minus_one=False):
    """Validates an absolute step (int) or a relative one ("NN%")."""
    if isinstance(value, str):
        match = _PERCENT.match(value)
        if not match or float(match.group(1)) > 100:
            raise ValueError(
                f"{schedule}: `{name}` given as a string must be a percentage of "
                f"training between '0%' and '100%'. Received: {name}={value!r}"
            )
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{schedule}: `{name}` must be an int step or a percentage string such "
            f"as '75%'. Received: {name}={value!r} of type {type(value).__name__}"
        )
    if value < 0 and not (allow_minus_one and value == -1):
        hint = " (or -1 for 'never stop')" if allow_minus_one else ""
        raise ValueError(f"{schedule}: `{name}` must be >= 0{hint}. Received: {name}={value}")


def _resolve(value, total_steps):
    """A percentage of `total_steps` (a Python int, or an int tensor in-graph) as a step."""
    if not isinstance(value, str):
        return value
    fraction = float(_PERCENT.match(value).group(1)) / 100.0
    if isinstance(total_steps, int):
        return int(round(fraction * total_steps))
    return ops.cast(ops.round(fraction * ops.cast(total_steps, "float32")), _backend.int_dtype())


def _resolve_config(config, step_args, total_steps):
    """`config` with percentages turned into steps of a `total_steps` run (at
    least one step between begin and end, a frequency of at least 1)."""
    config = dict(config)
    relative = {arg for arg in step_args if isinstance(config[arg], str)}
    for arg in step_args:
        config[arg] = _resolve(config[arg], total_steps)
    if isinstance(total_steps, int):
        config["frequency"] = max(1, config["frequency"])
        if config["end_step"] != -1 and config["end_step"] <= config["begin_step"]:
            config["end_step"] = config["begin_step"] + 1
        return config
    if "frequency" in relative:
        config["frequency"] = ops.maximum(config["frequency"], 1)
    if "end_step" in relative:
        config["end_step"] = ops.maximum(config["end_step"], ops.cast(config["begin_step"], _backend.int_dtype()) + 1)
    return config


def _steps_order(begin_step, end_step, schedule, allow_open_end):
    if isinstance(begin_step, str) != isinstance(end_step, str) and not (
        allow_open_end and end_step == -1
    ):
        raise ValueError(
            f"{schedule}: give `begin_step` and `end_step` both as steps or both as "
            f"percentages. Received: begin_step={begin_step!r}, end_step={end_step!r}"
        )
    if allow_open_end and end_step == -1:
        return
    if isinstance(begin_step, str):
        b, e = _resolve(begin_step, 10_000), _resolve(end_step, 10_000)
    else:
        b, e = begin_step, end_step
    if e < b or (not allow_open_end and e == b):
        raise ValueError(
            f"{schedule}: `begin_step` must come before `end_step`. Received: "
            f"begin_step={begin_step!r}, end_step={end_step!r}"
        )


class SparsitySchedule(Configurable):
    """Base class: `schedule(step) -> (should_prune, sparsity)`.

    Subclasses implement `__call__` and `get_config` (a flat dict of their
    constructor arguments) and may take steps as percentages of training,
    resolved by `resolve(total_steps)`.
    """

    _step_args = ("begin_step", "end_step", "frequency")
    _function = None  # the pure function of `(step, **get_config())`

    def __call__(self, step, total_steps=None):
        """`(should_prune, sparsity)` at `step`; `total_steps` (an int or an int
        tensor) resolves percentages, in-graph when it is a tensor."""
        config = self.get_config()
        if self.is_relative:
            if total_steps is None:
                self._check_resolved()
            config = _resolve_config(config, self._step_args, total_steps)
        return type(self)._function(step, **config)

    @property
    def is_relative(self):
        """True if some step is a percentage that still needs `resolve()`."""
        return any(isinstance(getattr(self, a), str) for a in self._step_args)

    def resolve(self, total_steps):
        """Returns a copy with percentages turned into steps of a `total_steps` run.

        Example:
        >>> PolynomialDecay(0.0, 0.8, "0%", "50%", frequency="10%").resolve(1000).end_step
        500
        """
        return type(self)(**_resolve_config(self.get_config(), self._step_args, int(total_steps)))

    def _check_resolved(self):
        if self.is_relative:
            raise ValueError(
                f"{type(self).__name__} has steps given as percentages of training "
                f"({self.get_config()}), but the length of training is unknown. Add "
                "`tfopt.callbacks.Pruning()` to `model.fit(callbacks=...)`; it resolves "
                "them from `epochs` and `steps_per_epoch`. Or give steps as ints."
            )

    @property
    def final_sparsity(self):
        raise NotImplementedError

    def get_config(self):
        raise NotImplementedError


@keras.saving.register_keras_serializable(package="tfopt")
class ConstantSparsity(SparsitySchedule):
    """Prunes to a constant sparsity every `frequency` steps.

    Same semantics as `tfmot.sparsity.keras.ConstantSparsity`.

    Args:
        target_sparsity: fraction of weights set to zero, in [0, 1).
        begin_step: first step at which masks are updated (int, or "NN%" of
            training).
        end_step: last step at which masks are updated; -1 means never stop.
        frequency: masks are updated every `frequency` steps from `begin_step`.

    Example:
    >>> schedule = ConstantSparsity(0.5, begin_step=0, frequency=100)
    >>> should, sparsity = schedule(100)
    >>> bool(should), float(sparsity)
    (True, 0.5)
    """

    def __init__(self, target_sparsity, begin_step=0, end_step=-1, frequency=100):
        name = "ConstantSparsity"
        target_sparsity, begin_step, end_step, frequency = map(
            python_number, (target_sparsity, begin_step, end_step, frequency))
        _check_sparsity("target_sparsity", target_sparsity, name)
        _check_step("begin_step", begin_step, name)
        _check_step("end_step", end_step, name, allow_minus_one=True)
        _check_frequency(frequency, name)
        _steps_order(begin_step, end_step, name, allow_open_end=True)
        self.target_sparsity = target_sparsity
        self.begin_step = begin_step
        self.end_step = end_step
        self.frequency = frequency

    @property
    def final_sparsity(self):
        return self.target_sparsity

    _function = staticmethod(constant_sparsity)

    def get_config(self):
        return {
            "target_sparsity": self.target_sparsity,
            "begin_step": self.begin_step,
            "end_step": self.end_step,
            "frequency": self.frequency,
        }


@keras.saving.register_keras_serializable(package="tfopt")
class PolynomialDecay(SparsitySchedule):
    """Ramps sparsity from `initial_sparsity` to `final_sparsity` polynomially.

    Same semantics as `tfmot.sparsity.keras.PolynomialDecay` (Zhu & Gupta,
    "To prune, or not to prune", 2017), with one fix: masks are also updated at
    `end_step` itself, so `final_sparsity` is reached even when
    `end_step - begin_step` is not a multiple of `frequency`.

    Args:
        initial_sparsity: sparsity at `begin_step`, in [0, 1).
        final_sparsity: sparsity from `end_step` on, in [initial_sparsity, 1)
            (pruned weights never come back, so sparsity only rises).
        begin_step: first update step (int, or "NN%" of training).
        end_step: last update step (int, or "NN%" of training).
        power: exponent of the ramp; 3 prunes fast early and slowly late.
        frequency: steps between mask updates (int, or "NN%" of training).

    Example:
    >>> schedule = PolynomialDecay(0.0, 0.8, begin_step=0, end_step=1000)
    >>> round(float(schedule(1000)[1]), 2)
    0.8
    >>> relative = PolynomialDecay(0.0, 0.8, begin_step="0%", end_step="70%")
    >>> relative.resolve(total_steps=2000).end_step
    1400
    """

    def __init__(
        self, initial_sparsity, final_sparsity, begin_step, end_step, power=3, frequency=100
    ):
        name = "PolynomialDecay"
        initial_sparsity, final_sparsity, begin_step, end_step, power, frequency = map(
            python_number, (initial_sparsity, final_sparsity, begin_step, end_step, power, frequency))
        _check_sparsity("initial_sparsity", initial_sparsity, name)
        _check_sparsity("final_sparsity", final_sparsity, name)
        _check_step("begin_step", begin_step, name)
        _check_step("end_step", end_step, name)
        _check_frequency(frequency, name)
        _steps_order(begin_step, end_step, name, allow_open_end=False)
        if isinstance(power, bool) or not isinstance(power, (int, float)) or power <= 0:
            raise ValueError(f"{name}: `power` must be a positive number. Received: power={power!r}")
        if final_sparsity < initial_sparsity:
            raise ValueError(
                f"{name}: `final_sparsity` must be at least `initial_sparsity`: pruned weights never "
                "come back, so a falling target would end above its final value. Received: "
                f"initial_sparsity={initial_sparsity!r}, final_sparsity={final_sparsity!r}. Fix: swap them, "
                "or use ConstantSparsity(final_sparsity) from a model that is not yet pruned.")
        self.initial_sparsity = initial_sparsity
        self.final_sparsity_ = final_sparsity
        self.begin_step = begin_step
        self.end_step = end_step
        self.power = power
        self.frequency = frequency

    @property
    def final_sparsity(self):
        return self.final_sparsity_

    _function = staticmethod(polynomial_decay)

    def get_config(self):
        return {
            "initial_sparsity": self.initial_sparsity,
            "final_sparsity": self.final_sparsity_,
            "begin_step": self.begin_step,
            "end_step": self.end_step,
            "power": self.power,
            "frequency": self.frequency,
        }


def _check_frequency(frequency, schedule):
    if isinstance(frequency, str):
        _check_step("frequency", frequency, schedule)
        if float(_PERCENT.match(frequency).group(1)) <= 0:
            raise ValueError(
                f"{schedule}: `frequency` must be positive. Received: frequency={frequency!r}"
            )
        return
    if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency <= 0:
        raise ValueError(
            f"{schedule}: `frequency` must be a positive int (steps between mask "
            f"updates) or a percentage such as '5%'. Received: frequency={frequency!r}"
        )


#: Named schedules accepted wherever a schedule is.
#:
#: - ``"baseline"``: ``ConstantSparsity(0.5, begin_step=0, frequency=100)``,
#:   the schedule of tfmot's pruning guide: 50% sparsity from the first step,
#:   masks refreshed every 100 steps. Absolute steps: works with no callback.
#: - ``"gradual"``: ``PolynomialDecay(0.0, 0.8, "0%", "75%", frequency="5%")``:
#:   80% sparsity reached at three quarters of training, then fine-tuned.
#:   Relative steps: needs `tfopt.callbacks.Pruning` in `fit`.
#: - ``"aggressive"``: ``PolynomialDecay(0.0, 0.9, "0%", "60%", frequency="5%")``.
PRESETS = {
    "baseline": lambda: ConstantSparsity(0.5, begin_step=0, frequency=100),
    "gradual": lambda: PolynomialDecay(0.0, 0.8, "0%", "75%", frequency="5%"),
    "aggressive": lambda: PolynomialDecay(0.0, 0.9, "0%", "60%", frequency="5%"),
}


def get(identifier):
    """Returns a schedule from a schedule, a preset name, a config dict or None.

    Example:
    >>> get("baseline")
    ConstantSparsity(target_sparsity=0.5, begin_step=0, end_step=-1, frequency=100)
    """
    if identifier is None or isinstance(identifier, SparsitySchedule):
        return identifier
    if isinstance(identifier, str):
        if identifier not in PRESETS:
            raise ValueError(
                f"Unknown pruning schedule preset: pruning_schedule={identifier!r}. "
                f"Expected one of {sorted(PRESETS)}, or a `tfopt.schedules` object such "
                "as `tfopt.schedules.PolynomialDecay(0.0, 0.8, '0%', '75%')`."
            )
        return PRESETS[identifier]()
    if isinstance(identifier, dict):
        obj = keras.saving.deserialize_keras_object(identifier)
        if isinstance(obj, SparsitySchedule):
            return obj
    reject_keras2(identifier, "pruning_schedule")
    raise TypeError(
        "`pruning_schedule` must be a `tfopt.schedules.SparsitySchedule`, a preset name "
        f"({sorted(PRESETS)}) or None. Received: pruning_schedule={identifier!r} of type "
        f"{type(identifier).__name__}"
    )
