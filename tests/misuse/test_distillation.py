"""Misuses of distillation and what tfopt says."""

import keras
import numpy as np

from tests.misuse.harness import Misuse, MisuseTestCase
from tfopt import distillation as D


def _mlp(classes, name, softmax=False):
    inputs = keras.Input((8,))
    hidden = keras.layers.Dense(8, activation="relu", name=f"{name}_hidden")(inputs)
    outputs = keras.layers.Dense(classes, activation="softmax" if softmax else None, name=f"{name}_head")(hidden)
    model = keras.Model(inputs, outputs, name=name)
    if name == "teacher":
        model.trainable = False
    return model


def _x(n=16, width=8):
    return np.random.default_rng(0).standard_normal((n, width)).astype("float32")


def _y(n=16):
    return np.arange(n) % 9


def _cached_targets_of_another_width():
    x_fit, y_fit = D.attach_teacher((_x(), _y()), _mlp(9, "teacher"))
    D.DistillationLoss()(y_fit, _mlp(10, "student")(x_fit))


class _Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.head = keras.layers.Dense(10)

    def call(self, x):
        return self.head(x)


def _fit_on(targets, softmax=False, metrics=None):
    x = _x()
    student = _mlp(10, "student", softmax=softmax)
    student.compile("adam", D.DistillationLoss(), metrics=metrics)
    if isinstance(targets, str):  # "packed": attach_teacher's targets
        x, targets = D.attach_teacher((x, _y()), _mlp(10, "teacher"))
    student.fit(x, targets, batch_size=8, verbose=0)


_WIDTHS = r"teacher outputs 9 values per sample .* student outputs 10.*Received: teacher width 9, student classes 10.*Fix"
_SOFTMAX = r"teacher 'teacher' outputs probabilities.*converted with log\(\).*To silence this warning.*"

