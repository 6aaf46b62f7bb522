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

Packed targets: `attach_teacher` stores, per sample, the label then the
teacher's outputs: `[label, t_1, ..., t_K]` for integer labels (label -1:
none) or `[one-hot (K), t_1, ..., t_K]` for one-hot labels (all zeros: none).
`DistillationLoss` also accepts plain labels (width 1 or K), so
`student.evaluate(x_test, y_test)` works on ordinary test data. Keras's
`"accuracy"` metric does not know the packing: use `LabelAccuracy()`.
"""

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


# --- validation -------------------------------------------------------------------
def _check_temperature(value, who):
    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(
            f"{who}: `temperature` must be a number > 0 (1 = the plain softmax; 2-4 soften it) "
            f"or a `keras.optimizers.schedules.LearningRateSchedule`. Received: temperature={value!r}"
        )
    return float(value)


def _check_alpha(value, who):
    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{who}: `alpha` (the weight of the label loss; 1 - alpha weighs the teacher's) must be "
            f"in [0, 1]. Received: alpha={value!r}"
        )
    return float(value)


def _check_method(value, who):
    if value not in _METHODS:
        raise ValueError(f"{who}: `method` must be one of {_METHODS}. Received: method={value!r}")
    return value


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


def _unpack(y_true, classes, who):
    """(labels, has_label, teacher or None, sparse) from packed or plain targets."""
    width = y_true.shape[-1] if len(y_true.shape) > 1 else 1
    if width is None:
        raise ValueError(f"{who}: the targets' last dimension must be known; received shape {tuple(y_true.shape)}.")
    y = ops.cast(ops.reshape(y_true, (-1, width)), "float32")
    if width == 1:
        labels = y[:, 0]
        return labels, ops.cast(labels >= 0, "float32"), None, True
    if width == classes + 1:
        labels = y[:, 0]
        return labels, ops.cast(labels >= 0, "float32"), y[:, 1:], True
    if width == classes:
        return y, ops.cast(ops.sum(y, axis=-1) > 0, "float32"), None, False
    if width == 2 * classes:
        labels = y[:, :classes]
        return labels, ops.cast(ops.sum(labels, axis=-1) > 0, "float32"), y[:, classes:], False
    raise ValueError(
        f"{who}: the targets have {width} columns per sample but the student outputs {classes} "
        f"values, so they are neither labels (1 or {classes} columns) nor labels plus the "
        f"teacher's outputs ({classes + 1} or {2 * classes} columns). Make the targets with "
        "`tfopt.distillation.attach_teacher(data, teacher)`, from a teacher whose output has "
        f"{classes} values like the student's."
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


def distillation_per_sample(y_true, y_pred, temperature, alpha, method, from_logits, step=None,
                            who="DistillationLoss"):
    """The per-sample loss both paths use (see the module docstring)."""
    if len(y_pred.shape) != 2:
        raise ValueError(
            f"{who}: the student's output must be (batch, classes) for distillation. "
            f"Received shape {tuple(y_pred.shape)}. Flatten it, or distill a classification head."
        )
    classes = y_pred.shape[-1]
    labels, has_label, teacher, sparse = _unpack(y_true, classes, who)
    label_loss = _label_loss(labels, y_pred, sparse, from_logits)
    if teacher is None:  # plain labels, e.g. `evaluate` on test data
        return label_loss
    temperature, alpha = _value(temperature, step), _value(alpha, step)
    if method == "kd":
        teach = kd_loss(teacher, y_pred, temperature, from_logits)
    else:
        teach = logit_mse(teacher, y_pred)
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
        from_logits: the student and teacher output logits (True) or
            probabilities (False).

    Example:
    >>> import keras, numpy as np, tfopt
    >>> x = np.random.default_rng(0).standard_normal((32, 8)).astype("float32")
    >>> y = np.arange(32) % 3
    >>> teacher = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    >>> x_fit, y_fit = tfopt.distillation.attach_teacher((x, y), teacher)
    >>> y_fit.shape
    (32, 4)
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
    (samples without a label are skipped), or against plain labels.

    Example:
    >>> import numpy as np
    >>> m = LabelAccuracy()
    >>> m.update_state(np.array([[1, 0.0, 0.0], [-1, 0.0, 0.0]]), np.array([[0.0, 1.0], [1.0, 0.0]]))
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


def _pack(labels, teacher_outputs, classes):
    teacher_outputs = _as_2d(teacher_outputs).astype("float32")
    n = len(teacher_outputs)
    if labels is None:
        return np.concatenate([np.full((n, 1), -1.0, "float32"), teacher_outputs], axis=1)
    labels = np.asarray(labels)
    if labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] == 1):
        flat = labels.reshape(-1)
        if np.issubdtype(flat.dtype, np.floating) and not np.all(flat == np.round(flat)):
            raise ValueError("attach_teacher: integer class labels expected; got non-integer values.")
        if flat.size and (flat.max() >= classes or flat.min() < -1):
            raise ValueError(
                f"attach_teacher: labels must be class indices in [0, {classes}) (or -1 for none) for a "
                f"teacher with {classes} outputs. Received labels from {flat.min()} to {flat.max()}."
            )
        return np.concatenate([flat.astype("float32")[:, None], teacher_outputs], axis=1)
    if labels.ndim == 2 and labels.shape[1] == classes:
        return np.concatenate([labels.astype("float32"), teacher_outputs], axis=1)
    raise ValueError(
        f"attach_teacher: labels of shape {labels.shape} fit neither integer classes (n,) nor one-hot "
        f"(n, {classes}) for a teacher with {classes} outputs."
    )


def attach_teacher(data, teacher, unlabelled=None, batch_size=256):
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
            labels), appended after `data`'s.
        batch_size: the teacher's batch size (and the returned dataset's, for
            array inputs given as a dataset: its first batch's size).

    Returns:
        `(x, y_packed)` arrays for array inputs, or a `tf.data.Dataset` of
        `(x, y_packed)` batches for a dataset (held in memory). Use them with
        a student compiled with `DistillationLoss`.

    Caching is valid when the student will see exactly these inputs: not with
    random augmentation (use `Distiller`). Shuffling is fine.
    """
    import tensorflow as tf

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
        n_extra = _length(unlabelled)
        x = _concat([x, unlabelled])
        if y is not None:
            y = np.asarray(y)
            fill = np.full((n_extra,), -1) if (y.ndim == 1 or y.shape[-1] == 1) else np.zeros((n_extra,) + y.shape[1:])
            y = np.concatenate([y.reshape(len(y), -1)[:, 0] if y.ndim == 2 and y.shape[1] == 1 else y,
                                fill.astype(y.dtype)])
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
    packed = _pack(y, outputs, _as_2d(outputs).shape[1])
    if as_dataset:
        return tf.data.Dataset.from_tensor_slices((x, packed)).batch(batch_size)
    return x, packed


