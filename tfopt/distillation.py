"""Teacher-student distillation in a plain `model.fit`.

Two ways, one loss:

- **Cached (offline)**: `attach_teacher(data, teacher)` runs the teacher once
  and returns data whose targets carry its outputs; `student.compile(
  loss=DistillationLoss(...))` and `student.fit` as usual. No wrapper model,
  and the teacher's cost is paid once instead of every epoch. Inputs without
  labels (a transfer set) are welcome: the teacher labels them.
- **Online**: `Distiller(teacher, student, ...)` is a Keras model that runs the
  teacher on every batch. Use it when the inputs change every epoch (random
  augmentation makes cached outputs stale), or for feature losses
  (`FeatureHint`, `AttentionTransfer`) that need intermediate activations.

Both compute `alpha * label_loss + (1 - alpha) * distillation_loss` per
sample with the same code, so the same batch gives the same loss either way.

Packed targets: `attach_teacher` stores, per sample, a `(2, classes)` array:
row 0 the label, one-hot (integer labels are converted; all zeros: no label,
as for label -1), row 1 the teacher's logits (probabilities are converted
with `log`, see below). Targets of shape `(n, 2, classes)` cannot be mistaken
for plain labels, which have shape `(n,)`, `(n, 1)` or `(n, classes)`:
`DistillationLoss` accepts those too, so `student.evaluate(x_test, y_test)`
works on ordinary test data, and it refuses packed targets whose teacher
width differs from the student's number of classes. Keras's `"accuracy"`
metric does not know the packing: use `LabelAccuracy()`.

Teacher outputs are used as logits. A teacher that outputs probabilities (a
final softmax) is detected (rows non-negative and summing to 1, or a final
softmax activation) and its outputs converted with `log`, which gives the
same softened distribution `softmax(log(p) / T)` as its logits would; a
`UserWarning` says so unless `teacher_outputs="probabilities"` is passed.
"""

import math
import numbers
import warnings

import keras
import numpy as np
from keras import ops

from tfopt import _keras_internal, strategies
from tfopt._config import Configurable
from tfopt.callbacks import _common

__all__ = [
    "DistillationLoss",
    "Distiller",
    "attach_teacher",
    "FeatureHint",
    "AttentionTransfer",
    "LabelAccuracy",
    "DistillationSchedule",
    "kd_loss",
    "logit_mse",
    "DEFAULT_TEMPERATURE",
    "DEFAULT_ALPHA",
]

#: Defaults chosen on the digits benchmark (`benchmarks/distillation.py
#: --sweep`, tiny 1.2k-parameter student, 3 seeds): on the same 200 labelled
#: digits, T=4 with alpha=0.5 gained 1.3 points over labels alone, T=1 and T=2
#: 0.5; no setting in the grid did worse than labels alone. Keep alpha well
#: above 0 for tiny students: most of the weight on a very soft teacher
#: (alpha 0.1) is the setting reported to cost small students accuracy.
DEFAULT_TEMPERATURE = 4.0
DEFAULT_ALPHA = 0.5

_METHODS = ("kd", "mse")
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
            f"{who}: the student's output must be (batch, classes) for distillation. "
            f"Received shape {tuple(y_pred.shape)}. Flatten it, or distill a classification head."
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
            (with `DistillationSchedule()` among the callbacks).
        alpha: weight of the label loss in [0, 1] (or a schedule).
        method: "kd" (Hinton: `T**2`-scaled KL of softened softmaxes) or
            "mse" (squared difference of logits; `temperature` unused).
        from_logits: the student outputs logits (True) or probabilities
            (False). The cached teacher outputs are always logits:
            `attach_teacher` converts a teacher's probabilities with `log`.

    Targets: `attach_teacher`'s `(n, 2, classes)` arrays, whose teacher width
    must be the student's number of classes (else a `ValueError` names both
    at the first call), or plain labels: class indices `(n,)`/`(n, 1)` or
    one-hot `(n, classes)`.

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
        self.method = _check_method(method, "DistillationLoss")
        self.from_logits = bool(from_logits)
        self.step = None  # the optimizer's step, bound by DistillationSchedule

    def bind_step(self, step):
        """Makes temperature/alpha schedules read `step` (a variable) in-graph."""
        self.step = step

    def call(self, y_true, y_pred):
        return distillation_per_sample(y_true, y_pred, self.temperature, self.alpha, self.method,
                                       self.from_logits, self.step)

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


