"""`Prunable`: the mixin that turns a Keras layer into its tfopt twin.

It orchestrates; the knowledge lives elsewhere: which weights and axes
(`tfopt.geometry`), the mask update (`tfopt.pruning`), weight fake
quantization (`layers/_weight_quantization.py`), BatchNormalization folding
(`layers/_folding.py`), activation ranges (`layers/quantize_activation.py`),
and the Keras internals it needs (`tfopt._keras_internal`).
"""

import inspect

import keras
from keras import ops

from tfopt import _backend, _keras_internal, _state, geometry, pruning, quantizers
from tfopt.layers import _weight_quantization
from tfopt.layers._folding import BatchNormFolding
from tfopt.layers.quantize_activation import QuantizingLayer, add_range_weights, frozen, track_and_quantize

__all__ = ["Prunable", "with_keras_signature", "twin"]


class Prunable(QuantizingLayer):
    """Mixin for drop-in Keras layers that prune and quantize their weights during `fit`.

    Put it before the Keras class: `class Dense(Prunable, keras.layers.Dense)`.
    Which weights it prunes and quantizes, and along which axes, comes from the
    layer type's `tfopt.geometry` entry. It adds four keyword arguments and,
    when they ask for it, non-trainable weights after the parent's:
    `<weight>_mask` per pruned weight (the 0/1 mask, in the weight's variable
    dtype) and `pruning_step` (the number of optimizer updates this layer has
    seen: int64, int32 under JAX without `jax_enable_x64`);
    `output_range_min`/`_max`/`_updates` for QAT; `bn_*` for a folded
    BatchNormalization. The mask is updated in-graph by the weight's
    constraint (see `tfopt.pruning`), so under TensorFlow no callback is
    needed unless the schedule is given in percentages of training. Under
    the JAX backend a layer with a `pruning_schedule` needs
    `tfopt.callbacks.Pruning()` in `fit` (JAX's train step keeps only the
    state the optimizer carries, and the callback lends the layer's masks and
    step to the optimizer); without it the first train step raises a
    ValueError that says so. tfopt's weights are saved by name, after the
    Keras layer's own.

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
            or a (weight spec, activation spec) pair. The weights are
            fake-quantized in the forward pass (straight-through gradient) and
            the output is fake-quantized to a range tracked during training
            (weights `output_range_min`, `output_range_max`,
            `output_range_updates`). Weights are quantized per output channel
            for convolutions (Conv1D/2D/3D, both kernels of SeparableConv, and
            depthwise kernels per channel x multiplier, TFLite's layout), per
            tensor for Dense, EinsumDense, Embedding and transposed
            convolutions: per-channel Dense kernels make the TFLite converter
            fail ("mismatched quantized axes"), as tfmot's default scheme also
            avoids (the `quant_axis` of each `tfopt.geometry` entry). Pruned
            zeros stay exactly zero under symmetric quantization, so sparsity
            survives QAT.
    """

    #: The keyword arguments tfopt adds to the Keras layer's.
    TFOPT_ARGUMENTS = ("pruning_schedule", "structure", "quantization_aware", "folded_batch_norm")
    #: Names of tensors inside the layer that get a tracked range of their own
    #: under quantization-aware training (weights `<name>_range_min`, ...).
    INTERMEDIATE_RANGES = ()

    def __init__(self, *args, pruning_schedule=None, structure=None, quantization_aware=None,
                 folded_batch_norm=None, **kwargs):
        super().__init__(*args, **kwargs)
        where = f"Layer '{self.name}' ({type(self).__name__})"
        if folded_batch_norm is not None and not quantization_aware:
            raise ValueError(
                f"{where} got `folded_batch_norm` without "
                "`quantization_aware`; folding only serves quantization-aware training. "
                "Pass quantization_aware=... too, or leave the BatchNormalization as a layer."
            )
        if folded_batch_norm is not None and getattr(self, "activation", None) not in (None, keras.activations.linear):
            raise ValueError(
                f"{where} has activation "
                f"{keras.activations.serialize(self.activation)!r}; a BatchNormalization can only "
                "be folded into a layer whose output it normalizes directly (linear activation)."
            )
        self.folded_batch_norm = dict(folded_batch_norm) if folded_batch_norm else None
        self.quantization_aware = quantization_aware or None
        self.weight_quant_spec, self.output_quant_spec = (
            quantizers.get_training_precision(quantization_aware, f"{where}: `quantization_aware`")
            if quantization_aware else (None, None)
        )
        if self.weight_quant_spec is not None:
            _weight_quantization.check_quantizable(self)
        self._folding = None
        if self.folded_batch_norm is not None:
            spec = geometry.fold_weight(self)
            if spec is None:
                raise ValueError(f"{where}: tfopt cannot fold a BatchNormalization into this layer type.")
            self._folding = BatchNormFolding(self, spec, self.folded_batch_norm)
        self.pruning_schedule = pruning.get_schedule(pruning_schedule)
        self.structure = pruning.get_structure(structure, self.pruning_schedule, where)
        self._masks = []  # (WeightSpec, mask variable), set in build

    # --- state ----------------------------------------------------------------------
    def build(self, input_shape=None):
        super().build(input_shape)
        if self.output_quant_spec is not None:
            ranges = add_range_weights(self, prefix="output_")
            self.output_range_min, self.output_range_max, self.output_range_updates = ranges
            # Tensors inside the layer that LiteRT computes as ops of their own.
            self._intermediate_ranges = {
                name: add_range_weights(self, prefix=f"{name}_") for name in self.INTERMEDIATE_RANGES}
        if self._folding is not None:
            self._folding.build()
        if self.pruning_schedule is None:
            return
        targets = geometry.prunable_weights(self)
        for spec, weight in targets:
            where = f"Layer '{self.name}' ({type(self).__name__}) weight '{spec.path}'"
            self.structure.validate(weight.shape, spec.in_axis, spec.out_axis, where)
            self.structure.check_target(self.pruning_schedule.final_sparsity, weight.shape, spec.in_axis,
                                        spec.out_axis, where)
        # Each replica computes the same masks and step from the same weights and
        # writes its own copy: no merge_call, and a mask is written on update steps only.
        masks = [
            _keras_internal.add_replica_local_weight(self, f"{spec.name}_mask", weight.shape, weight.dtype)
            for spec, weight in targets
        ]
        self.pruning_step = _keras_internal.add_replica_local_weight(self, "pruning_step", (), _backend.int_dtype(),
                                                                     "zeros")
        # Optimizers apply constraints in the order of the trainable variables;
        # the last pruned weight's constraint counts the step.
        order = {id(v): i for i, v in enumerate(self.trainable_weights)}
        last = max(range(len(targets)), key=lambda i: order.get(id(targets[i][1]), -1))
        for i, ((spec, weight), mask) in enumerate(zip(targets, masks)):
            setattr(self, f"{spec.name}_mask", mask)
            pruning.attach(
                weight, mask, self.pruning_schedule, self.structure, spec.in_axis, spec.out_axis,
                step_fn=lambda: self.pruning_step, owner=self, length_fn=self._training_length,
                after=(lambda: self.pruning_step.assign_add(1)) if i == last else None,
            )
        self._masks = [(spec, mask) for (spec, _), mask in zip(targets, masks)]

    def _training_length(self):
        length = _state.TRAINING_LENGTH.get(self)
        if length is None:
            raise ValueError(
                f"Layer '{self.name}' ({type(self).__name__}) has a pruning schedule in "
                f"percentages of training ({self.pruning_schedule!r}), but nothing told it "
                "how long training is. Add `tfopt.callbacks.Pruning()` to "
                "`model.fit(..., callbacks=[...])`, or give the schedule's steps as ints."
            )
        return length

    def tfopt_variables(self):
        """`[(name, variable)]` of the state tfopt adds to the Keras layer, in
        the order it is saved: activation range, folded BatchNormalization,
        masks, pruning step."""
        if not self.built:
            return []
        state = []
        if self.output_quant_spec is not None:
            state += [("output_range_min", self.output_range_min), ("output_range_max", self.output_range_max),
                      ("output_range_updates", self.output_range_updates)]
            for name, variables in self._intermediate_ranges.items():
                state += list(zip((f"{name}_range_min", f"{name}_range_max", f"{name}_range_updates"), variables))
        if self._folding is not None:
            state += self._folding.variables()
        if self.pruning_schedule is not None:
            state += [(f"{spec.name}_mask", mask) for spec, mask in self._masks]
            state += [("pruning_step", self.pruning_step)]
        return state

    def is_quantizing(self):
        return self.output_quant_spec is not None

    def keras_weights(self):
        """The weights of the equivalent plain Keras layer (masks and folded
        BatchNormalization baked in; a folded layer always gets a bias)."""
        tfopt_ids = {id(v) for _, v in self.tfopt_variables()}
        folded = None if self._folding is None else self._folding.spec.variable(self)
        values = []
        for v in (w for w in self.weights if id(w) not in tfopt_ids):
            if self._folding is not None and v is getattr(self, "bias", None):
                continue
            value = pruning.masked_value(v)
            if v is folded:
                value = ops.convert_to_numpy(self._folding.fold(ops.convert_to_tensor(value)))
            values.append(value)
        if self._folding is not None:
            values.append(ops.convert_to_numpy(self._folding.folded_bias()))
        return values

    # --- quantization-aware forward pass ---------------------------------------------
    def call(self, inputs, *args, training=None, **kwargs):
        if self.output_quant_spec is None:
            return super().call(inputs, *args, **kwargs)
        step = ops.convert_to_tensor(self.output_range_updates)  # before this call's update
        times = self.quantization_times()
        values = {}
        if self.weight_quant_spec is not None:
            values = _weight_quantization.quantized_weights(self, self.weight_quant_spec, step, times, self._folding)
        folded_bias = added_bias = None
        if self._folding is not None:
            folded_bias = added_bias = ops.cast(self._folding.folded_bias(), self.compute_dtype)
            if getattr(self, "bias", None) is not None:
                values["bias"] = folded_bias
                added_bias = None
        with _keras_internal.substituted_weights(self, values):
            outputs = self.integer_call(inputs, *args, training=training, step=step, times=times, **kwargs)
        if added_bias is not None:
            outputs = outputs + added_bias
        if folded_bias is not None and training:
            stop = frozen(step, None if times is None else times.freeze_batch_norm)
            self._folding.update_statistics(outputs, folded_bias, None if stop is None else ops.logical_not(stop))
        return track_and_quantize(
            outputs,
            self.output_range(kwargs),
            self.output_quant_spec,
            momentum=0.99,
            update=bool(training),
            times=times,
            step=step,
        )

    def output_range(self, call_kwargs):
        """The tracked range `(min, max, updates)` of the output of a call with
        keyword arguments `call_kwargs`: `output_range_*`. (A twin whose calls
        make outputs of different kinds, such as keras-hub's token embedding,
        a lookup or, with `reverse=True`, logits, keeps a range for each.)"""
        return self.output_range_min, self.output_range_max, self.output_range_updates

    def integer_call(self, inputs, *args, training=None, step=None, times=None, **kwargs):
        """The quantization-aware forward pass, with the fake-quantized weights
        already in place of the variables: the Keras layer's own `call`, unless
        a twin computes in the form LiteRT runs in integer (see
        `tfopt/layers/convolutional.py`). `step` and `times` are the
        layer's quantization step and schedule, for ranges inside the layer."""
        return super().call(inputs, *args, **kwargs)

    def intermediate(self, name, tensor, training, step, times):
        """Fake-quantizes `tensor` to the tracked range `name` (one of
        `INTERMEDIATE_RANGES`), updating it in training."""
        return track_and_quantize(tensor, self._intermediate_ranges[name], self.output_quant_spec, momentum=0.99,
                                  update=bool(training), times=times, step=step)

    # --- saving ---------------------------------------------------------------------
    def save_own_variables(self, store):
        # The Keras layer's own variables, as Keras writes them ("0", "1", ...),
        # then tfopt's by name.
        if _parent_saves_own(type(self)):
            super().save_own_variables(store)
        else:
            for i, variable in enumerate(self._keras_own_variables()):
                store[str(i)] = variable
        for name, variable in self.tfopt_variables():
            store[name] = variable

    def load_own_variables(self, store):
        state = self.tfopt_variables()
        keys = set(store.keys())
        if not any(name in keys for name, _ in state) and state:
            return self._load_positional(store, state)  # a file from tfopt <= 0.1.0
        # Intermediate ranges came later: a file without them keeps their
        # initial [-6, 6], replaced by the first training batch.
        state = [(name, v) for name, v in state if name in keys or not self._is_intermediate(name)]
        missing = [name for name, _ in state if name not in keys]
        if missing:
            raise ValueError(
                f"Layer '{self.name}' ({type(self).__name__}): the file holds no {missing} (it holds "
                f"{sorted(keys)}). The file was saved from a layer with other arguments "
                "(pruning_schedule, quantization_aware, folded_batch_norm) than this one."
            )
        if _parent_saves_own(type(self)):
            super().load_own_variables(store)
        else:
            own = self._keras_own_variables()
            if len(keys) != len(own) + len(state):
                raise ValueError(
                    f"Layer '{self.name}' ({type(self).__name__}) expected {len(own) + len(state)} "
                    f"variables ({len(own)} of Keras's, then {[n for n, _ in state]}), but the file "
                    f"holds {len(keys)}: {sorted(keys)}. The file was saved from a layer with other "
                    "arguments (pruning_schedule, quantization_aware, folded_batch_norm) than this one."
                )
            for i, variable in enumerate(own):
                variable.assign(store[str(i)])
        for name, variable in state:
            variable.assign(store[name])

    def _is_intermediate(self, name):
        return any(name.startswith(f"{prefix}_range_") for prefix in self.INTERMEDIATE_RANGES)

    def _load_positional(self, store, state):
        """Files written before tfopt saved its state by name: the Keras parent's
        variables then tfopt's in `tfopt_variables()` order, or, for parents that
        save every variable, Keras's own order."""
        if not _parent_saves_own(type(self)):
            return keras.layers.Layer.load_own_variables(self, store)
        super().load_own_variables(store)
        offset = len(store.keys()) - len(state)
        for i, (_, variable) in enumerate(state):
            variable.assign(store[str(offset + i)])

    def _keras_own_variables(self):
        tfopt_ids = {id(v) for _, v in self.tfopt_variables()}
        return [v for v in _keras_internal.own_variables(self) if id(v) not in tfopt_ids]

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


