"""Online distillation: `Distiller`, a Keras model that runs the teacher on every batch."""

import warnings

import keras
import numpy as np
from keras import ops

from tfopt import _backend, _keras_internal, strategies
from tfopt.distillation import sequence
from tfopt.distillation._models import _ends_in_softmax
from tfopt.distillation.features import FeatureHint, _FeatureLoss
from tfopt.distillation.losses import (DEFAULT_ALPHA, DEFAULT_TEMPERATURE, _as_logits, _check_alpha,
                                       _check_method, _check_student_output, _check_teacher_outputs,
                                       _check_temperature, _distillation_term, _label_loss, _unpack, _value,
                                       _width_mismatch)
from tfopt.distillation.teacher import _probabilities_warning


#: Under JAX, the optimizer's step of the train step being traced (innermost last; None in a test step).
_TRACED_STEPS = []


def _layer_output(model, name, role):
    """The output of `model`'s layer `name`; "outer/inner" reaches a layer of a nested model
    (e.g. "gpt2_backbone/transformer_layer_1" in a keras-hub CausalLM)."""
    layer = model
    for part in name.split("/"):
        names = [child.name for child in getattr(layer, "layers", [])]
        if part not in names:
            where = "" if layer is model else f" in '{layer.name}'"
            raise ValueError(
                f"Distiller: the {role} has no layer named '{part}'{where}. Its layers are: {names}. "
                "A layer of a nested model is named 'outer/inner'."
            )
        layer = layer.get_layer(part)
    return layer.output