# --- caching the teacher -------------------------------------------------------------
def _as_2d(a):
    a = np.asarray(a)
    return a.reshape(len(a), -1) if a.ndim != 2 else a


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else (next(iter(x.values())) if isinstance(x, dict) else x)


def _length(x):
    return len(_first(x))


def _concat(parts):
    first = parts[0]
    if isinstance(first, (list, tuple)):
        return type(first)(np.concatenate([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: np.concatenate([p[k] for p in parts]) for k in first}
    return np.concatenate(parts)


def _dataset_to_arrays(dataset):
    xs, ys, labelled = [], [], None
    for element in dataset.as_numpy_iterator():
        has_y = isinstance(element, tuple) and len(element) >= 2
        if labelled is None:
            labelled = has_y
        if has_y != labelled:
            raise ValueError("attach_teacher: the dataset mixes (x, y) and x-only elements.")
        xs.append(element[0] if has_y else element)
        if has_y:
            ys.append(element[1])
    if not xs:
        raise ValueError("attach_teacher: the dataset is empty.")
    return _concat(xs), (np.concatenate(ys) if labelled else None), len(_first(xs[0]))


def _parts(x):
    """`(structure, [arrays])` of model inputs: one array, a list/tuple, or a dict."""
    if isinstance(x, dict):
        return ("dict", tuple(sorted(x))), [x[k] for k in sorted(x)]
    if isinstance(x, (list, tuple)):
        return ("list", len(x)), list(x)
    return ("array", 1), [x]


def _check_unlabelled(x, unlabelled):
    """Refuses unlabelled inputs that are not shaped like the labelled ones, before concatenating."""
    (kind_x, keys_x), parts_x = _parts(x)
    (kind_u, keys_u), parts_u = _parts(unlabelled)
    if (kind_x, keys_x) != (kind_u, keys_u):
        def describe(kind, keys):
            if kind == "dict":
                return f"a dict with keys {list(keys)}"
            return f"a list of {keys} arrays" if kind == "list" else "one array"

        raise ValueError(
            f"attach_teacher: `unlabelled` must be structured like the labelled inputs `x`, which are "
            f"{describe(kind_x, keys_x)}. Received: unlabelled as {describe(kind_u, keys_u)}. "
            "Fix: pass the unlabelled inputs in the same structure as x."
        )
    names = keys_x if kind_x == "dict" else range(len(parts_x))
    for name, px, pu in zip(names, parts_x, parts_u):
        shape_x, shape_u = tuple(np.shape(px)), tuple(np.shape(pu))
        if shape_x[1:] != shape_u[1:]:
            which = "" if kind_x == "array" else f" (input {name!r})"
            raise ValueError(
                f"attach_teacher: the unlabelled inputs{which} have shape {shape_u} but the labelled inputs "
                f"`x` have shape {shape_x}: each unlabelled sample must have the labelled samples' shape "
                f"{shape_x[1:]}. Received: unlabelled of shape {shape_u}. Fix: preprocess the unlabelled "
                f"inputs like x, to shape (n,) + {shape_x[1:]}."
            )


def _ends_in_softmax(model):
    """True when a Functional or Sequential `model`'s one output comes from a
    layer whose `activation` is softmax (nested models followed)."""
    if not isinstance(model, keras.Model) or not _keras_internal.is_graph_network(model):
        return False
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):  # an unbuilt Sequential
        return False
    if not outputs or len(outputs) != 1:
        return False
    layer = _keras_internal.producer(outputs[0])
    if isinstance(layer, keras.Model):
        return _ends_in_softmax(layer)
    activation = getattr(layer, "activation", None)
    return activation is keras.activations.softmax or getattr(activation, "__name__", None) == "softmax"


def _rows_are_probabilities(outputs):
    """Every row non-negative and summing to 1 within 1e-3 (a softmax's output)."""
    o = np.asarray(outputs, "float64")
    return (o.ndim == 2 and o.shape[0] > 0 and o.shape[1] > 1 and bool(np.all(o >= 0))
            and bool(np.all(np.abs(o.sum(axis=1) - 1.0) <= 1e-3)))


def _probabilities_warning(who, teacher_name, reason):
    return (
        f"{who}: the teacher{teacher_name} outputs probabilities, not logits ({reason}). Softened by a "
        "temperature, probabilities give nearly uniform targets, so they are converted with log() to act "
        "as logits (softmax(log(p) / T) is the teacher's distribution softened by T). To silence this "
        "warning, pass logits (remove the teacher's final softmax) or declare them with "
        '`teacher_outputs="probabilities"`.'
    )


def _teacher_logits(outputs, teacher, teacher_outputs):
    """attach_teacher's teacher outputs as float32 logits (probabilities converted with log)."""
    outputs = _as_2d(outputs).astype("float32")
    if teacher_outputs == "logits":
        return outputs
    if teacher_outputs == "probabilities":
        if outputs.size and outputs.min() < 0:
            raise ValueError(
                f"attach_teacher: `teacher_outputs=\"probabilities\"` but the teacher's outputs have negative "
                f"values (min {outputs.min():.4g}), so they are logits. Received: teacher_outputs="
                "'probabilities'. Fix: pass teacher_outputs=\"logits\", or leave it None to detect."
            )
    else:
        softmax = _ends_in_softmax(teacher)
        if not softmax and not _rows_are_probabilities(outputs):
            return outputs
        name = f" '{teacher.name}'" if isinstance(teacher, keras.Model) else ""
        reason = ("its final activation is softmax" if softmax else
                  f"each of its {len(outputs)} output rows is non-negative and sums to 1")
        warnings.warn(_probabilities_warning("attach_teacher", name, reason), UserWarning, stacklevel=3)
    return np.log(np.maximum(outputs, _TINY)).astype("float32")


def _model_classes(model):
    """The last dimension of a Functional/Sequential model's one 2-D output, or None if unknown."""
    if not isinstance(model, keras.Model) or not _keras_internal.is_graph_network(model):
        return None
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):  # an unbuilt Sequential
        return None
    if not outputs or len(outputs) != 1 or len(outputs[0].shape) != 2:
        return None
    return outputs[0].shape[-1]


