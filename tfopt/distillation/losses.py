"""Distillation's argument checks and loss math, shared by the cached and the online paths.

`kd_loss` and `logit_mse` are the per-sample terms; `DistillationLoss` (for
`compile`, on `attach_teacher`'s packed targets) and `Distiller` compute
`alpha * label_loss + (1 - alpha) * distillation_loss` with the same code
(`distillation_per_sample`); `LabelAccuracy` reads the labels inside packed
targets.
"""

import math
import numbers
import warnings

import keras
import numpy as np
from keras import ops

from tfopt import _backend, _keras_internal
from tfopt.distillation import sequence
from tfopt.distillation._models import _ends_in_softmax


#: Defaults chosen on the digits benchmark (`benchmarks/distillation.py
#: --sweep`, tiny 1.2k-parameter student, 3 seeds): on the same 200 labelled
#: digits, T=4 with alpha=0.5 gained 1.3 points over labels alone, T=1 and T=2
#: 0.5; no setting in the grid did worse than labels alone. Keep alpha well
#: above 0 for tiny students: most of the weight on a very soft teacher
#: (alpha 0.1) is the setting reported to cost small students accuracy.
DEFAULT_TEMPERATURE = 4.0
DEFAULT_ALPHA = 0.5

_METHODS = ("kd", "reverse_kl", "mse")
_TEACHER_OUTPUTS = ("logits", "probabilities")
_TINY = float(np.finfo(np.float32).tiny)  # log(_TINY) ~ -87.3: a probability of 0 as a logit


