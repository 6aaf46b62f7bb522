"""`Pruning`: prunes any Keras 3 model during `fit`, subclassed models included."""

import warnings

import keras
import numpy as np
from keras import ops

from tfopt import _backend, _keras_internal, _state, pruning, strategies
from tfopt import sparsity as sparsity_lib
from tfopt.callbacks import _common
from tfopt.layers.base import Prunable
from tfopt._arguments import python_number
from tfopt.reporting import overall_sparsity, prunable_values

__all__ = ["Pruning"]

class Pruning(keras.callbacks.Callback):
    """Prunes a model during `fit` without rewriting it.

    Works on Sequential, Functional and subclassed models, and on custom
    layers with a `kernel`, a `prunable_weights()` method, or a
    `tfopt.geometry.register` entry (a custom layer whose weights tfopt cannot
    see is named in a warning). The masks are
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

    Several `fit` calls: percentages resolve against the running `fit`'s
    length, so a ramp meant to span several `fit(epochs=1)` calls needs
    `total_steps=` (it warns when a later `fit` resolves them again). The
    masks live in this callback: keep it in every `fit` until the schedule
    ends (it warns when a `fit` ends before), since training without it lets
    pruned weights grow back after a `.keras` reload; `tfopt.strip` bakes the
    masks for good. Weights that turn NaN/Inf stop their mask from updating:
    a warning names them (and `sparsity` in the logs shows the shortfall).
    Only one Pruning callback per `fit`.

    Under the JAX backend, whose train step is a pure function of the model's
    and the optimizer's state, the masks this callback makes are optimizer
    variables, and it lends tfopt layers with their own schedule optimizer
    variables for their masks and steps during `fit`, copied back to the
    layers at the end of each epoch (put it before a `ModelCheckpoint`):
    tfopt layers with a schedule need this callback in `fit` there. The
    optimizer saves only its own variables (as under TensorFlow), so a
    `.keras` file loads with its `iterations` and slots, and training goes on
    with masks re-derived from the saved zeros. Other Keras backends (torch,
    numpy): attaching the callback raises a ValueError naming the backend.

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
        total_steps: the number of training steps percentages in schedules
            refer to, when training spans several `fit` calls (default: the
            running `fit`'s epochs x steps per epoch).

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

    def __init__(self, pruning_schedule=None, structure=None, layers=None, log_sparsity=True, total_steps=None):
        super().__init__()
        total_steps = python_number(total_steps)
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):
            raise ValueError(
                "Pruning callback: `total_steps` must be a positive int (the training steps that "
                f"percentages in schedules refer to), or None. Received: total_steps={total_steps!r}"
            )
        self.total_steps = total_steps
        self.pruning_schedule = pruning.get_schedule(pruning_schedule)
        self.structure = pruning.get_structure(structure, self.pruning_schedule, "Pruning callback")
        pruning.check_layers_arg(layers)
        self.layers = layers
        self.log_sparsity = log_sparsity
        self._length = None  # integer variable: steps of the running fit
        self._masks = {}  # id(variable) -> (variable, mask, constraint)
        self._attach_pending = False
        # Under JAX, the optimizer-owned copies of the masks and steps of tfopt layers with their own
        # schedule, for the running fit: id(weight) -> [weight, layer, own record, own constraint,
        # copy of the mask]; id(layer) -> (layer, copy of its pruning step).
        self._lent = {}
        self._lent_steps = {}

    # --- attach ---------------------------------------------------------------------
    def set_model(self, model):
        pruning.check_backend(f"tfopt.callbacks.{type(self).__name__}")
        pruning.check_keras3(model)
        super().set_model(model)

    def on_train_begin(self, logs=None):
        strategies.check(self.model)
        other = _state.PRUNING_CALLBACKS.get(self.model)
        if other is not None and other is not self and other.params is self.params:
            raise ValueError(
                f"Two tfopt.callbacks.Pruning callbacks in one `fit` of model '{self.model.name}': the "
                "second would override the first's masks. Use one callback; to prune layers with "
                "different schedules, give those layers tfopt layers with their own `pruning_schedule`."
            )
        _state.PRUNING_CALLBACKS.set(self.model, self)
        if self.pruning_schedule is None and not any(
                isinstance(layer, Prunable) and layer.pruning_schedule is not None
                for layer in _keras_internal.all_layers(self.model)):
            raise ValueError(
                f"tfopt.callbacks.Pruning() without a `pruning_schedule` only serves tfopt layers that "
                f"have their own, and model '{self.model.name}' has none, so nothing would be pruned. "
                "Fix: pass a schedule, e.g. Pruning('baseline')."
            )
        self._resolve_all(self.total_steps or _common.total_steps(self.params))
        self._lend_layer_state()
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

    def _lend_layer_state(self):
        """Under JAX, gives each tfopt layer with its own pruning schedule optimizer-owned
        copies of its masks and step for this `fit`: its weights' constraints write them in
        the optimizer's update, and JAX's stateless step carries the optimizer's state there,
        not the model's. `_return_layer_state` copies them back to the layer's own weights
        (the ones saved). A no-op on TensorFlow, where the layer's own weights are written."""
        if not _backend.stateless_steps():
            return
        optimizer = self.model.optimizer
        by_layer = {}
        for variable in self.model.trainable_variables:
            lent = self._lent.get(id(variable))
            record = lent[2] if lent is not None else pruning.record_of(variable)
            if record is not None and isinstance(record.owner, Prunable):
                by_layer.setdefault(id(record.owner), (record.owner, []))[1].append((variable, record))
        for layer, weights in by_layer.values():
            if id(layer) in self._lent_steps:
                step = self._lent_steps[id(layer)][1]
                step.assign(ops.copy(layer.pruning_step))  # a buffer of its own (JAX donates both)
            else:
                step = _common.carried_variable(optimizer, layer.pruning_step,
                                                   f"{layer.name}_pruning_step", _backend.int_dtype())
                self._lent_steps[id(layer)] = (layer, step)
            # As the layer does: the constraint of its last pruned weight counts the step.
            order = {id(v): i for i, v in enumerate(layer.trainable_weights)}
            last = max(weights, key=lambda pair: order.get(id(pair[0]), -1))[0]
            for variable, record in weights:
                lent = self._lent.get(id(variable))
                if lent is None:
                    copy = _common.carried_variable(optimizer, record.mask,
                                                       f"{layer.name}_{record.mask.name}", record.mask.dtype)
                    self._lent[id(variable)] = [variable, layer, record, variable.constraint, copy]
                else:
                    copy = lent[4]
                    copy.assign(ops.copy(record.mask))
                pruning.attach(
                    variable, copy, record.schedule, record.structure, record.in_axis, record.out_axis,
                    step_fn=lambda step=step: step, owner=layer,
                    length_fn=lambda layer=layer: _state.TRAINING_LENGTH.get(layer),
                    after=(lambda step=step: step.assign_add(1)) if variable is last else None, carried=True,
                )
        if by_layer:
            _common.retrace(self.model)  # a train step traced before has the layers' own constraints

    def _return_layer_state(self, restore):
        """Copies what `_lend_layer_state` lent back to the layers' own masks and steps
        (after JAX's fit wrote the step's state back to the variables, at the end of each
        epoch); with `restore`, the layers' own constraints prune their weights again."""
        for variable, _, record, constraint, copy in self._lent.values():
            record.mask.assign(ops.copy(copy))  # a buffer of its own: JAX donates both variables
            if restore:
                variable.constraint = constraint
                _state.PRUNED.set(variable, record)
        for layer, step in self._lent_steps.values():
            layer.pruning_step.assign(ops.copy(step))
        if restore and self._lent:
            _common.retrace(self.model)  # the next fit's step has the layers' own constraints

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
        done = int(ops.convert_to_numpy(self.model.optimizer.iterations))
        if self.total_steps is None and total is not None and done >= total:
            warnings.warn(
                f"tfopt.callbacks.Pruning: the schedule in percentages resolves against this fit's "
                f"{total} steps, but the optimizer has already done {done}: the ramp is not spread over "
                "your several fit calls. Fix: pass Pruning(total_steps=<steps of all your fits>).",
                stacklevel=2)
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
                name = f"{getattr(owner, 'name', 'pruning')}_training_length"
                if _backend.stateless_steps():  # read by constraints: optimizer state under JAX
                    length = _common.carried_variable(self.model.optimizer, total, name, _backend.int_dtype())
                else:
                    length = _common.state_variable(self.model, total, name)
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
        targets = [(layer, pw) for layer, pw in targets
                   if not isinstance(getattr(pruning.record_of(pw.variable), "owner", None), Prunable)]
        if self.layers is None:
            unseen = pruning.unknown_weight_layers(candidates)
            if unseen:
                warnings.warn(
                    f"tfopt.callbacks.Pruning: layers {unseen} have weights tfopt does not know how to "
                    "prune (no `kernel`, no `tfopt.geometry` entry); they stay dense. Fix: "
                    "tfopt.geometry.register(YourLayer, [tfopt.geometry.WeightSpec('w', in_axis=0, "
                    "out_axis=1)]), or a `prunable_weights()` method on the layer.", stacklevel=2)
        if not targets and not any(isinstance(layer, Prunable) and layer.pruning_schedule is not None
                                   for layer in _keras_internal.all_layers(self.model)):
            raise ValueError(
                f"tfopt.callbacks.Pruning: model '{self.model.name}' has no weight tfopt can prune "
                f"(layers selected: {self.layers!r}). tfopt prunes layers with a `kernel` (Dense, Conv*, "
                "...), `embeddings`, recurrent kernels, and layers registered with "
                "`tfopt.geometry.register`. Fix: register your layer type, or remove the callback."
            )
        return targets

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
            where = f"Layer '{layer.name}' weight '{variable.name}'"
            sparsity_lib.validate_finite(value, where)
            self.structure.check_target(self.pruning_schedule.final_sparsity, value.shape, pw.in_axis,
                                        pw.out_axis, where)
            initial = (value != 0).astype(value.dtype) if resuming else np.ones_like(value)
            mask = self._variable(initial, f"{variable.name}_mask")
            constraint = pruning.attach(
                variable, mask, self.pruning_schedule, self.structure, pw.in_axis, pw.out_axis,
                step_fn=lambda: optimizer.iterations, owner=self, length_fn=lambda: self._length, carried=True,
            )
            self._masks[id(variable)] = (variable, mask, constraint)
            attached = True
        return attached

    def _variable(self, value, name):
        """A replica-local state variable (a mask) under the model's strategy: every replica
        computes the same value from the same synchronized weights and writes its own copy.
        Under JAX, an optimizer-owned variable: the state the stateless step carries."""
        dtype = keras.backend.standardize_dtype(value.dtype)
        if _backend.stateless_steps():
            return _common.carried_variable(self.model.optimizer, value, name, dtype)
        with _backend.strategy_scope(self.model):
            return _keras_internal.replica_local_variable(value, name, dtype=dtype)

    # --- report ---------------------------------------------------------------------
    def on_epoch_end(self, epoch, logs=None):
        self._return_layer_state(restore=False)
        broken = [f"{layer.name}/{pw.variable.name}" for layer, pw, value in prunable_values(self.model, True)
                  if not np.all(np.isfinite(value))]
        if broken:
            warnings.warn(
                f"tfopt.callbacks.Pruning: weights {broken} hold NaN/Inf, so their masks stopped updating "
                f"(overall sparsity now {overall_sparsity(self.model):.2f}, see `sparsity` in the logs). "
                "Training diverged: lower the learning rate, or restore a checkpoint from before.",
                stacklevel=2)
        if self.log_sparsity and logs is not None:
            value = overall_sparsity(self.model)
            if value is not None:
                logs["sparsity"] = value

    def on_train_end(self, logs=None):
        self._return_layer_state(restore=True)
        schedule = self.pruning_schedule
        if schedule is None or not self._masks:
            return
        self._check_masks_hold()
        total = self.total_steps or _common.total_steps(self.params)
        end = schedule.resolve(total).end_step if schedule.is_relative and total else schedule.end_step
        done = int(ops.convert_to_numpy(self.model.optimizer.iterations))
        if isinstance(end, int) and end >= 0 and done < end:
            warnings.warn(
                f"tfopt.callbacks.Pruning: `fit` ended at step {done}, before the schedule's end_step "
                f"{end}; the model is {overall_sparsity(self.model) or 0.0:.2f} sparse, not "
                f"{schedule.final_sparsity}. Keep this callback in the next fit (it goes on from here), "
                "or make the schedule end within training. Training without it lets pruned weights "
                "grow back after a reload.", stacklevel=2)

    def _check_masks_hold(self):
        """Warns when weights are non-zero where their masks are zero: another
        callback set earlier weights after the last step (Keras's
        `EarlyStopping(restore_best_weights=True)` does, in its `on_train_end`,
        when it comes before this callback in the list)."""
        revived, pruned = 0, 0
        for variable, mask, _ in self._masks.values():
            off = ops.convert_to_numpy(mask) == 0
            pruned += int(off.sum())
            revived += int(np.count_nonzero(ops.convert_to_numpy(variable)[off]))
        if revived:
            warnings.warn(
                f"tfopt.callbacks.Pruning: at the end of `fit`, {revived} of the {pruned} pruned weights of "
                f"model '{self.model.name}' are not zero (overall sparsity {overall_sparsity(self.model) or 0.0:.2f}): "
                "a callback set earlier weights after the last step, as "
                "`keras.callbacks.EarlyStopping(restore_best_weights=True)` does. Those weights come from a "
                "less sparse epoch. Fix: `restore_best_weights=False`, or `tfopt.strip(model)` to apply the "
                "final masks to the restored weights, then re-evaluate (`tfopt.reestimate_batch_norm` "
                "refreshes BatchNormalization statistics after that).", stacklevel=2)