def _student_classes(student):
    if student is None or isinstance(student, keras.Model):
        return _model_classes(student)
    if isinstance(student, numbers.Integral) and not isinstance(student, (bool, np.bool_)) and student > 0:
        return int(student)
    raise ValueError(
        "attach_teacher: `student` must be the student model or its number of classes (an int > 0). "
        f"Received: student={student!r}"
    )


def _pack(labels, logits):
    """`(n, 2, K)`: one-hot labels (all zeros: none) over the teacher's logits."""
    n, classes = logits.shape
    one_hot = np.zeros((n, classes), "float32")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] == 1):
            flat = labels.reshape(-1)
            if np.issubdtype(flat.dtype, np.floating) and not np.all(flat == np.round(flat)):
                raise ValueError(
                    f"attach_teacher: integer class labels expected; received {flat.dtype} labels such as "
                    f"{flat[flat != np.round(flat)][0]!r}. Fix: pass class indices (or -1 for none), or "
                    f"one-hot labels of shape (n, {classes})."
                )
            if flat.size and (flat.max() >= classes or flat.min() < -1):
                raise ValueError(
                    f"attach_teacher: labels must be class indices in [0, {classes}) (or -1 for none) for a "
                    f"teacher with {classes} outputs. Received labels from {flat.min()} to {flat.max()}."
                )
            index = flat.astype(np.int64)
            rows = np.nonzero(index >= 0)[0]
            one_hot[rows, index[rows]] = 1.0
        elif labels.ndim == 2 and labels.shape[1] == classes:
            one_hot = labels.astype("float32")
        else:
            raise ValueError(
                f"attach_teacher: labels of shape {labels.shape} fit neither integer classes (n,) nor one-hot "
                f"(n, {classes}) for a teacher with {classes} outputs."
            )
    return np.stack([one_hot, logits], axis=1)


