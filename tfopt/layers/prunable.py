"""`Prunable`: the mixin that turns a Keras layer into its tfopt twin."""

import inspect

import keras

from keras import ops

from tfopt import pruning, quantizers
from tfopt.layers.quantize_activation import add_range_weights, track_and_quantize

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
        quantization_aware: None (off), True or "int8", "int4", "int2",
            "ternary", "binary", a `tfopt.quantizers.QuantSpec` for the weights,
            or a (weight spec, activation spec) pair. The weight is
            fake-quantized in the forward pass (straight-through gradient) and
            the output is fake-quantized to a range tracked during training
            (weights `output_range_min`, `output_range_max`,
            `output_range_updates`). Weights are quantized per output channel
            for convolutions whose output axis is last (Conv1D/2D/3D, and the
            pointwise kernel of SeparableConv), per tensor otherwise: per-channel
            Dense kernels make the TFLite converter fail ("mismatched quantized
            axes"), as tfmot's default scheme also avoids. Pruned zeros stay
            exactly zero under symmetric quantization, so sparsity survives QAT.
    """

    #: The keyword arguments tfopt adds to the Keras layer's.
    TFOPT_ARGUMENTS = ("pruning_schedule", "structure", "quantization_aware")

    def __init__(self, *args, pruning_schedule=None, structure=None, quantization_aware=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.quantization_aware = quantization_aware or None
        self._weight_spec, self._output_spec = (
            quantizers.get_precision(quantization_aware) if quantization_aware else (None, None)
        )
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
        if self._output_spec is not None:
            ranges = add_range_weights(self, prefix="output_")
            self.output_range_min, self.output_range_max, self.output_range_updates = ranges
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
        if not self.built:
            return []
        state = []
        if self._output_spec is not None:
            state += [self.output_range_min, self.output_range_max, self.output_range_updates]
        if self.pruning_schedule is not None:
            attr = pruning.weight_spec(self)[0]
            state += [getattr(self, f"{attr}_mask"), self.pruning_step]
        return state

    # --- quantization-aware forward pass ---------------------------------------------
    def _quantized_weights(self):
        """(attribute holding the variable, variable, fake-quantized tensor) for each
        weight the forward pass reads: the main weight, plus SeparableConv's depthwise one."""
        attr, _, out_axis = pruning.weight_spec(self)
        names = [attr] + (["depthwise_kernel"] if attr == "pointwise_kernel" else [])
        out = []
        for name in names:
            variable = getattr(self, name)
            holder = next(
                (a for a in (f"_{name}", name) if a in self.__dict__ and self.__dict__[a] is variable), None
            )
            per_channel = (
                self._weight_spec.per_channel
                and name != "depthwise_kernel"
                and out_axis == -1
                and not isinstance(self, (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Embedding))
            )
            spec = self._weight_spec
            if spec.per_channel and not per_channel:
                spec = quantizers.QuantSpec(**{**spec.get_config(), "per_channel": False})
            value = ops.cast(quantizers.quantize_weight(ops.convert_to_tensor(variable), spec, -1),
                             self.compute_dtype)
            out.append((holder, variable, value))
        return out

    def call(self, inputs, *args, training=None, **kwargs):
        if self._output_spec is None:
            return super().call(inputs, *args, **kwargs)
        swapped = self._quantized_weights() if self._weight_spec is not None else []
        try:
            for holder, _, value in swapped:
                object.__setattr__(self, holder, value)
            outputs = super().call(inputs, *args, **kwargs)
        finally:
            for holder, variable, _ in swapped:
                object.__setattr__(self, holder, variable)
        return track_and_quantize(
            outputs,
            (self.output_range_min, self.output_range_max, self.output_range_updates),
            self._output_spec,
            momentum=0.99,
            update=bool(training),
        )

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
        q = self.quantization_aware
        config["quantization_aware"] = keras.saving.serialize_keras_object(q) if isinstance(q, quantizers.QuantSpec) else (
            [keras.saving.serialize_keras_object(v) for v in q] if isinstance(q, (tuple, list)) else q
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
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in Prunable.TFOPT_ARGUMENTS
    ]

    def __init__(self, *args, **kwargs):
        Prunable.__init__(self, *args, **kwargs)

    __init__.__signature__ = inspect.Signature(params + extra + var_kw)
    __init__.__doc__ = Prunable.__init__.__doc__
    cls.__init__ = __init__
    cls.keras_class = base
    return cls