TABLE = [
    Misuse(
        "DistillationLoss on cached targets of a teacher with another number of outputs",
        _cached_targets_of_another_width,
        raises=ValueError, match=_WIDTHS + r": distill from a teacher with 10 outputs"),
    Misuse(
        "attach_teacher with a student of another number of classes",
        lambda: D.attach_teacher((_x(), _y()), _mlp(9, "teacher"), student=_mlp(10, "student")),
        raises=ValueError, match=_WIDTHS + r": distill from a teacher with 10 outputs, or give the student's"),
    Misuse(
        "Distiller with a teacher and a student of different numbers of classes",
        lambda: D.Distiller(_mlp(9, "teacher"), _mlp(10, "student")),
        raises=ValueError,
        match=r"output shape \(None, 9\) and the student's \(None, 10\).*Received: teacher 'teacher' with 9 outputs, "
              r"student 'student' with 10.*Fix: give the student's last layer 9 units"),
    Misuse(
        "attach_teacher with a teacher that outputs probabilities",
        lambda: D.attach_teacher((_x(), _y()), _mlp(10, "teacher", softmax=True)),
        warns=UserWarning, match=r"attach_teacher: the " + _SOFTMAX + r"teacher_outputs=\"probabilities\""),
    Misuse(
        "Distiller with a teacher that outputs probabilities",
        lambda: D.Distiller(_mlp(10, "teacher", softmax=True), _mlp(10, "student")),
        warns=UserWarning, match=r"Distiller: the " + _SOFTMAX + r"teacher_outputs=\"probabilities\""),
    Misuse(
        "temperature=inf",
        lambda: D.DistillationLoss(temperature=float("inf")),
        raises=ValueError, match=r"`temperature` must be a finite number > 0.*Received: temperature=inf.*Fix: pass"),
    Misuse(
        "temperature=nan on a Distiller",
        lambda: D.Distiller(_mlp(10, "teacher"), _mlp(10, "student"), temperature=float("nan")),
        raises=ValueError, match=r"Distiller: `temperature` must be a finite number > 0.*Received: temperature=nan"
                                 r".*Fix: pass"),
    Misuse(
        "alpha=nan",
        lambda: D.DistillationLoss(alpha=np.float32("nan")),
        raises=ValueError, match=r"`alpha` .* must be in \[0, 1\]. Received: alpha=np.float32\(nan\). Fix: pass"),
    Misuse(
        "a feature loss weight that is not finite",
        lambda: D.FeatureHint("teacher_hidden", "student_hidden", weight=float("nan")),
        raises=ValueError, match=r"FeatureHint: `weight` must be a finite number >= 0. Received: weight=nan. Fix: pass"),
    Misuse(
        "attach_teacher with unlabelled inputs of another shape",
        lambda: D.attach_teacher((_x(), _y()), _mlp(10, "teacher"), unlabelled=_x(4, width=5)),
        raises=ValueError,
        match=r"unlabelled inputs have shape \(4, 5\) but the labelled inputs `x` have shape \(16, 8\).*"
              r"Received: unlabelled of shape \(4, 5\). Fix: preprocess the unlabelled inputs like x"),
    Misuse(
        "Distiller with a student that ends in softmax and from_logits=True",
        lambda: D.Distiller(_mlp(10, "teacher"), _mlp(10, "student", softmax=True), from_logits=True),
        warns=UserWarning,
        match=r"Distiller: the student 'student' outputs probabilities, not logits \(its final activation is "
              r"softmax\), but from_logits=True.*read as probabilities.*To silence this warning, pass "
              r"from_logits=False"),
    Misuse(
        "Distiller with a subclassed student and from_logits unset",
        lambda: D.Distiller(_mlp(10, "teacher"), _Subclassed(name="sub")),
        warns=UserWarning,
        match=r"Distiller: the student 'sub' is a subclassed model \(_Subclassed\).*assumed to be logits. "
              r"Received: from_logits=None. Fix: pass from_logits=False if it ends in a softmax"),
    Misuse(
        "DistillationLoss with a student that ends in softmax",
        lambda: _fit_on("packed", softmax=True),
        warns=UserWarning,
        match=r"DistillationLoss: the student 'student' outputs probabilities, not logits.*from_logits=True.*"
              r"To silence this warning, pass `DistillationLoss\(from_logits=False\)`"),
    Misuse(
        "DistillationLoss fitted on plain labels",
        lambda: _fit_on(_y()),
        raises=ValueError,
        match=r"DistillationLoss: `fit` of model 'student' received plain labels \(targets of shape \(8,\)\).*"
              r"no distillation.*Received: y of shape \(8,\). Fix: .*attach_teacher\(\(x, y\), teacher\)"),
    Misuse(
        "metrics=[\"accuracy\"] with packed targets",
        lambda: _fit_on("packed", metrics=["accuracy"]),
        raises=ValueError,
        match=r"DistillationLoss: model 'student' is compiled with metrics \['accuracy'\].*packed targets.*"
              r"Received: metrics=\['accuracy'\]. Fix: compile with `metrics=\[tfopt.distillation.LabelAccuracy"),
    Misuse(
        "attach_teacher on empty arrays",
        lambda: D.attach_teacher((_x(0), _y(0)), _mlp(10, "teacher")),
        raises=ValueError,
        match=r"attach_teacher: `data` holds no samples \(inputs of shape \(0, 8\)\).*Received: 0 samples. "
              r"Fix: pass at least one sample"),
    Misuse(
        "attach_teacher with inputs the teacher does not take",
        lambda: D.attach_teacher((_x(16, width=5), _y()), _mlp(10, "teacher")),
        raises=ValueError,
        match=r"attach_teacher: the teacher 'teacher' takes inputs of shape \(None, 8\) \(None: any size\), but "
              r"the data's inputs have shape \(16, 5\). Received: x of shape \(16, 5\). Fix: pass inputs shaped "
              r"\(n, 8\)"),
]


class DistillationMisuseTest(MisuseTestCase):
    def test_table(self):
        # Every row raised, warned or logged what it says (a failing row fails its subtest).
        self.assertEqual(self.run_table(TABLE), len(TABLE))