def attach_teacher(data, teacher, unlabelled=None, batch_size=256, teacher_outputs=None, student=None):
    """Runs `teacher` once over `data` and returns it with the teacher's outputs in the targets.

    Args:
        data: `(x, y)` (arrays; `x` may be a list or dict of arrays for
            multi-input models; `y` integer classes or one-hot), `x` alone (a
            transfer set without labels), or a finite `tf.data.Dataset` of
            `(x, y)` or `x` batches.
        teacher: a Keras model (run with `training=False`, batched, under the
            strategy it was built in), or the teacher's outputs already
            computed (an array with one row per sample of `data`).
        unlabelled: extra inputs without labels (more samples the teacher
            labels), appended after `data`'s; shaped like `data`'s inputs.
        batch_size: the teacher's batch size (and the returned dataset's, for
            array inputs given as a dataset: its first batch's size).
        teacher_outputs: None (detect: outputs that are probabilities, from a
            final softmax or rows non-negative summing to 1, are converted
            with `log` with a warning), "logits" (use as they are), or
            "probabilities" (convert with `log`, no warning).
        student: optional, the student model (or its number of classes), to
            check now that the teacher outputs one value per student class;
            otherwise `DistillationLoss` checks at its first call.

    Returns:
        `(x, y_packed)` arrays for array inputs, or a `tf.data.Dataset` of
        `(x, y_packed)` batches for a dataset (held in memory). `y_packed` has
        shape `(n, 2, classes)`: per sample the one-hot label (all zeros: no
        label) and the teacher's logits. Use them with a student compiled
        with `DistillationLoss`.

    Caching is valid when the student will see exactly these inputs: not with
    random augmentation (use `Distiller`). Shuffling is fine.
    """
    import tensorflow as tf

    teacher_outputs = _check_teacher_outputs(teacher_outputs, "attach_teacher")
    classes = _student_classes(student)
    if classes is not None and _model_classes(teacher) not in (None, classes):
        raise _width_mismatch("attach_teacher", _model_classes(teacher), classes, f"teacher '{teacher.name}'")
    as_dataset = isinstance(data, tf.data.Dataset)
    if as_dataset:
        x, y, batch_size = _dataset_to_arrays(data)
    elif isinstance(data, tuple) and len(data) == 2:
        x, y = data
    elif isinstance(data, tuple):
        raise ValueError(f"attach_teacher: `data` must be (x, y) or x; received a tuple of {len(data)}.")
    else:
        x, y = data, None
    if y is not None and len(y) != _length(x):
        raise ValueError(f"attach_teacher: x has {_length(x)} samples but y has {len(y)}.")
    if unlabelled is not None:
        _check_unlabelled(x, unlabelled)
        n_extra = _length(unlabelled)
        x = _concat([x, unlabelled])
        if y is not None:
            y = np.asarray(y)
            if y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1):
                y = y.reshape(-1)
                if not np.issubdtype(y.dtype, np.floating):
                    y = y.astype(np.int64)  # unsigned labels could not hold -1
                y = np.concatenate([y, np.full((n_extra,), -1, y.dtype)])
            else:
                y = np.concatenate([y, np.zeros((n_extra,) + y.shape[1:], y.dtype)])
    n = _length(x)
    if isinstance(teacher, keras.Model):
        outputs = teacher.predict(x, batch_size=batch_size, verbose=0)
        if isinstance(outputs, (list, tuple, dict)):
            raise ValueError(
                "attach_teacher: the teacher has several outputs; distillation needs one "
                "(batch, classes) output. Wrap it in a model that returns the head to distill."
            )
    else:
        outputs = np.asarray(teacher)
        if len(outputs) != n:
            raise ValueError(
                f"attach_teacher: the cached teacher outputs have {len(outputs)} rows but the data has "
                f"{n} samples{' (unlabelled included)' if unlabelled is not None else ''}. Recompute "
                "them on exactly these inputs, in this order."
            )
    if not np.issubdtype(np.asarray(outputs).dtype, np.floating):
        raise ValueError(
            f"attach_teacher: the teacher's outputs are {np.asarray(outputs).dtype}, not floats; "
            "distillation needs logits or probabilities."
        )
    logits = _teacher_logits(outputs, teacher, teacher_outputs)
    if classes is not None and logits.shape[1] != classes:
        raise _width_mismatch("attach_teacher", logits.shape[1], classes,
                              f"teacher outputs of shape {tuple(np.shape(outputs))}")
    packed = _pack(y, logits)
    if as_dataset:
        return tf.data.Dataset.from_tensor_slices((x, packed)).batch(batch_size)
    return x, packed


