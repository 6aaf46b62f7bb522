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
]


class DistillationMisuseTest(MisuseTestCase):
    def test_table(self):
        # Every row raised, warned or logged what it says (a failing row fails its subtest).
        self.assertEqual(self.run_table(TABLE), len(TABLE))