# --- validation -------------------------------------------------------------------
def _is_number(value):
    """A real number (Python or NumPy scalar, Keras convention), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _check_temperature(value, who):
    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
        return value
    if not _is_number(value) or not math.isfinite(value) or not value > 0:
        raise ValueError(
            f"{who}: `temperature` must be a finite number > 0 (1 = the plain softmax; 2-4 soften it) "
            f"or a `keras.optimizers.schedules.LearningRateSchedule`. Received: temperature={value!r}. "
            f"Fix: pass e.g. temperature={DEFAULT_TEMPERATURE}."
        )
    return float(value)


def _check_alpha(value, who):
    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
        return value
    if not _is_number(value) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{who}: `alpha` (the weight of the label loss; 1 - alpha weighs the teacher's) must be "
            f"in [0, 1]. Received: alpha={value!r}. Fix: pass e.g. alpha={DEFAULT_ALPHA} "
            "(0: the teacher alone, 1: the labels alone)."
        )
    return float(value)


def _check_method(value, who):
    if value not in _METHODS:
        raise ValueError(f"{who}: `method` must be one of {_METHODS}. Received: method={value!r}")
    return str(value)


def _check_teacher_outputs(value, who):
    if value is not None and not (isinstance(value, str) and value in _TEACHER_OUTPUTS):
        raise ValueError(
            f"{who}: `teacher_outputs` must be None (detect), \"logits\" or \"probabilities\". "
            f"Received: teacher_outputs={value!r}"
        )
    return None if value is None else str(value)


# --- the loss math, shared by both paths --------------------------------------------
def _log_softmax(x, temperature, from_logits):
    x = ops.cast(x, "float32")
    if not from_logits:
        x = ops.log(ops.clip(x, 1e-7, 1.0))
    return ops.log_softmax(x / temperature, axis=-1)


def kd_loss(teacher, student, temperature=DEFAULT_TEMPERATURE, from_logits=True):
    """Hinton et al. (2015) knowledge distillation, per sample:
    `T**2 * KL(softmax(teacher / T) || softmax(student / T))`.

    The `T**2` keeps the gradient's scale independent of `T`.

    Example:
    >>> import numpy as np
    >>> t = np.array([[2.0, 0.0, -1.0]], "float32")
    >>> float(kd_loss(t, t, 2.0)[0])
    0.0
    """
    log_t = _log_softmax(teacher, temperature, from_logits)
    log_s = _log_softmax(student, temperature, from_logits)
    return (temperature**2) * ops.sum(ops.exp(log_t) * (log_t - log_s), axis=-1)


def logit_mse(teacher, student):
    """Mean squared difference of the outputs, per sample (Ba & Caruana, 2014).

    Example:
    >>> import numpy as np
    >>> float(logit_mse(np.array([[1.0, 3.0]], "float32"), np.array([[0.0, 1.0]], "float32"))[0])
    2.5
    """
    diff = ops.cast(teacher, "float32") - ops.cast(student, "float32")
    return ops.mean(ops.square(diff), axis=-1)


def _label_loss(labels, student, sparse, from_logits):
    if sparse:
        return keras.losses.sparse_categorical_crossentropy(
            ops.maximum(labels, 0.0), student, from_logits=from_logits)
    return keras.losses.categorical_crossentropy(labels, student, from_logits=from_logits)


def _check_student_output(y_pred, who):
    if len(y_pred.shape) != 2:
        raise ValueError(
            f"{who}: the student's output must be (batch, classes) for classification distillation, or "
            f"(batch, seq, vocab) logits with per-position targets. Received shape {tuple(y_pred.shape)}. Fix: "
            "distill a classification head, or a language model's (batch, seq, vocab) logits."
        )
    return y_pred.shape[-1]


def _width_mismatch(who, teacher_width, classes, where):
    return ValueError(
        f"{who}: the teacher outputs {teacher_width} values per sample ({where}) but the student "
        f"outputs {classes}: distillation compares them class by class, so both must have the same "
        f"classes. Received: teacher width {teacher_width}, student classes {classes}. Fix: distill "
        f"from a teacher with {classes} outputs, or give the student's last layer {teacher_width} units."
    )


def _unpack(y_true, classes, who):
    """`(labels, has_label, teacher logits or None, sparse)` from packed or plain targets.

    Packed targets (from `attach_teacher`) are `(batch, 2, K)`: one-hot labels
    over the teacher's logits. Plain labels are `(batch,)`, `(batch, 1)` (class
    indices, -1: none) or `(batch, classes)` (one-hot, all zeros: none)."""
    shape = tuple(y_true.shape)
    if len(shape) == 3 and shape[1] == 2:
        if shape[2] is not None and classes is not None and shape[2] != classes:
            raise _width_mismatch(who, shape[2], classes, f"targets from `attach_teacher` of shape {shape}")
        y = ops.cast(y_true, "float32")
        labels = y[:, 0, :]
        return labels, ops.cast(ops.sum(labels, axis=-1) > 0, "float32"), y[:, 1, :], False
    width = 1 if len(shape) < 2 else (shape[-1] if len(shape) == 2 else None)
    if width is not None and (width == 1 or width == classes):
        y = ops.cast(ops.reshape(y_true, (-1, width)), "float32")
        if width == 1:
            labels = y[:, 0]
            return labels, ops.cast(labels >= 0, "float32"), None, True
        return y, ops.cast(ops.sum(y, axis=-1) > 0, "float32"), None, False
    if who == "Distiller":
        raise ValueError(
            f"Distiller: the labels have shape {shape} but the student outputs {classes} classes: a Distiller "
            f"takes plain labels of shape (batch,), (batch, 1) (class indices) or (batch, {classes}) (one-hot). "
            f"Received: y of shape {shape}. Fix: pass class indices or one-hot labels as `y`."
        )
    raise ValueError(
        f"{who}: the targets have shape {shape} and the student outputs {classes} classes, so they are "
        f"neither plain labels (shape (batch,), (batch, 1) or (batch, {classes})) nor targets from "
        f"`attach_teacher` (shape (batch, 2, {classes})). Received: targets of shape {shape}. Fix: make the "
        "targets with `tfopt.distillation.attach_teacher(data, teacher)` from a teacher with "
        f"{classes} outputs (2-D targets packed by an older tfopt must be made again)."
    )


def _check_schedules_readable(temperature, alpha):
    """Refuses a `DistillationLoss` schedule where a loss cannot read the step: JAX's
    stateless train step passes the optimizer's state (its step) to the optimizer alone."""
    if not _backend.stateless_steps():
        return
    for name, value in (("temperature", temperature), ("alpha", alpha)):
        if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
            raise ValueError(
                f"DistillationLoss: `{name}` is a schedule of the training step, and under the JAX backend a "
                "loss cannot read the step: JAX's stateless train step gives the optimizer's state (its step) "
                f"to the optimizer alone. Received: {name}={value!r} with KERAS_BACKEND='jax'. Fix: distill "
                f"with `tfopt.distillation.Distiller(teacher, student, {name}=...)`, which reads its "
                f"optimizer's step under JAX too; or pass a constant {name}; or use KERAS_BACKEND=tensorflow.")