# --- feature losses (online only) ------------------------------------------------------
class _FeatureLoss(Configurable):
    def __init__(self, teacher_layer, student_layer, weight=1.0):
        for name, value in (("teacher_layer", teacher_layer), ("student_layer", student_layer)):
            if not isinstance(value, str):
                raise ValueError(f"{type(self).__name__}: `{name}` must be a layer name. Received: {value!r}")
        if not _is_number(weight) or not math.isfinite(weight) or weight < 0:
            raise ValueError(
                f"{type(self).__name__}: `weight` must be a finite number >= 0. Received: weight={weight!r}. "
                "Fix: pass e.g. weight=1.0 (0 turns this loss off).")
        self.teacher_layer = teacher_layer
        self.student_layer = student_layer
        self.weight = float(weight)

    def get_config(self):
        return {"teacher_layer": self.teacher_layer, "student_layer": self.student_layer, "weight": self.weight}

    def make_projection(self, teacher_shape, student_shape):
        return None


@keras.saving.register_keras_serializable(package="tfopt")
class FeatureHint(_FeatureLoss):
    """FitNets hint loss (Romero et al., 2015): mean squared difference between
    a teacher layer's output and a student layer's, through a learned linear
    projection (a Dense on the channel axis) when their widths differ. Other
    dimensions (e.g. spatial size) must match.

    Example:
    >>> FeatureHint("teacher_block_3", "student_block_2").get_config()["weight"]
    1.0
    """

    def make_projection(self, teacher_shape, student_shape):
        if tuple(teacher_shape[1:-1]) != tuple(student_shape[1:-1]):
            raise ValueError(
                f"FeatureHint: teacher layer '{self.teacher_layer}' outputs {tuple(teacher_shape)} and "
                f"student layer '{self.student_layer}' {tuple(student_shape)}; all but the last "
                "(channel) dimension must match. Pick layers at the same resolution."
            )
        if teacher_shape[-1] == student_shape[-1]:
            return None
        return keras.layers.Dense(teacher_shape[-1], use_bias=False, name=f"hint_{self.student_layer}")

    def __call__(self, teacher, student):
        return ops.mean(ops.square(ops.cast(teacher, "float32") - ops.cast(student, "float32")))


@keras.saving.register_keras_serializable(package="tfopt")
class AttentionTransfer(_FeatureLoss):
    """Attention transfer (Zagoruyko & Komodakis, 2017) between conv feature
    maps: each map's spatial attention `mean_c |F|**p`, L2-normalized, and the
    mean squared distance between teacher's and student's. Channel counts may
    differ; spatial sizes must match.

    Example:
    >>> AttentionTransfer("t_conv", "s_conv", p=2).get_config()["p"]
    2
    """

    def __init__(self, teacher_layer, student_layer, weight=1.0, p=2):
        super().__init__(teacher_layer, student_layer, weight)
        if not _is_number(p) or not math.isfinite(p) or p <= 0:
            raise ValueError(f"AttentionTransfer: `p` must be a finite number > 0 (2 is usual). Received: p={p!r}")
        self.p = int(p) if float(p).is_integer() else float(p)

    def get_config(self):
        return {**super().get_config(), "p": self.p}

    def make_projection(self, teacher_shape, student_shape):
        if len(teacher_shape) < 3 or tuple(teacher_shape[1:-1]) != tuple(student_shape[1:-1]):
            raise ValueError(
                f"AttentionTransfer: needs conv feature maps of the same spatial size; teacher layer "
                f"'{self.teacher_layer}' outputs {tuple(teacher_shape)}, student layer "
                f"'{self.student_layer}' {tuple(student_shape)}."
            )
        return None

    def _attention(self, f):
        f = ops.cast(f, "float32")
        a = ops.mean(ops.abs(f) ** self.p, axis=-1)
        a = ops.reshape(a, (ops.shape(a)[0], -1))
        return a / ops.maximum(ops.sqrt(ops.sum(ops.square(a), axis=-1, keepdims=True)), 1e-12)

    def __call__(self, teacher, student):
        return ops.mean(ops.square(self._attention(teacher) - self._attention(student)))


