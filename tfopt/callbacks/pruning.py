"""`Pruning`: prunes any Keras 3 model during `fit`, subclassed models included."""

import keras
import numpy as np
from keras import ops

from tfopt import _backend, _keras_internal, _state, pruning, strategies
from tfopt import sparsity as sparsity_lib
from tfopt.callbacks import _common
from tfopt.layers.base import Prunable
from tfopt.reporting import overall_sparsity

__all__ = ["Pruning"]

class Pruning(keras.callbacks.Callback):
    """Prunes a model during `fit` without rewriting it.

    Works on Sequential, Functional and subclassed models, and on custom
    layers with a `kernel` (or a `prunable_weights()` method). The masks are
    Keras variables and the step is the optimizer's `iterations`; the mask
    update runs inside the train step, through the weight constraints that
    Keras optimizers apply after every update. So the result is the same with
    `steps_per_execution > 1` and with `jit_compile=True`, and the saved
    weights are sparse at every step.

    It also resolves schedules given in percentages of training (from `fit`'s
    `epochs` and steps per epoch) for `tfopt.layers` (the length of the
    running `fit` is a variable read in-graph: a new `fit` of another length
    needs no retrace), and writes the current
    overall sparsity to the epoch logs as `sparsity` (progress bar, History,
    CSVLogger and TensorBoard when they come after it in `callbacks`).

    Resuming: masks are kept off the layers, so when training resumes
    (`optimizer.iterations > 0`, as after `BackupAndRestore` or loading a
    `.keras` file with its optimizer), each mask is re-derived from the zeros
    already in the restored weights. On a fresh start (`iterations == 0`) masks
    start all ones. Layers of `tfopt.layers` with their own `pruning_schedule`
    keep it and their own saved masks; this callback leaves them alone.

    Args:
        pruning_schedule: a `tfopt.schedules.SparsitySchedule` or preset name
            for the layers this callback prunes, or None to only serve
            `tfopt.layers` (resolve their relative schedules, log sparsity).
        structure: see `tfopt.sparsity.get`: None, "2:4", (1, 4), "channel".
        layers: which layers to prune: None (every layer with a kernel), a
            name, a type, a predicate, or a list of those. A layer named here
            that has nothing to prune is an error. With `layers=None`, layers
            that the structure cannot apply to (an N:M group size that does not
            divide their input dimension) are skipped with a warning.
        log_sparsity: put `sparsity` into the epoch logs.

    Example:
    >>> import keras, numpy as np, tfopt
    >>> class MLP(keras.Model):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.hidden = keras.layers.Dense(32, activation="relu")
    ...         self.out = keras.layers.Dense(10)
    ...     def call(self, x):
    ...         return self.out(self.hidden(x))
    >>> model = MLP()
    >>> model.compile("adam", "mse")
    >>> schedule = tfopt.schedules.ConstantSparsity(0.75, begin_step=0, frequency=1)
    >>> history = model.fit(np.ones((8, 16)), np.ones((8, 10)), verbose=0,
    ...                     callbacks=[tfopt.callbacks.Pruning(schedule)])
    >>> round(history.history["sparsity"][-1], 2)
    0.75
    """

    def __init__(self, pruning_schedule=None, structure=None, layers=None, log_sparsity=True):
        super().__init__()
        self.pruning_schedule = pruning.get_schedule(pruning_schedule)
        self.structure = pruning.get_structure(structure, self.pruning_schedule, "Pruning callback")
        pruning.check_layers_arg(layers)
        self.layers = layers
        self.log_sparsity = log_sparsity
        self._length = None  # int64 variable: steps of the running fit
        self._masks = {}  # id(variable) -> (variable, mask, constraint)
        self._attach_pending = False

    # --- attach ---------------------------------------------------------------------
    def set_model(self, model):
        pruning.check_keras3(model)
        super().set_model(model)

    def on_train_begin(self, logs=None):
        strategies.check(self.model)
        self._resolve_all(_common.total_steps(self.params))
        self._attach_pending = self.pruning_schedule is not None

    def on_train_batch_begin(self, batch, logs=None):
        if not self._attach_pending:
            return
        self._attach_pending = False
        optimizer = self.model.optimizer
        if optimizer.built:
            # Weights (and a restored optimizer) are in place; retrace so that
            # the train step applies the new constraints.
            if self._attach():
                _common.retrace(self.model)
        else:
            # Subclassed models build their layers during the first trace, just
            # before the optimizer builds: attach then, every variable existing.
            original_build = optimizer.build

            def build(variables):
                original_build(variables)
                optimizer.build = original_build
                _backend.in_init_scope(self._attach)

            optimizer.build = build

    def _resolve_all(self, total):
        """Sets the length of this fit on every schedule in percentages (the
        callback's and the tfopt layers'): variables read in the train step."""
        relative = [(layer, f"Layer '{layer.name}'") for layer in _keras_internal.all_layers(self.model)
                    if isinstance(layer, Prunable) and layer.pruning_schedule is not None
                    and layer.pruning_schedule.is_relative]
        if self.pruning_schedule is not None and self.pruning_schedule.is_relative:
            relative.append((self, "tfopt.callbacks.Pruning"))
        if not relative:
            return
        if total is None:
            schedule = relative[0][0].pruning_schedule
            raise ValueError(
                f"{relative[0][1]} has a pruning schedule in percentages of training "
                f"({schedule!r}), but `fit` does not know how many steps an epoch has "
                "(an infinite or unsized dataset). Pass `steps_per_epoch=` to `fit`, or "
                "give the schedule's steps as ints."
            )
        created = False
        for owner, _ in relative:
            length = self._length if owner is self else _state.TRAINING_LENGTH.get(owner)
            if length is None:
                length = _common.state_variable(self.model, total, f"{getattr(owner, 'name', 'pruning')}_training_length")
                created = True
                if owner is self:
                    self._length = length
                else:
                    _state.TRAINING_LENGTH.set(owner, length)
            length.assign(total)
        if created:
            _common.retrace(self.model)  # a layer that raised while tracing can trace now

    def _targets(self):
        candidates = [
            layer
            for layer in _keras_internal.all_layers(self.model)
            if not isinstance(layer, keras.Model)
            and not (isinstance(layer, Prunable) and layer.pruning_schedule is not None)
        ]
        targets = pruning.select_targets(candidates, self.layers, self.structure, "tfopt.callbacks.Pruning")[0]
        # Weights a tfopt layer prunes itself (an LSTM twin's cell) stay its own.
        return [(layer, pw) for layer, pw in targets
                if getattr(pruning.record_of(pw.variable), "owner", self) is self]

    def _attach(self):
        """Creates masks and wraps constraints; returns True if anything was attached."""
        optimizer = self.model.optimizer
        resuming = int(ops.convert_to_numpy(optimizer.iterations)) > 0
        attached = False
        for layer, pw in self._targets():
            variable = pw.variable
            known = self._masks.get(id(variable))
            if known is not None and variable.constraint is known[2]:
                continue
            value = ops.convert_to_numpy(variable)
            sparsity_lib.validate_finite(value, f"Layer '{layer.name}' weight '{variable.name}'")
            initial = (value != 0).astype(value.dtype) if resuming else np.ones_like(value)
            with _backend.strategy_scope(self.model):
                mask = keras.Variable(
                    initial,
                    trainable=False,
                    name=f"{variable.name}_mask",
                    aggregation="only_first_replica",
                )
            constraint = pruning.make_constraint(
                mask,
                step_fn=lambda: optimizer.iterations,
                schedule=self.pruning_schedule,
                structure=self.structure,
                in_axis=pw.in_axis,
                out_axis=pw.out_axis,
                inner=pruning.inner_constraint(variable),
                length_fn=lambda: self._length,
            )
            variable.constraint = constraint
            pruning.attach(variable, _state.PruneRecord(mask, self.structure, self.pruning_schedule,
                                                        pw.in_axis, pw.out_axis, owner=self))
            self._masks[id(variable)] = (variable, mask, constraint)
            attached = True
        return attached

    # --- report ---------------------------------------------------------------------
    def on_epoch_end(self, epoch, logs=None):
        if self.log_sparsity and logs is not None:
            value = overall_sparsity(self.model)
            if value is not None:
                logs["sparsity"] = value