# --- feature losses (online only) ------------------------------------------------------
class _FeatureLoss(Configurable):
    def __init__(self, teacher_layer, student_layer, weight=1.0):
        for name, value in (("teacher_layer", teacher_layer), ("student_layer", student_layer)):
            if not isinstance(value, str):
                raise ValueError(f"{type(self).__name__}: `{name}` must be a layer name. Received: {value!r}")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or weight < 0:
            raise ValueError(f"{type(self).__name__}: `weight` must be a number >= 0. Received: weight={weight!r}")
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
        self.p = p

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

    `compile` it (optimizer and metrics; the loss is its own), `fit`,
    `evaluate`, save it; `distiller.student` is the trained student, ready for
    `tfopt.export`. The teacher runs on every training batch with
    `training=False` and never trains: a trainable teacher is frozen (set
    `trainable=False`) with a warning. The student may be a tfopt pruned
    and/or quantization-aware model (pass its callbacks to `fit` as usual).

    The per-sample loss is `DistillationLoss`'s (same code), plus each feature
    loss in `losses` times its weight. Feature losses need the teacher and
    the student to be Functional or Sequential models (their layers' outputs
    must be reachable); learned projections live in the Distiller.

    Args:
        teacher: a trained Keras model with one (batch, classes) output.
        student: a Keras model with the same output shape.
        temperature, alpha, method, from_logits: as in `DistillationLoss`.
        losses: feature losses, e.g. `[FeatureHint("t_block", "s_block", weight=0.1)]`.

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
                 from_logits=True, losses=None, name="distiller", **kwargs):
        super().__init__(name=name, **kwargs)
        for role, model in (("teacher", teacher), ("student", student)):
            if not isinstance(model, keras.Model):
                raise TypeError(f"Distiller: `{role}` must be a Keras 3 model. Received: {type(model).__name__}")
        self.temperature = _check_temperature(temperature, "Distiller")
        self.alpha = _check_alpha(alpha, "Distiller")
        self.method = _check_method(method, "Distiller")
        self.from_logits = bool(from_logits)
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
                    f"{tuple(s.shape)} cannot be compared: both must be (batch, classes) with the same classes."
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
        teacher_out = ops.stop_gradient(teacher_out)
        y = ops.convert_to_tensor(y)
        if len(y.shape) == 1:
            y = ops.expand_dims(y, -1)
        elif len(y.shape) > 2:
            y = ops.reshape(y, (-1, int(np.prod(y.shape[1:]))))
        labels = ops.cast(y, "float32")
        packed = ops.concatenate([labels, ops.cast(teacher_out, "float32")], axis=-1)
        per_sample = distillation_per_sample(packed, y_pred, self.temperature, self.alpha, self.method,
                                             self.from_logits, self._step(), who="Distiller")
        if sample_weight is not None:
            per_sample = per_sample * ops.cast(ops.reshape(sample_weight, (-1,)), "float32")
        total = ops.mean(per_sample)
        if teacher_feats is not None and student_feats is not None:
            for f, projection, t, s in zip(self.feature_losses, self.projections, teacher_feats, student_feats):
                if projection is not None:
                    s = projection(s)
                total = total + f.weight * f(ops.stop_gradient(t), s)
        if self.student.losses:  # the student's regularizers (not the frozen teacher's)
            total = total + ops.sum(self.student.losses)
        return total

    def compile(self, optimizer="adam", metrics=None, **kwargs):
        if kwargs.get("loss") is not None:
            raise ValueError(
                "Distiller: `compile` takes no `loss`; the loss is the Distiller's own "
                "(set `temperature`, `alpha`, `method`, `losses` on the Distiller)."
            )
        kwargs.pop("loss", None)
        super().compile(optimizer=optimizer, metrics=metrics, **kwargs)
        strategies.check(self)

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
