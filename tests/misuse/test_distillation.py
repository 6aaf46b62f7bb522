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


def _frozen(model):
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


def _lm(vocab, name, seq=None):
    """A tiny language model: token ids (batch, seq) -> logits (batch, seq, vocab)."""
    keras.utils.set_random_seed(0)
    tokens = keras.Input((seq,), dtype="int32", name="token_ids")
    hidden = keras.layers.Embedding(vocab, 8, name=f"{name}_embedding")(tokens)
    model = keras.Model(tokens, keras.layers.Dense(vocab, name=f"{name}_head")(hidden), name=name)
    if name == "teacher":
        model.trainable = False
    return model


def _tokens(n=8, seq=6, vocab=12):
    return (np.arange(n * (seq + 1)).reshape(n, seq + 1) % vocab).astype("int32")


def _cached_lm_fit_with_keras_hub_metrics():
    tokens = _tokens()
    x_fit, y_fit = D.attach_teacher((tokens[:, :-1], tokens[:, 1:]), _lm(12, "teacher"), top_k=4)
    student = _lm(12, "student")
    # keras-hub's CausalLM.compile adds weighted_metrics=[SparseCategoricalAccuracy] unless told otherwise.
    student.compile("adam", D.DistillationLoss(), weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()])
    student.fit(x_fit, y_fit, batch_size=4, verbose=0)


def _cached_lm_targets_of_another_length():
    tokens = _tokens(seq=6)
    _, y_fit = D.attach_teacher((tokens[:, :-1], tokens[:, 1:]), _lm(12, "teacher"), top_k=4)
    D.DistillationLoss()(y_fit, np.zeros((8, 5, 12), "float32"))


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
    Misuse(
        "attach_teacher with top_k=0",
        lambda: D.attach_teacher((_tokens()[:, :-1], _tokens()[:, 1:]), _lm(12, "teacher"), top_k=0),
        raises=ValueError,
        match=r"attach_teacher: `top_k` \(the teacher's logits kept per position\) must be an integer >= 1. "
              r"Received: top_k=0. Fix: pass e.g. top_k=32"),
    Misuse(
        "attach_teacher with top_k larger than the vocabulary",
        lambda: D.attach_teacher((_tokens()[:, :-1], _tokens()[:, 1:]), _lm(12, "teacher"), top_k=13),
        raises=ValueError,
        match=r"attach_teacher: `top_k` is 13 but the teacher 'teacher' predicts over a vocabulary of 12 tokens.*"
              r"Received: top_k=13. Fix: pass top_k <= 12"),
    Misuse(
        "attach_teacher with top_k and a classifier teacher",
        lambda: D.attach_teacher((_x(), _y()), _mlp(10, "teacher"), top_k=4),
        raises=ValueError,
        match=r"attach_teacher: `top_k` keeps the teacher's top-k logits per position.*the teacher 'teacher' "
              r"outputs shape \(None, 10\). Received: top_k=4. Fix: leave top_k=None for a classifier"),
    Misuse(
        "Distiller with a teacher and a student of different vocabularies",
        lambda: D.Distiller(_lm(12, "teacher"), _lm(10, "student")),
        raises=ValueError,
        match=r"Distiller: the teacher predicts over a vocabulary of 12 tokens .* but the student over 10.*"
              r"Received: teacher vocabulary 12, student vocabulary 10. Fix: .*vocabulary_size=12"),
    Misuse(
        "attach_teacher with a student of another vocabulary",
        lambda: D.attach_teacher((_tokens()[:, :-1], _tokens()[:, 1:]), _lm(12, "teacher"), top_k=4,
                                 student=_lm(10, "student")),
        raises=ValueError,
        match=r"attach_teacher: the teacher predicts over a vocabulary of 12 tokens \(teacher 'teacher'\) but the "
              r"student over 10.*Fix: distill from a teacher with the student's tokenizer"),
    Misuse(
        "Distiller with a teacher and a student of different sequence lengths",
        lambda: D.Distiller(_lm(12, "teacher", seq=6), _lm(12, "student", seq=5)),
        raises=ValueError,
        match=r"Distiller: the teacher 'teacher' outputs 6 positions per sequence .* student 'student' 5.*"
              r"Received: sequence lengths 6 and 5. Fix: build both for the same sequence length"),
    Misuse(
        "attach_teacher with sequence labels of another length",
        lambda: D.attach_teacher((_tokens()[:, :-1], _tokens()), _lm(12, "teacher"), top_k=4),
        raises=ValueError,
        match=r"attach_teacher: the labels have shape \(8, 7\) but the teacher outputs 6 positions per sequence.*"
              r"Received: y of shape \(8, 7\). Fix: pass y = token_ids\[:, 1:\] with x = token_ids\[:, :-1\]"),
    Misuse(
        "DistillationLoss on cached sequence targets of another length",
        _cached_lm_targets_of_another_length,
        raises=ValueError,
        match=r"DistillationLoss: the targets from `attach_teacher` of shape \(8, 6, 2, 5\) have 6 positions per "
              r"sequence but the student outputs 5.*Received: 6 positions, student sequence length 5. Fix:"),
    Misuse(
        "DistillationLoss on cached sequence targets with a classifier student",
        lambda: D.DistillationLoss()(D.attach_teacher((_tokens()[:, :-1], _tokens()[:, 1:]), _lm(12, "teacher"),
                                                      top_k=4)[1], np.zeros((8, 12), "float32")),
        raises=ValueError,
        match=r"DistillationLoss: the targets are per-position \(sequence\) targets, so the student's output must "
              r"be \(batch, seq, vocab\) logits. Received: student output of shape \(8, 12\). Fix:"),
    Misuse(
        "a student with every weight frozen",
        lambda: D.Distiller(_mlp(9, "teacher"), _frozen(_mlp(9, "student"))).compile("adam"),
        raises=ValueError,
        match=r"Distiller: student 'student' has no trainable weights \(4 weights, all frozen; frozen sublayers: "
              r"\['student_hidden', 'student_head'\]\), so distillation would train nothing. Fix: "
              r"student.trainable = True"),
    Misuse(
        "cached sequence targets with keras-hub's default weighted_metrics",
        _cached_lm_fit_with_keras_hub_metrics,
        raises=ValueError,
        match=r"DistillationLoss: model 'student' is compiled with weighted_metrics \['SparseCategoricalAccuracy'\] "
              r"\(keras-hub tasks' `compile` adds.*Received: weighted_metrics=\['SparseCategoricalAccuracy'\]. Fix: "
              r"compile with `weighted_metrics=\[tfopt.distillation.LabelAccuracy\(\)\]`"),
]


class DistillationMisuseTest(MisuseTestCase):
    def test_table(self):
        # Every row raised, warned or logged what it says (a failing row fails its subtest).
        self.assertEqual(self.run_table(TABLE), len(TABLE))