def _value(v, step):
    if isinstance(v, keras.optimizers.schedules.LearningRateSchedule):
        if step is None:
            raise ValueError(
                "A distillation temperature or alpha given as a schedule needs the training step. "
                "Add `tfopt.distillation.DistillationSchedule()` to `fit`'s callbacks "
                "(`Distiller` binds its own optimizer's step)."
            )
        return ops.cast(v(step), "float32")
    return v


def _as_logits(probabilities):
    """`log(p)`: logits up to a constant per sample, so `softmax(log(p) / T)` is
    the teacher's distribution softened by `T` (zeros are clipped to the
    smallest float32)."""
    return ops.log(ops.clip(ops.cast(probabilities, "float32"), _TINY, 1.0))


def _distillation_term(teacher_logits, y_pred, temperature, method, from_logits):
    """Per sample: the teacher's logits against the student's outputs."""
    if method == "kd":
        log_t = _log_softmax(teacher_logits, temperature, True)
        log_s = _log_softmax(y_pred, temperature, from_logits)
        return (temperature**2) * ops.sum(ops.exp(log_t) * (log_t - log_s), axis=-1)
    if method == "reverse_kl":
        log_t = _log_softmax(teacher_logits, temperature, True)
        log_s = _log_softmax(y_pred, temperature, from_logits)
        return (temperature**2) * ops.sum(ops.exp(log_s) * (log_s - log_t), axis=-1)
    if from_logits:
        return logit_mse(teacher_logits, y_pred)
    return logit_mse(ops.softmax(ops.cast(teacher_logits, "float32"), axis=-1), y_pred)


def distillation_per_sample(y_true, y_pred, temperature, alpha, method, from_logits, step=None,
                            who="DistillationLoss"):
    """The per-sample loss both paths use (see the module docstring).

    `y_true` is plain labels or `attach_teacher`'s packed targets (whose
    teacher part is logits); `from_logits` is about the student's outputs."""
    classes = _check_student_output(y_pred, who)
    labels, has_label, teacher, sparse = _unpack(y_true, classes, who)
    label_loss = _label_loss(labels, y_pred, sparse, from_logits)
    if teacher is None:  # plain labels, e.g. `evaluate` on test data
        return label_loss
    temperature, alpha = _value(temperature, step), _value(alpha, step)
    teach = _distillation_term(teacher, y_pred, temperature, method, from_logits)
    return alpha * has_label * label_loss + (1.0 - alpha) * teach


def _forget_step_functions(model):
    """Drops the step functions being traced, which an error is about to interrupt: fixed, the next `fit`
    traces anew (a retrace of the interrupted function could not create the optimizer's variables)."""
    for attr in ("train_function", "test_function", "predict_function"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)


#: Keras metrics (names and classes) that compare `y_pred` with the whole target.
_ACCURACIES = {"accuracy", "acc", "sparse_categorical_accuracy", "categorical_accuracy",
               "sparse_top_k_categorical_accuracy", "top_k_categorical_accuracy", "binary_accuracy",
               "Accuracy", "SparseCategoricalAccuracy", "CategoricalAccuracy", "SparseTopKCategoricalAccuracy",
               "TopKCategoricalAccuracy", "BinaryAccuracy"}


def _metric_names(metrics):
    """The names of compiled metrics as `get_compile_config` gives them (per output: lists or dicts)."""
    if isinstance(metrics, str):
        return [metrics]
    if isinstance(metrics, dict) and "class_name" in metrics:  # one serialized metric
        return [metrics["class_name"]]
    if isinstance(metrics, dict):
        return [name for value in metrics.values() for name in _metric_names(value)]
    if isinstance(metrics, (list, tuple)):
        return [name for value in metrics for name in _metric_names(value)]
    return [] if metrics is None else [type(metrics).__name__]