@keras.saving.register_keras_serializable(package="tfopt")
class Distiller(keras.Model):
    """Online distillation: a Keras model that trains `student` against `teacher`.

    `compile` it (optimizer, metrics and optionally the student's supervised
    `loss`, as `keras.distillation.Distiller.compile`), `fit`, `evaluate`,
    save it; `distiller.student` is the trained student, ready for
    `tfopt.export`. The teacher runs on every training batch with
    `training=False` and never trains: a trainable teacher is frozen (set
    `trainable=False`) with a warning. The student may be a tfopt pruned
    and/or quantization-aware model (pass its callbacks to `fit` as usual).

    The per-sample loss is `DistillationLoss`'s (same code), plus each feature
    loss in `losses` times its weight. With `compile(loss=...)` the label
    term is that loss instead, as in `keras.distillation.Distiller`: the
    total is `alpha * loss(y, student(x)) + (1 - alpha) * distillation`
    (`alpha` plays the part of Keras's `student_loss_weight`), so switching
    from Keras's Distiller changes the import and the constructor's
    arguments, not `compile`. Feature losses need the teacher and
    the student to be Functional or Sequential models (their layers' outputs
    must be reachable); learned projections live in the Distiller.

    Sequence models (language models, e.g. keras-hub CausalLMs): when the
    student outputs `(batch, seq, vocab)` logits the loss is per position,
    `alpha *` next-token sparse crossentropy `+ (1 - alpha) *` the
    distillation term between the teacher's and the student's distributions
    at that position, averaged over the positions that count: the inputs'
    `"padding_mask"` (dict inputs `{"token_ids", "padding_mask"}`) times
    `fit`'s `sample_weight` (shape `(batch, seq)`). `y` holds the next
    tokens, aligned with the outputs (`y[:, i]` is the target at position
    `i`; -1: none): `fit(x_dict, y_tokens, sample_weight=mask)`. Feature
    losses reach blocks inside a nested backbone by "outer/inner" names
    (`FeatureHint("gpt2_backbone/transformer_layer_1",
    "gpt2_backbone/transformer_layer_0")`), with a learned projection when
    the widths differ; on sequences they count only the positions of the
    padding mask.

    Args:
        teacher: a trained Keras model with one (batch, classes) output, or
            a sequence model with one (batch, seq, vocab) output.
        student: a Keras model with the same output shape (a different
            number of classes, or another vocabulary, is a `ValueError` at
            construction).
        temperature, alpha, method: as in `DistillationLoss` (`method`:
            "kd", "reverse_kl" or "mse").
        from_logits: None (detect), True or False: the student outputs
            logits (True) or probabilities (False; then the teacher is read
            as probabilities too unless `teacher_outputs="logits"`). None
            checks the student's final layer at construction: a softmax
            activation (every keras-io classifier; what `tfopt.shrink` of one
            returns) means probabilities, read as `log(p)` (logits up to a
            constant) in the distillation term and as probabilities in the
            label loss; the student keeps its softmax. A subclassed student,
            whose graph is not visible, is read as logits with a
            `UserWarning` (pass True or False to say which). True with a
            student ending in softmax is corrected, with a `UserWarning`.
        losses: feature losses, e.g. `[FeatureHint("t_block", "s_block", weight=0.1)]`.
        teacher_outputs: None (detect), "logits" or "probabilities". The
            teacher's probabilities are converted with `log` to act as
            logits. None checks the teacher's final layer at construction: a
            softmax activation means probabilities (with a `UserWarning`
            when the student outputs logits); otherwise logits, unless
            `from_logits=False` was passed.

    Example:
    >>> import keras, numpy as np, tfopt
    >>> x = np.random.default_rng(0).standard_normal((32, 8)).astype("float32")
    >>> teacher = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    >>> teacher.trainable = False
    >>> student = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    >>> distiller = tfopt.distillation.Distiller(teacher, student)
    >>> distiller.compile("adam", metrics=["accuracy"])
    >>> _ = distiller.fit(x, np.arange(32) % 3, epochs=1, verbose=0)
    """

    #: Reads its optimizer's step itself (`DistillationSchedule` has nothing to bind).
    reads_optimizer_step = True

    def __init__(self, teacher, student, temperature=DEFAULT_TEMPERATURE, alpha=DEFAULT_ALPHA, method="kd",
                 from_logits=None, losses=None, teacher_outputs=None, name="distiller", **kwargs):
        super().__init__(name=name, **kwargs)
        for role, model in (("teacher", teacher), ("student", student)):
            if not isinstance(model, keras.Model):
                raise TypeError(f"Distiller: `{role}` must be a Keras 3 model. Received: {type(model).__name__}")
        self.temperature = _check_temperature(temperature, "Distiller")
        self.alpha = _check_alpha(alpha, "Distiller")
        self.method = _check_method(method, "Distiller")
        teacher_outputs = _check_teacher_outputs(teacher_outputs, "Distiller")
        self.feature_losses = list(losses or [])
        for loss in self.feature_losses:
            if not isinstance(loss, _FeatureLoss):
                raise TypeError(
                    f"Distiller: `losses` takes feature losses (FeatureHint, AttentionTransfer); received "
                    f"{loss!r}. Output distillation is set by `method`, `temperature` and `alpha`."
                )
        if teacher.trainable:
            warnings.warn(
                f"Distiller: teacher '{teacher.name}' was trainable; it is now frozen "
                "(teacher.trainable = False) so that only the student trains.", stacklevel=2)
            teacher.trainable = False
        self.teacher = teacher
        self.student = student
        self._check_outputs()
        self.from_logits = _student_from_logits(student, from_logits)  # resolved, as teacher_outputs
        if teacher_outputs is None:
            if _ends_in_softmax(teacher):
                teacher_outputs = "probabilities"
                if self.from_logits:
                    warnings.warn(_probabilities_warning(
                        "Distiller", f" '{teacher.name}'", "its final activation is softmax"), UserWarning,
                        stacklevel=2)
            else:
                teacher_outputs = "probabilities" if from_logits is False else "logits"
        self.teacher_outputs = teacher_outputs  # resolved, so a reloaded Distiller does not warn again
        self._student_loss = self._student_loss_config = None  # compile(loss=...)
        self._teacher_features = self._student_features = None
        self.projections = []
        if self.feature_losses:
            self._build_feature_models()

    def _check_outputs(self):
        outs = []
        for role, model in (("teacher", self.teacher), ("student", self.student)):
            out = getattr(model, "outputs", None) if _keras_internal.is_graph_network(model) else None
            if out is not None and len(out) != 1:
                raise ValueError(f"Distiller: the {role} has {len(out)} outputs; distillation needs one.")
            outs.append(out[0] if out else None)
        t, s = outs
        if t is not None and s is not None and len(t.shape) == len(s.shape) == 3:
            if None not in (t.shape[-1], s.shape[-1]) and t.shape[-1] != s.shape[-1]:
                raise sequence.vocab_mismatch("Distiller", t.shape[-1], s.shape[-1],
                                              f"teacher '{self.teacher.name}', output shape {tuple(t.shape)}")
            if None not in (t.shape[1], s.shape[1]) and t.shape[1] != s.shape[1]:
                raise ValueError(
                    f"Distiller: the teacher '{self.teacher.name}' outputs {t.shape[1]} positions per sequence "
                    f"(shape {tuple(t.shape)}) but the student '{self.student.name}' {s.shape[1]} (shape "
                    f"{tuple(s.shape)}): distillation compares them position by position. Received: sequence "
                    f"lengths {t.shape[1]} and {s.shape[1]}. Fix: build both for the same sequence length (or None)."
                )
        elif t is not None and s is not None:
            if t.shape[-1] != s.shape[-1] or len(t.shape) != len(s.shape):
                raise ValueError(
                    f"Distiller: the teacher's output shape {tuple(t.shape)} and the student's "
                    f"{tuple(s.shape)} cannot be compared: both must be (batch, classes) with the same classes. "
                    f"Received: teacher '{self.teacher.name}' with {t.shape[-1]} outputs, student "
                    f"'{self.student.name}' with {s.shape[-1]}. Fix: give the student's last layer "
                    f"{t.shape[-1]} units, or distill from a teacher with {s.shape[-1]} outputs."
                )
            for role, tensor in (("teacher", t), ("student", s)):
                if "float" not in str(tensor.dtype):
                    raise ValueError(
                        f"Distiller: the {role}'s output dtype is {tensor.dtype}; distillation needs float "
                        "logits or probabilities."
                    )

    def _build_feature_models(self):
        for role, model in (("teacher", self.teacher), ("student", self.student)):
            if not _keras_internal.is_graph_network(model):
                raise ValueError(
                    f"Distiller: feature losses need the {role}'s intermediate layer outputs, which a "
                    f"subclassed model ({type(model).__name__}) does not expose. Build the {role} as a "
                    "Functional or Sequential model, or distill outputs only (no `losses=`)."
                )
        t_out = [_layer_output(self.teacher, f.teacher_layer, "teacher") for f in self.feature_losses]
        s_out = [_layer_output(self.student, f.student_layer, "student") for f in self.feature_losses]
        self._teacher_features = keras.Model(self.teacher.inputs, [self.teacher.outputs[0]] + t_out)
        self._student_features = keras.Model(self.student.inputs, [self.student.outputs[0]] + s_out)
        self.projections = []
        for f, t, s in zip(self.feature_losses, t_out, s_out):
            projection = f.make_projection(t.shape, s.shape)
            if projection is not None:
                projection.build(s.shape)
            self.projections.append(projection)

    def call(self, inputs, training=None):
        """The student's output; while training with feature losses, the tuple
        `(output, *student features)`, which `compute_loss` and
        `compute_metrics` unpack (one forward pass gives both)."""
        if self.feature_losses and training:
            return tuple(self._student_features(inputs, training=training))
        return self.student(inputs, training=training)

    def _split(self, y_pred):
        """`(student output, student features or None)` from what `call` returned."""
        if isinstance(y_pred, (tuple, list)):
            return y_pred[0], list(y_pred[1:])
        return y_pred, None

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return super().compute_metrics(x, y, self._split(y_pred)[0], sample_weight)

    def _step(self):
        """The optimizer's step, read by temperature and alpha schedules: under JAX, the
        value the running train step carries (`compute_loss_and_updates`); else (and in
        JAX's test step, which carries no optimizer state) the variable itself."""
        if _TRACED_STEPS and _TRACED_STEPS[-1] is not None:
            return _TRACED_STEPS[-1]
        optimizer = getattr(self, "optimizer", None)
        return None if optimizer is None else optimizer.iterations

    def evaluate(self, *args, **kwargs):
        """`keras.Model.evaluate`. Under JAX, with a temperature or alpha schedule, the test
        step is traced again at each call: it carries no optimizer state, so it reads the
        step as it is when traced (on other backends it reads the variable at every step)."""
        schedules = any(isinstance(v, keras.optimizers.schedules.LearningRateSchedule)
                        for v in (self.temperature, self.alpha))
        if schedules and _backend.stateless_steps():
            self.test_function = None
        return super().evaluate(*args, **kwargs)

    def compute_loss_and_updates(self, *args, optimizer_variables=None, **kwargs):
        """JAX's stateless loss (Keras's JAX trainer calls it from its train and test
        steps; other backends never do). The forward pass and `compute_loss` see the
        model's variables only, so the optimizer's step, which a temperature or alpha
        schedule reads, is taken from `optimizer_variables` here and read by `_step`
        while the loss is traced (held for this call only: nothing outlives the trace)."""
        step = None
        optimizer = getattr(self, "optimizer", None)
        if optimizer_variables is not None and optimizer is not None:
            step = next((value for variable, value in zip(optimizer.variables, optimizer_variables)
                         if variable is optimizer.iterations), None)
        _TRACED_STEPS.append(step)
        try:
            return super().compute_loss_and_updates(*args, optimizer_variables=optimizer_variables, **kwargs)
        finally:
            _TRACED_STEPS.pop()

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if y_pred is None:
            y_pred = self(x, training=training)
        y_pred, student_feats = self._split(y_pred)
        if self.feature_losses and training:
            teacher_all = self._teacher_features(x, training=False)
            teacher_out, teacher_feats = teacher_all[0], teacher_all[1:]
        else:
            teacher_out, teacher_feats = self.teacher(x, training=False), None
        teacher = ops.stop_gradient(teacher_out)
        teacher = _as_logits(teacher) if self.teacher_outputs == "probabilities" else ops.cast(teacher, "float32")
        if len(y_pred.shape) == 3:  # a sequence model: per position, over the positions that count
            mask = sequence.input_mask(x)
            total = self._sequence_loss(y, y_pred, teacher, mask, sample_weight)
            return self._add_features_and_regularizers(total, teacher_feats, student_feats, mask)
        classes = _check_student_output(y_pred, "Distiller")
        if None not in (teacher.shape[-1], classes) and teacher.shape[-1] != classes:  # subclassed models
            raise _width_mismatch("Distiller", teacher.shape[-1], classes, f"teacher '{self.teacher.name}'")
        step = self._step()
        temperature, alpha = _value(self.temperature, step), _value(self.alpha, step)
        teach = _distillation_term(teacher, y_pred, temperature, self.method, self.from_logits)
        weights = None if sample_weight is None else ops.cast(ops.reshape(sample_weight, (-1,)), "float32")
        if y is not None and self._student_loss is None:
            y = ops.convert_to_tensor(y)
            labels, has_label, packed, sparse = _unpack(y, classes, "Distiller")
            if packed is not None:
                raise ValueError(
                    f"Distiller: `y` has shape {tuple(y.shape)}, the packed targets of `attach_teacher`, but a "
                    "Distiller runs the teacher itself and takes plain labels. Received: y of shape "
                    f"{tuple(y.shape)}. Fix: pass the labels (class indices or one-hot) as `y`, or train the "
                    "student itself with `DistillationLoss` on the packed targets."
                )
            label_loss = _label_loss(labels, y_pred, sparse, self.from_logits)
            per_sample = alpha * has_label * label_loss + (1.0 - alpha) * teach
            total = ops.mean(per_sample if weights is None else per_sample * weights)
        else:  # the user's supervised loss (as keras.distillation.Distiller), or no labels
            distill = (1.0 - alpha) * teach
            total = ops.mean(distill if weights is None else distill * weights)
            if y is not None:
                total = total + alpha * self._supervised_loss(y, y_pred, sample_weight)
        return self._add_features_and_regularizers(total, teacher_feats, student_feats)

    def _add_features_and_regularizers(self, total, teacher_feats, student_feats, mask=None):
        if teacher_feats is not None and student_feats is not None:
            for f, projection, t, s in zip(self.feature_losses, self.projections, teacher_feats, student_feats):
                if projection is not None:
                    s = projection(s)
                if mask is not None and isinstance(f, FeatureHint) and len(s.shape) == 3:
                    diff = ops.mean(ops.square(ops.cast(ops.stop_gradient(t), "float32") - ops.cast(s, "float32")),
                                    axis=-1)
                    total = total + f.weight * sequence.masked_mean(diff, sequence.position_weights(diff, mask))
                else:
                    total = total + f.weight * f(ops.stop_gradient(t), s)
        if self.student.losses:  # the student's regularizers (not the frozen teacher's)
            total = total + ops.sum(self.student.losses)
        return total

    def _sequence_loss(self, y, y_pred, teacher, mask, sample_weight):
        """The scalar loss of a batch of a sequence student `(batch, seq, vocab)` (see the class docstring)."""
        if None not in (teacher.shape[-1], y_pred.shape[-1]) and teacher.shape[-1] != y_pred.shape[-1]:
            raise sequence.vocab_mismatch("Distiller", teacher.shape[-1], y_pred.shape[-1],
                                          f"teacher '{self.teacher.name}'")  # subclassed models
        if y is not None:
            y = ops.convert_to_tensor(y)
            if sequence.is_packed(tuple(y.shape)):
                raise ValueError(
                    f"Distiller: `y` has shape {tuple(y.shape)}, the packed targets of `attach_teacher`, but a "
                    "Distiller runs the teacher itself and takes the next tokens as labels. Received: y of shape "
                    f"{tuple(y.shape)}. Fix: pass the next tokens (shape (batch, seq)) as `y`, or train the "
                    "student itself with `DistillationLoss` on the packed targets."
                )
        step = self._step()
        temperature, alpha = _value(self.temperature, step), _value(self.alpha, step)
        if self._student_loss is None:
            return sequence.sequence_loss(y, y_pred, temperature, alpha, self.method, sample_weight=sample_weight,
                                          mask=mask, teacher=teacher, from_logits=self.from_logits, who="Distiller")
        total = sequence.sequence_loss(None, y_pred, temperature, alpha, self.method, sample_weight=sample_weight,
                                       mask=mask, teacher=teacher, from_logits=self.from_logits, who="Distiller")
        if y is not None:
            weights = sequence.position_weights(y_pred[:, :, 0], mask, sample_weight)
            total = total + alpha * self._supervised_loss(y, y_pred, weights)
        return total

    def _supervised_loss(self, y, y_pred, sample_weight):
        """`compile(loss=...)` on the labels, reduced to a scalar as Keras's Distiller does."""
        fn = self._student_loss
        if isinstance(fn, keras.losses.Loss):
            value = ops.cast(fn(y, y_pred, sample_weight=sample_weight), "float32")
        else:
            value = ops.cast(fn(y, y_pred), "float32")
            if sample_weight is not None and len(value.shape) == 1:
                value = value * ops.cast(ops.reshape(sample_weight, (-1,)), "float32")
        return ops.mean(value) if len(value.shape) > 0 else value

    def compile(self, optimizer="adam", loss=None, metrics=None, **kwargs):
        """Configures the Distiller for training, as `keras.distillation.Distiller.compile`.

        Args:
            optimizer: the student's optimizer.
            loss: optional, the student's supervised loss on the labels: a
                loss name, a `keras.losses.Loss`, or a function of
                `(y_true, y_pred)`, as in `keras.distillation.Distiller`. The
                total is then `alpha * loss(y, student(x)) + (1 - alpha) *
                mean(distillation)`. None: tfopt's crossentropy (sparse or
                one-hot by the labels' shape, `from_logits` as set; samples
                labelled -1 or all zeros get the distillation term only).
            metrics: metrics of the student's output against `y`.
            **kwargs: the other arguments of `keras.Model.compile`
                (`steps_per_execution`, `jit_compile`, ...).
        """
        if self.student.weights and not self.student.trainable_weights:
            nested = [layer.name for layer in getattr(self.student, "layers", [])
                      if layer.weights and not layer.trainable]
            raise ValueError(
                f"Distiller: student '{self.student.name}' has no trainable weights "
                f"({len(self.student.weights)} weights, all frozen"
                + (f"; frozen sublayers: {nested}" if nested else "") + "), so distillation would train "
                "nothing. Fix: student.trainable = True (and on each frozen sublayer, e.g. "
                "student.backbone.trainable = True) before compile.")
        self._student_loss = _student_loss(loss)
        self._student_loss_config = loss
        super().compile(optimizer=optimizer, metrics=metrics, **kwargs)
        strategies.check(self)

    def get_compile_config(self):
        """Keras's compile config plus the student's supervised `loss`, so that
        a loaded Distiller is compiled as it was saved."""
        config = super().get_compile_config()
        if config and self._student_loss_config is not None:
            config["loss"] = keras.saving.serialize_keras_object(self._student_loss_config)
        return config

    def compile_from_config(self, config):
        """Compiles a loaded Distiller from `get_compile_config()` (Keras skips
        models that override `compile`)."""
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    def get_config(self):
        def ser(v):
            return keras.saving.serialize_keras_object(v) if not isinstance(v, float) else v

        return {
            "name": self.name,
            "teacher": keras.saving.serialize_keras_object(self.teacher),
            "student": keras.saving.serialize_keras_object(self.student),
            "temperature": ser(self.temperature),
            "alpha": ser(self.alpha),
            "method": self.method,
            "from_logits": self.from_logits,
            "losses": [keras.saving.serialize_keras_object(f) for f in self.feature_losses],
            "teacher_outputs": self.teacher_outputs,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("teacher", "student"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        for key in ("temperature", "alpha"):
            if isinstance(config.get(key), dict):
                config[key] = keras.saving.deserialize_keras_object(config[key])
        config["losses"] = [keras.saving.deserialize_keras_object(f) for f in config.get("losses") or []]
        config["teacher"].trainable = False
        return cls(**config)


def _student_from_logits(student, from_logits):
    """`Distiller`'s `from_logits` resolved from the student's graph (see its docstring)."""
    if from_logits is not None and not isinstance(from_logits, (bool, np.bool_)):
        raise ValueError(
            "Distiller: `from_logits` must be None (detect from the student's final layer), True (the student "
            f"outputs logits) or False (probabilities). Received: from_logits={from_logits!r}"
        )
    softmax = _ends_in_softmax(student)
    if softmax and from_logits:
        warnings.warn(
            f"Distiller: the student '{student.name}' outputs probabilities, not logits (its final activation "
            "is softmax), but from_logits=True. Its outputs are read as probabilities (their log acts as "
            "logits in the distillation term), as from_logits=False would. To silence this warning, pass "
            "from_logits=False (or None to detect), or remove the student's final softmax.",
            UserWarning, stacklevel=3)
        return False
    if from_logits is None and not softmax and not _keras_internal.is_graph_network(student):
        warnings.warn(
            f"Distiller: the student '{student.name}' is a subclassed model ({type(student).__name__}), whose "
            "final layer is not visible, so its outputs are assumed to be logits. Received: from_logits=None. "
            "Fix: pass from_logits=False if it ends in a softmax (outputs probabilities), or from_logits=True to "
            "declare logits and silence this warning.",
            UserWarning, stacklevel=3)
    return not softmax if from_logits is None else bool(from_logits) and not softmax


def _student_loss(loss):
    """`Distiller.compile`'s `loss` as a callable (None: the built-in label loss)."""
    if loss is None:
        return None
    if isinstance(loss, str):
        return keras.losses.get(loss)
    if isinstance(loss, (list, tuple, dict)) or not callable(loss):
        raise ValueError(
            "Distiller.compile: `loss` is the student's one supervised loss: a loss name, a "
            "`keras.losses.Loss` or a function of (y_true, y_pred), as in `keras.distillation.Distiller`. "
            f"Received: loss={loss!r}. Fix: pass one loss (e.g. "
            "`keras.losses.SparseCategoricalCrossentropy(from_logits=True)`), or none for tfopt's "
            "crossentropy; metrics go in `metrics=`."
        )
    return loss
