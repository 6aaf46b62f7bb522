"""`Prunable`: the mixin that turns a Keras layer into its tfopt twin."""

import inspect

import keras

from keras import ops

from tfopt import pruning, quantizers
from tfopt import _backend
from tfopt.layers.quantize_activation import (
    QuantizationSchedulable,
    add_range_weights,
    exporting,
    track_and_quantize,
    when_started,
)

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


class Prunable(QuantizationSchedulable):
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
        folded_batch_norm: None, or `{"epsilon": ..., "center": ..., "scale": ...,
            "momentum": ...}` of a BatchNormalization that follows this layer
            and is folded into it during QAT (`tfopt.quantize_model` sets it):
            the layer holds the BN's `bn_gamma`, `bn_beta` (trained) and
            `bn_moving_mean`, `bn_moving_variance` (moved towards each training
            batch's statistics with `momentum`, until
            `tfopt.callbacks.QuantizationSchedule` freezes them; momentum 1
            keeps them fixed), quantizes the folded kernel
            `kernel * gamma / sqrt(variance + epsilon)` and adds the folded
            bias, so the int8 kernel exported is the one that trained.
        quantization_aware: None (off), True or "int8", "int4", "int2",
            "ternary", "binary", a `tfopt.quantizers.QuantSpec` for the weights,
            or a (weight spec, activation spec) pair. The weight is
            fake-quantized in the forward pass (straight-through gradient) and
            the output is fake-quantized to a range tracked during training
            (weights `output_range_min`, `output_range_max`,
            `output_range_updates`). Weights are quantized per output channel
            for convolutions (Conv1D/2D/3D, both kernels of SeparableConv, and
            depthwise kernels per channel x multiplier, TFLite's layout), per
            tensor for Dense, EinsumDense, Embedding and transposed
            convolutions: per-channel Dense kernels make the TFLite converter
            fail ("mismatched quantized axes"), as tfmot's default scheme also avoids. Pruned zeros stay
            exactly zero under symmetric quantization, so sparsity survives QAT.
    """

    #: The keyword arguments tfopt adds to the Keras layer's.
    TFOPT_ARGUMENTS = ("pruning_schedule", "structure", "quantization_aware", "folded_batch_norm")

    def __init__(self, *args, pruning_schedule=None, structure=None, quantization_aware=None,
                 folded_batch_norm=None, **kwargs):
        super().__init__(*args, **kwargs)
        if folded_batch_norm is not None and not quantization_aware:
            raise ValueError(
                f"Layer '{self.name}' ({type(self).__name__}) got `folded_batch_norm` without "
                "`quantization_aware`; folding only serves quantization-aware training. "
                "Pass quantization_aware=... too, or leave the BatchNormalization as a layer."
            )
        if folded_batch_norm is not None and self.activation not in (None, keras.activations.linear):
            raise ValueError(
                f"Layer '{self.name}' ({type(self).__name__}) has activation "
                f"{keras.activations.serialize(self.activation)!r}; a BatchNormalization can only "
                "be folded into a layer whose output it normalizes directly (linear activation)."
            )
        self.folded_batch_norm = dict(folded_batch_norm) if folded_batch_norm else None
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
        if self.folded_batch_norm is not None:
            shape = getattr(self, pruning.weight_spec(self)[0]).shape
            channels = (self._fold_shape(shape)[-1] if not self._is_depthwise() else shape[-2] * shape[-1],)
            bn = self.folded_batch_norm
            self.bn_gamma = self.add_weight(name="bn_gamma", shape=channels, initializer="ones",
                                            trainable=bn.get("scale", True))
            self.bn_beta = self.add_weight(name="bn_beta", shape=channels, initializer="zeros",
                                           trainable=bn.get("center", True))
            stats = dict(shape=channels, trainable=False, dtype="float32", autocast=False,
                         aggregation="only_first_replica")
            self.bn_moving_mean = self.add_weight(name="bn_moving_mean", initializer="zeros", **stats)
            self.bn_moving_variance = self.add_weight(name="bn_moving_variance", initializer="ones", **stats)
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
        if self.folded_batch_norm is not None:
            state += [self.bn_gamma, self.bn_beta, self.bn_moving_mean, self.bn_moving_variance]
        if self.pruning_schedule is not None:
            attr = pruning.weight_spec(self)[0]
            state += [getattr(self, f"{attr}_mask"), self.pruning_step]
        return state

    # --- batch-norm folding ------------------------------------------------------------
    def _is_depthwise(self):
        return isinstance(self, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D))

    def _fold_shape(self, kernel_shape):
        """Shape the per-channel BN scale broadcasts to against the kernel."""
        rank = len(kernel_shape)
        if self._is_depthwise():
            return (1,) * (rank - 2) + tuple(kernel_shape[-2:])
        out_axis = pruning.weight_spec(self)[2] % rank
        return tuple(kernel_shape[out_axis] if i == out_axis else 1 for i in range(rank))

    def _bn_scale(self):
        bn = self.folded_batch_norm
        gamma = ops.convert_to_tensor(self.bn_gamma) if bn.get("scale", True) else 1.0
        return gamma / ops.sqrt(ops.convert_to_tensor(self.bn_moving_variance) + bn.get("epsilon", 1e-3))

    def _folded_bias(self):
        scale = self._bn_scale()
        bias = ops.convert_to_tensor(self.bias) if getattr(self, "bias", None) is not None else 0.0
        beta = ops.convert_to_tensor(self.bn_beta) if self.folded_batch_norm.get("center", True) else 0.0
        return beta + (bias - ops.convert_to_tensor(self.bn_moving_mean)) * scale

    def _folded_kernel(self, kernel):
        return kernel * ops.reshape(self._bn_scale(), self._fold_shape(kernel.shape))

    def keras_weights(self):
        """The weights of the equivalent plain Keras layer (masks and folded
        BatchNormalization baked in; a folded layer always gets a bias)."""
        from tfopt.transforms import _masked_value

        attr = pruning.weight_spec(self)[0]
        main = getattr(self, attr)
        values = []
        state = {id(v) for v in self._tfopt_state()}
        for v in (w for w in self.weights if id(w) not in state):
            if self.folded_batch_norm is not None and v is getattr(self, "bias", None):
                continue
            value = _masked_value(v)
            if self.folded_batch_norm is not None and v is main:
                value = ops.convert_to_numpy(self._folded_kernel(ops.convert_to_tensor(value)))
            values.append(value)
        if self.folded_batch_norm is not None:
            values.append(ops.convert_to_numpy(self._folded_bias()))
        return values

    # --- quantization-aware forward pass ---------------------------------------------
    def _update_batch_norm_statistics(self, outputs, folded_bias, step):
        """Moves the folded BatchNormalization's statistics towards this batch's.

        The statistics are those of the unfolded layer's output `z = conv(x, W) + b`.
        Since `outputs = conv(x, Q(W * s)) + folded_bias` with a per-channel
        scale `s`, they are estimated as `mean(outputs - folded_bias) / s + b`
        and `var(outputs) / s**2` (the quantization error of the kernel aside),
        so no second, float convolution runs. Batch moments are reduced over all
        replicas (as a synchronized BatchNormalization), so every replica holds
        the same statistics."""
        y = ops.stop_gradient(ops.cast(outputs, "float32") - ops.cast(folded_bias, "float32"))
        y = ops.reshape(y, (-1, y.shape[-1]))
        count = ops.cast(ops.shape(y)[0], "float32")
        total, squares, count = _backend.cross_replica_sum(
            [ops.sum(y, axis=0), ops.sum(ops.square(y), axis=0), count])
        mean_y = total / count
        var_y = ops.maximum(squares / count - ops.square(mean_y), 0.0)
        scale = ops.stop_gradient(ops.cast(self._bn_scale(), "float32"))
        usable = ops.greater(ops.abs(scale), 1e-6)
        safe = ops.where(usable, scale, 1.0)
        bias = ops.cast(ops.convert_to_tensor(self.bias), "float32") if getattr(self, "bias", None) is not None else 0.0
        momentum = float(self.folded_batch_norm.get("momentum", 0.99))
        old_mean = ops.convert_to_tensor(self.bn_moving_mean)
        old_var = ops.convert_to_tensor(self.bn_moving_variance)
        active = usable
        if self.batch_norm_freeze is not None:
            active = ops.logical_and(active, ops.less(step, self.batch_norm_freeze))
        new_mean = momentum * old_mean + (1.0 - momentum) * (mean_y / safe + bias)
        new_var = momentum * old_var + (1.0 - momentum) * (var_y / ops.square(safe))
        self.bn_moving_mean.assign(ops.where(active, new_mean, old_mean))
        self.bn_moving_variance.assign(ops.where(active, new_var, old_var))

    def _quantized_weights(self, step=None):
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
            if holder is None:  # a Keras release that stores the weight elsewhere
                raise RuntimeError(
                    f"Layer '{self.name}' ({type(self).__name__}): tfopt cannot find the attribute "
                    f"holding '{name}' in this Keras version ({keras.__version__}), so it cannot "
                    "quantize it. Please report this with your Keras version."
                )
            # Depthwise kernels (..., channels, multiplier) are quantized per
            # output channel of TFLite's (1, ..., channels * multiplier) layout.
            depthwise = name == "depthwise_kernel" or (name == attr and self._is_depthwise())
            per_channel = self._weight_spec.per_channel and (
                depthwise
                or (out_axis == -1
                    and not isinstance(self, (keras.layers.Dense, keras.layers.EinsumDense, keras.layers.Embedding)))
            )
            spec = self._weight_spec
            if spec.per_channel and not per_channel:
                spec = quantizers.QuantSpec(**{**spec.get_config(), "per_channel": False})

            def read(variable=variable, fold=self.folded_batch_norm is not None and name == attr):
                weight = ops.cast(ops.convert_to_tensor(variable), "float32")
                return self._folded_kernel(weight) if fold else weight

            weight = read()

            def quantize(w=weight, read=read, s=spec, flatten=depthwise and per_channel):
                shape = tuple(w.shape)

                def flat(x):
                    return ops.reshape(x, shape[:-2] + (shape[-2] * shape[-1],)) if flatten else x

                if s.mode != "affine" and exporting():
                    # The converter cannot fold the sign/threshold graph of binary
                    # and ternary weights: give it their values, computed eagerly.
                    values = _backend.in_init_scope(
                        lambda: ops.convert_to_numpy(quantizers.quantize_weight(flat(read()), s, -1)))
                    q = quantizers.carry_int8(ops.convert_to_tensor(values), s, -1)
                else:
                    q = quantizers.quantize_weight(flat(w), s, -1)
                return ops.reshape(q, shape) if flatten else q

            value = when_started(step, self.quantization_start, quantize, weight)
            out.append((holder, variable, ops.cast(value, self.compute_dtype)))
        return out

    def call(self, inputs, *args, training=None, **kwargs):
        if self._output_spec is None:
            return super().call(inputs, *args, **kwargs)
        step = ops.convert_to_tensor(self.output_range_updates)  # before this call's update
        swapped = self._quantized_weights(step) if self._weight_spec is not None else []
        folded_bias = added_bias = None
        if self.folded_batch_norm is not None:
            folded_bias = added_bias = ops.cast(self._folded_bias(), self.compute_dtype)
            if getattr(self, "bias", None) is not None:
                swapped.append(("bias", self.bias, folded_bias))
                added_bias = None
        try:
            for holder, _, value in swapped:
                object.__setattr__(self, holder, value)
            outputs = super().call(inputs, *args, **kwargs)
        finally:
            for holder, variable, _ in swapped:
                object.__setattr__(self, holder, variable)
        if added_bias is not None:
            outputs = outputs + added_bias
        if folded_bias is not None and training:
            self._update_batch_norm_statistics(outputs, folded_bias, step)
        return track_and_quantize(
            outputs,
            (self.output_range_min, self.output_range_max, self.output_range_updates),
            self._output_spec,
            momentum=0.99,
            update=bool(training),
            start=self.quantization_start,
            freeze=self.ranges_freeze,
            step=step,
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
        config["folded_batch_norm"] = self.folded_batch_norm
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