def _compile_config(model):
    """`model.get_compile_config()` (or {}), read while a step is traced. It serializes the
    optimizer, so it runs eagerly; under JAX, whose `fit` empties the optimizer's variables
    (the train step carries their values apart), it reads stand-in zeros for them (only
    the metrics are used)."""
    optimizer = getattr(model, "optimizer", None)
    if not _backend.stateless_steps() or optimizer is None:
        return _backend.in_init_scope(model.get_compile_config) or {}
    import jax  # the JAX backend only (stateless_steps)

    # (Eagerly: inside a jit trace, even constants are traced, and serializing reads values.)
    with jax.ensure_compile_time_eval():
        stand_ins = [(v, np.zeros(v.shape, v.dtype)) for v in optimizer.variables]
        with keras.StatelessScope(state_mapping=stand_ins):
            return model.get_compile_config() or {}


def _accuracy_metrics(model):
    """`(argument, names)`: `model`'s compiled accuracy metrics, which cannot read packed targets, and the
    `compile` argument they came in ("metrics", or "weighted_metrics" when only there)."""
    config = _compile_config(model)
    plain = [name for name in _metric_names(config.get("metrics")) if name in _ACCURACIES]
    weighted = [name for name in _metric_names(config.get("weighted_metrics")) if name in _ACCURACIES]
    return ("metrics", plain + weighted) if plain else ("weighted_metrics", weighted)


