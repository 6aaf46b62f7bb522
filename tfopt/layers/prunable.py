"""`Prunable`: the mixin that turns a Keras layer into its tfopt twin."""

import inspect

import keras

from tfopt import pruning

__all__ = ["Prunable"]


class _CountingStore:
    """Wraps a weights store to count what the parent layer writes into it."""

    def __init__(self, store):
        self._store = store
        self.count = 0

    def __setitem__(self, key, value):
        self._store[key] = value
        self.count += 1

    def __getitem__(self, key):
        return self._store[key]

    def keys(self):
        return self._store.keys()


class Prunable:
    """Mixin for drop-in Keras layers that prune their main weight during `fit`.

    Put it before the Keras class: `class Dense(Prunable, keras.layers.Dense)`.
    It adds two keyword arguments and, when a schedule is given, two
    non-trainable weights after the parent's: `<weight>_mask` (the 0/1 mask,
    in the weight's variable dtype) and `pruning_step` (int64, the number of
    optimizer updates this layer has seen). The mask is updated in-graph by the
    weight's constraint (see `tfopt.pruning`), so no callback is needed unless
    the schedule is given in percentages of training.

    Args:
        pruning_schedule: a `tfopt.schedules.SparsitySchedule`, a preset name
            (`"baseline"`, ...) or None (no pruning: the layer is exactly its
            Keras namesake).
        structure: `None`/"unstructured", "N:M" (e.g. "2:4"), a block shape
            `(rows, cols)`, or "channel". See `tfopt.sparsity`.
    """

    def __init__(self, *args, pruning_schedule=None, structure=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.pruning_schedule = pruning.get_schedule(pruning_schedule)
        if structure is not None and self.pruning_schedule is None:
            raise ValueError(
                f"Layer '{self.name}' ({type(self).__name__}) got structure={structure!r} "
                "but no `pruning_schedule`, so it would never prune. Pass "
                "`pruning_schedule=` too (for example 'baseline')."
            )
        self.structure = pruning.get_structure(structure) if self.pruning_schedule else None
        self._resolved_schedule = None

    # --- schedule -------------------------------------------------------------------
    def resolve_pruning_schedule(self, total_steps):
        """Fixes percentages in the schedule to steps of a `total_steps` run."""
        if self.pruning_schedule is not None:
            self._resolved_schedule = pruning.resolve_schedule(self.pruning_schedule, total_steps)

    def _active_schedule(self):
        if self._resolved_schedule is not None:
            return self._resolved_schedule
        if self.pruning_schedule.is_relative:
            raise ValueError(
                f"Layer '{self.name}' ({type(self).__name__}) has a pruning schedule in "
                f"percentages of training ({self.pruning_schedule!r}), but nothing told it "
                "how long training is. Add `tfopt.callbacks.Pruning()` to "
                "`model.fit(..., callbacks=[...])`, or give the schedule's steps as ints."
            )
        return self.pruning_schedule

    # --- state ----------------------------------------------------------------------
    def build(self, input_shape=None):
        super().build(input_shape)
        if self.pruning_schedule is None:
            return
        attr, in_axis, out_axis = pruning.weight_spec(self)
        weight = getattr(self, attr)
        self.structure.validate(
            weight.shape, in_axis, out_axis, f"Layer '{self.name}' ({type(self).__name__}) weight '{attr}'"
        )
        mask = self.add_weight(
            name=f"{attr}_mask",
            shape=weight.shape,
            initializer="ones",
            trainable=False,
            aggregation="only_first_replica",
        )
        self.pruning_step = self.add_weight(
            name="pruning_step",
            shape=(),
            dtype="int64",
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",
        )
        setattr(self, f"{attr}_mask", mask)
        weight.constraint = pruning.make_constraint(
            mask,
            step_fn=lambda: self.pruning_step,
            schedule_fn=self._active_schedule,
            structure=self.structure,
            in_axis=in_axis,
            out_axis=out_axis,
            inner=weight.constraint,
            after=lambda: self.pruning_step.assign_add(1),
        )
        weight._tfopt_prune_info = {
            "mask": mask,
            "structure": self.structure,
            "schedule": self.pruning_schedule,
            "in_axis": in_axis,
            "out_axis": out_axis,
        }

    def _tfopt_state(self):
        if self.pruning_schedule is None or not self.built:
            return []
        attr = pruning.weight_spec(self)[0]
        return [getattr(self, f"{attr}_mask"), self.pruning_step]

    def save_own_variables(self, store):
        # Keras layers with their own `save_own_variables` write only their
        # parent state (kernel, bias, ...): append tfopt's after it.
        counting = _CountingStore(store)
        super().save_own_variables(counting)
        if _parent_saves_everything(type(self)):
            return
        for i, variable in enumerate(self._tfopt_state()):
            store[str(counting.count + i)] = variable

    def load_own_variables(self, store):
        super().load_own_variables(store)
        if _parent_saves_everything(type(self)):
            return
        state = self._tfopt_state()
        offset = len(store.keys()) - len(state)
        for i, variable in enumerate(state):
            variable.assign(store[str(offset + i)])

    def get_config(self):
        config = super().get_config()
        config["pruning_schedule"] = (
            None if self.pruning_schedule is None else keras.saving.serialize_keras_object(self.pruning_schedule)
        )
        config["structure"] = (
            None if self.structure is None else keras.saving.serialize_keras_object(self.structure)
        )
        return config


def _parent_saves_everything(cls):
    """True when the Keras parent uses `Layer.save_own_variables` (all variables in order)."""
    for klass in cls.__mro__:
        if klass is Prunable or not issubclass(klass, keras.layers.Layer) or issubclass(klass, Prunable):
            continue
        if "save_own_variables" in vars(klass):
            return klass is keras.layers.Layer
    return True


def with_keras_signature(cls):
    """Gives `cls` the signature of its Keras parent plus tfopt's keyword arguments."""
    base = next(k for k in cls.__mro__[1:] if not issubclass(k, Prunable) and issubclass(k, keras.layers.Layer))
    params = list(inspect.signature(base.__init__).parameters.values())
    var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    params = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    extra = [
        inspect.Parameter("pruning_schedule", inspect.Parameter.KEYWORD_ONLY, default=None),
        inspect.Parameter("structure", inspect.Parameter.KEYWORD_ONLY, default=None),
    ]

    def __init__(self, *args, **kwargs):
        Prunable.__init__(self, *args, **kwargs)

    __init__.__signature__ = inspect.Signature(params + extra + var_kw)
    __init__.__doc__ = Prunable.__init__.__doc__
    cls.__init__ = __init__
    cls.keras_class = base
    return cls