def _parent_saves_own(cls):
    """True when the Keras parent has its own `save_own_variables` (Dense,
    EinsumDense, Embedding; convolutions since Keras 3.12), which writes only
    its own weights; False when it inherits `Layer.save_own_variables`."""
    for klass in cls.__mro__:
        if issubclass(klass, Prunable) or not issubclass(klass, keras.layers.Layer):
            continue
        if "save_own_variables" in vars(klass):
            return klass is not keras.layers.Layer
    return False


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


def twin(keras_cls, doc=None, module=None, mixin=None):
    """Makes, registers and returns the tfopt twin of `keras_cls`: a
    `Prunable` subclass with the Keras signature plus tfopt's arguments,
    serializable as `tfopt>{name}`, and the `tfopt.geometry` twin of its type.
    `mixin`, if given, goes before `Prunable` (for an
    `integer_call` of its own).

    Example (what `tfopt/layers/recurrent.py` does for `keras.layers.LSTM`):
    >>> import keras, tfopt
    >>> tfopt.layers.LSTM.keras_class is keras.layers.LSTM
    True
    >>> tfopt.geometry.twin_of(keras.layers.LSTM(4)) is tfopt.layers.LSTM
    True
    """
    name = keras_cls.__name__
    doc = doc or (
        f"Drop-in `keras.layers.{name}` that can prune and quantize its weights during `fit`.\n\n"
        f"    Takes every argument of `keras.layers.{name}`, plus `pruning_schedule=`,\n"
        "    `structure=`, `quantization_aware=` and `folded_batch_norm=` (see\n"
        "    `tfopt.layers.Prunable`); weights and axes come from `tfopt.geometry`.\n"
    )
    attrs = {"__doc__": doc, "__module__": module or __name__}
    entry = geometry.of(keras_cls)
    if not any(spec.quantize for spec in (entry.weights if entry else ())):
        # Nothing to fake-quantize: keep the Keras `call` (and its signature,
        # which Keras matches against `compute_output_shape`).
        attrs["call"] = keras_cls.call
    cls = type(name, ((mixin,) if mixin else ()) + (Prunable, keras_cls), attrs)
    cls = keras.saving.register_keras_serializable(package="tfopt")(cls)
    cls = with_keras_signature(cls)
    return geometry.register_twin(keras_cls)(cls)