@keras.saving.register_keras_serializable(package="tfopt")
class DistillationLoss(keras.losses.Loss):
    """Label loss plus distillation from cached teacher outputs, for `compile`.

    Use with targets from `attach_teacher`: per sample,
    `alpha * crossentropy(label, student) + (1 - alpha) * distill(teacher, student)`;
    samples without a label (a transfer set) get the distillation term only.
    Given plain labels (as in `evaluate` on test data), it is the
    crossentropy alone.

    When is caching valid? When each input the student sees is exactly one
    the teacher saw: no random augmentation, dropout-free teacher (it runs
    with `training=False`). With augmentation applied in the input pipeline,
    use `Distiller`, which runs the teacher on each augmented batch.

    Args:
        temperature: softening of both softmaxes (> 0), or a
            `keras.optimizers.schedules.LearningRateSchedule` of the step
            (with `DistillationSchedule()` among the callbacks; not under
            the JAX backend, where a loss cannot read the step: use
            `Distiller` there).
        alpha: weight of the label loss in [0, 1] (or a schedule).
        method: "kd" (Hinton: `T**2`-scaled KL(teacher || student) of
            softened softmaxes), "reverse_kl" (`T**2`-scaled KL(student ||
            teacher): mode-seeking, often preferred for language models) or
            "mse" (squared difference of logits; `temperature` unused).
        from_logits: the student outputs logits (True) or probabilities
            (False). The cached teacher outputs are always logits:
            `attach_teacher` converts a teacher's probabilities with `log`.
            A Functional or Sequential student whose final activation is
            softmax is read as probabilities whatever this says (with a
            `UserWarning` when it says True).

    Targets: `attach_teacher`'s `(n, 2, classes)` arrays, whose teacher width
    must be the student's number of classes (else a `ValueError` names both
    at the first call), or plain labels: class indices `(n,)`/`(n, 1)` or
    one-hot `(n, classes)`. Plain labels are for `evaluate`: in `fit` they
    would train on the labels alone, so the first training step raises a
    `ValueError` that says to use `attach_teacher`. Keras's `"accuracy"`
    metrics cannot read packed targets (Keras fails with "Cannot squeeze
    axis=-1"): compiled with them, the first step on packed targets raises
    a `ValueError` naming `LabelAccuracy`, the metric to use instead (it
    reads packed targets and plain labels alike). These checks read the
    model whose `train_step`/`test_step` calls the loss, once per trace.

    Sequence models (language models): with `attach_teacher`'s per-position
    targets `(n, seq, 2, k + 1)` (the teacher's top-k logits, see
    `attach_teacher(..., top_k=)`) and a student that outputs
    `(batch, seq, vocab)` logits, the loss is per position: `alpha *`
    next-token crossentropy `+ (1 - alpha) *` the KL over the teacher's
    top-k support (its softmax renormalized over the top-k, against the
    student's log-probabilities there; exact when `k` is the vocabulary),
    averaged over the positions that count: those of the padding mask cached
    with the targets, times `fit`'s `sample_weight` of shape `(batch, seq)`.
    Plain labels `(batch, seq)` (next tokens, -1: none) give the
    crossentropy alone, for `evaluate`.

    Example:
    >>> import keras, numpy as np, tfopt
    >>> x = np.random.default_rng(0).standard_normal((32, 8)).astype("float32")
    >>> y = np.arange(32) % 3
    >>> teacher = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    >>> x_fit, y_fit = tfopt.distillation.attach_teacher((x, y), teacher)
    >>> y_fit.shape  # per sample: one-hot label, then the teacher's logits
    (32, 2, 3)
    >>> student = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    >>> student.compile("adam", loss=tfopt.distillation.DistillationLoss(),
    ...                 metrics=[tfopt.distillation.LabelAccuracy()])
    >>> _ = student.fit(x_fit, y_fit, epochs=1, verbose=0)
    >>> _ = student.evaluate(x, y, verbose=0)  # plain labels work too
    """

    def __init__(self, temperature=DEFAULT_TEMPERATURE, alpha=DEFAULT_ALPHA, method="kd", from_logits=True,
                 name="distillation_loss", reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.temperature = _check_temperature(temperature, "DistillationLoss")
        self.alpha = _check_alpha(alpha, "DistillationLoss")
        _check_schedules_readable(self.temperature, self.alpha)
        self.method = _check_method(method, "DistillationLoss")
        self.from_logits = bool(from_logits)
        self.step = None  # the optimizer's step, bound by DistillationSchedule
        self._warned = set()  # names of softmax students already warned about

    def bind_step(self, step):
        """Makes temperature/alpha schedules read `step` (a variable) in-graph."""
        self.step = step

    def __call__(self, y_true, y_pred, sample_weight=None):
        y_true, y_pred = ops.convert_to_tensor(y_true), ops.convert_to_tensor(y_pred)
        if len(y_pred.shape) != 3 and not sequence.is_packed(tuple(y_true.shape)):
            return super().__call__(y_true, y_pred, sample_weight=sample_weight)
        # Per-position targets: a scalar averaged over the positions that count (a Keras reduction
        # would divide by every position, padding included).
        from_logits = self._check_model(y_true)
        return sequence.sequence_loss(
            y_true, y_pred, _value(self.temperature, self.step), _value(self.alpha, self.step), self.method,
            sample_weight=sample_weight, from_logits=from_logits)

    def call(self, y_true, y_pred):
        return distillation_per_sample(y_true, y_pred, self.temperature, self.alpha, self.method,
                                       self._check_model(y_true), self.step)

    def _check_model(self, y_true):
        """`from_logits` for the model whose `train_step`/`test_step` calls this loss, after the checks
        that need that model: plain labels in `fit`, metrics that cannot read packed targets, a student
        ending in softmax. Runs when the step is traced (once per graph), not at every step."""
        model, step = _keras_internal.stepping_model()
        if model is None or self not in keras.tree.flatten(getattr(model, "loss", None) or []):
            return self.from_logits  # called directly, or as a Distiller's supervised loss
        shape = tuple(y_true.shape)
        packed = (len(shape) == 3 and shape[1] == 2) or sequence.is_packed(shape)
        if step == "train_step" and not packed:
            _forget_step_functions(model)
            raise ValueError(
                f"DistillationLoss: `fit` of model '{model.name}' received plain labels (targets of shape "
                f"{shape}), not the packed targets of `attach_teacher`, so the student would train on the "
                f"labels alone, with no distillation and no teacher. Received: y of shape {shape}. Fix: cache "
                "the teacher's outputs with `x_fit, y_fit = tfopt.distillation.attach_teacher((x, y), teacher)` "
                "and fit on (x_fit, y_fit), or distill online with `tfopt.distillation.Distiller(teacher, "
                "student)`. (Plain labels are fine for `evaluate`.)"
            )
        if packed:
            argument, unreadable = _accuracy_metrics(model)
            if unreadable:
                _forget_step_functions(model)
                default = (" (keras-hub tasks' `compile` adds SparseCategoricalAccuracy there unless given "
                           "weighted_metrics)" if argument == "weighted_metrics" else "")
                raise ValueError(
                    f"DistillationLoss: model '{model.name}' is compiled with {argument} {unreadable}{default}, "
                    f"which compare the student's outputs with the whole target, but the targets are the packed "
                    f"targets of `attach_teacher` (shape {shape}: label and teacher outputs), so they would fail "
                    f"(\"Cannot squeeze axis=-1\") or count wrong. Received: {argument}={unreadable}. Fix: compile "
                    f"with `{argument}=[tfopt.distillation.LabelAccuracy()]`, which reads the labels inside packed "
                    "targets (and plain labels too)."
                )
        if self.from_logits and _ends_in_softmax(model):
            if model.name in self._warned:
                return False
            self._warned.add(model.name)
            warnings.warn(
                f"DistillationLoss: the student '{model.name}' outputs probabilities, not logits (its final "
                "activation is softmax), but from_logits=True. Its outputs are read as probabilities (their "
                "log acts as logits), as from_logits=False would. To silence this warning, pass "
                "`DistillationLoss(from_logits=False)`, or remove the student's final softmax.",
                UserWarning, stacklevel=2)
            return False
        return self.from_logits

    def get_config(self):
        def ser(v):
            return keras.saving.serialize_keras_object(v) if not isinstance(v, float) else v

        return {**super().get_config(), "temperature": ser(self.temperature), "alpha": ser(self.alpha),
                "method": self.method, "from_logits": self.from_logits}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("temperature", "alpha"):
            if isinstance(config.get(key), dict):
                config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)