# --- online ------------------------------------------------------------------------------
def _layer_output(model, name, role):
    names = [layer.name for layer in model.layers]
    if name not in names:
        raise ValueError(
            f"Distiller: the {role} has no layer named '{name}'. Its layers are: {names}"
        )
    return model.get_layer(name).output


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

    Args:
        teacher: a trained Keras model with one (batch, classes) output.
        student: a Keras model with the same output shape (a different
            number of classes is a `ValueError` at construction).
        temperature, alpha, method: as in `DistillationLoss`.
        from_logits: the student outputs logits (True) or probabilities
            (False; then the teacher is read as probabilities too unless
            `teacher_outputs="logits"`).
        losses: feature losses, e.g. `[FeatureHint("t_block", "s_block", weight=0.1)]`.
        teacher_outputs: None (detect), "logits" or "probabilities". The
            teacher's probabilities are converted with `log` to act as
            logits. None checks the teacher's final layer at construction: a
            softmax activation means probabilities (with a `UserWarning`
            when `from_logits=True`); otherwise `from_logits` decides.

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

    def __init__(self, teacher, student, temperature=DEFAULT_TEMPERATURE, alpha=DEFAULT_ALPHA, method="kd",
                 from_logits=True, losses=None, teacher_outputs=None, name="distiller", **kwargs):
        super().__init__(name=name, **kwargs)
        for role, model in (("teacher", teacher), ("student", student)):
            if not isinstance(model, keras.Model):
                raise TypeError(f"Distiller: `{role}` must be a Keras 3 model. Received: {type(model).__name__}")
        self.temperature = _check_temperature(temperature, "Distiller")
        self.alpha = _check_alpha(alpha, "Distiller")
        self.method = _check_method(method, "Distiller")
        self.from_logits = bool(from_logits)
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
        if teacher_outputs is None:
            if _ends_in_softmax(teacher):
                teacher_outputs = "probabilities"
                if self.from_logits:
                    warnings.warn(_probabilities_warning(
                        "Distiller", f" '{teacher.name}'", "its final activation is softmax"), UserWarning,
                        stacklevel=2)
            else:
                teacher_outputs = "logits" if self.from_logits else "probabilities"
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
        if t is not None and s is not None:
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
        optimizer = getattr(self, "optimizer", None)
        return None if optimizer is None else optimizer.iterations

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
        if teacher_feats is not None and student_feats is not None:
            for f, projection, t, s in zip(self.feature_losses, self.projections, teacher_feats, student_feats):
                if projection is not None:
                    s = projection(s)
                total = total + f.weight * f(ops.stop_gradient(t), s)
        if self.student.losses:  # the student's regularizers (not the frozen teacher's)
            total = total + ops.sum(self.student.losses)
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


class DistillationSchedule(keras.callbacks.Callback):
    """Lets a `DistillationLoss` (or `Distiller`) whose `temperature` or `alpha`
    is a `keras.optimizers.schedules.LearningRateSchedule` read the step: the
    model's `optimizer.iterations`, in-graph (exact with
    `steps_per_execution > 1`).

    Example:
    >>> import keras, tfopt
    >>> temperature = keras.optimizers.schedules.PolynomialDecay(4.0, 1000, 1.0)
    >>> loss = tfopt.distillation.DistillationLoss(temperature=temperature)
    >>> callback = tfopt.distillation.DistillationSchedule()  # for fit(callbacks=[...])
    """

    def on_train_begin(self, logs=None):
        strategies.check(self.model)
        losses = [loss for loss in keras.tree.flatten(getattr(self.model, "loss", None) or [])
                  if isinstance(loss, DistillationLoss)]
        if isinstance(self.model, Distiller):
            return  # reads its optimizer's step itself
        if not losses:
            raise ValueError(
                "DistillationSchedule: the model is not compiled with a `DistillationLoss` "
                "(and is not a `Distiller`), so there is no schedule to drive."
            )
        step = self.model.optimizer.iterations
        if any(loss.step is not step for loss in losses):
            for loss in losses:
                loss.bind_step(step)
            _common.retrace(self.model)  # the losses now read the step: a new graph