@keras.saving.register_keras_serializable(package="tfopt")
class LabelAccuracy(keras.metrics.Metric):
    """Top-1 accuracy against the labels inside packed distillation targets
    (`attach_teacher`'s `(n, 2, classes)`; samples without a label are
    skipped), or against plain labels (class indices, -1 skipped, or one-hot).
    For a sequence student (`(batch, seq, vocab)` outputs) it is the
    next-token accuracy over the positions that count (packed sequence
    targets' padding mask, labels not -1, `sample_weight`).

    Example:
    >>> import numpy as np
    >>> m = LabelAccuracy()
    >>> packed = np.array([[[0.0, 1.0], [0.2, 0.9]],    # label 1, teacher logits
    ...                    [[0.0, 0.0], [0.5, 0.1]]])   # no label
    >>> m.update_state(packed, np.array([[0.0, 1.0], [0.0, 1.0]]))
    >>> float(m.result())
    1.0
    """

    def __init__(self, name="label_accuracy", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.correct = self.add_variable(shape=(), initializer="zeros", name="correct")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true, y_pred = ops.convert_to_tensor(y_true), ops.convert_to_tensor(y_pred)
        if len(y_pred.shape) == 3:  # per position: packed sequence targets or next-token labels
            if sequence.is_packed(tuple(y_true.shape)):
                labels, counted = sequence.unpack(y_true)[:2]
            else:
                sequence.check_labels(tuple(y_true.shape), tuple(y_pred.shape), "LabelAccuracy")
                labels, counted = ops.cast(ops.reshape(y_true, ops.shape(y_true)[:2]), "float32"), None
            weight = sequence.position_weights(labels, counted, ops.cast(labels >= 0, "float32"), sample_weight)
            hit = ops.cast(ops.equal(ops.cast(ops.argmax(y_pred, axis=-1), "float32"), labels), "float32")
            self.correct.assign_add(ops.sum(hit * weight))
            self.count.assign_add(ops.sum(weight))
            return
        labels, has_label, _, sparse = _unpack(y_true, y_pred.shape[-1], "LabelAccuracy")
        target = labels if sparse else ops.cast(ops.argmax(labels, axis=-1), "float32")
        hit = ops.cast(ops.equal(ops.cast(ops.argmax(y_pred, axis=-1), "float32"), target), "float32")
        weight = has_label if sample_weight is None else has_label * ops.cast(
            ops.reshape(sample_weight, (-1,)), "float32")
        self.correct.assign_add(ops.sum(hit * weight))
        self.count.assign_add(ops.sum(weight))

    def result(self):
        return self.correct / ops.maximum(self.count, 1.0)

    def reset_state(self):
        self.correct.assign(0.0)
        self.count.assign(0.0)
