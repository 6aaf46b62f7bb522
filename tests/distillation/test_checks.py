"""Distillation mistakes that used to train silently wrong, or crash with another library's message."""

import warnings

import keras
import numpy as np

from tfopt import distillation as D
from tfopt import testing
from tfopt.demo.data import load_digits


def _mlp(classes=4, name="student", softmax=False, width=8, inputs=8):
    inp = keras.Input((inputs,))
    x = keras.layers.Dense(width, activation="relu", name=f"{name}_hidden")(inp)
    out = keras.layers.Dense(classes, activation="softmax" if softmax else None, name=f"{name}_head")(x)
    return keras.Model(inp, out, name=name)


def _teacher(classes=4, inputs=8):
    keras.utils.set_random_seed(0)
    teacher = _mlp(classes, "teacher", width=16, inputs=inputs)
    teacher.trainable = False
    return teacher


def _data(n=32, width=8, classes=4):
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, width)).astype("float32"), np.arange(n) % classes


class _Subclassed(keras.Model):
    def __init__(self, classes=4, **kwargs):
        super().__init__(**kwargs)
        self.head = keras.layers.Dense(classes)

    def call(self, x):
        return self.head(x)


class SoftmaxStudentTest(testing.TestCase):
    """A student ending in softmax was read as logits: on digits, with alpha 0, its distillation
    loss barely fell (about 10 -> 9, 75% accuracy) while a logits student's fell to about 0.5."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        x_train, cls.y, x_test, cls.y_test = load_digits(0)
        cls.x, cls.x_test = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)
        keras.utils.set_random_seed(0)
        cls.teacher = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu"),
                                        keras.layers.Dense(10)], name="digits_teacher")
        cls.teacher.compile(keras.optimizers.Adam(1e-2),
                            keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        cls.teacher.fit(cls.x, cls.y, epochs=5, batch_size=64, verbose=0)
        cls.teacher.trainable = False

    def _student(self, activation):
        keras.utils.set_random_seed(1)
        return keras.Sequential([keras.Input((64,)), keras.layers.Dense(16, activation="relu"),
                                 keras.layers.Dense(10, activation=activation)], name=f"student_{activation}")

    def _distill(self, student, **kwargs):
        distiller = D.Distiller(self.teacher, student, alpha=0.0, **kwargs)
        distiller.compile(keras.optimizers.Adam(1e-2))
        losses = distiller.fit(self.x, self.y, epochs=4, batch_size=64, verbose=0).history["loss"]
        accuracy = float(np.mean(np.argmax(student.predict(self.x_test, verbose=0), -1) == self.y_test))
        return distiller, losses, accuracy

    def test_softmax_student_learns_as_the_logits_student_does(self):
        _, logits_losses, logits_accuracy = self._distill(self._student(None))
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # detected from the graph: nothing to warn about
            distiller, losses, accuracy = self._distill(self._student("softmax"))
        self.assertFalse(distiller.from_logits)
        self.assertEqual(distiller.teacher_outputs, "logits")  # the teacher is still read as logits
        self.assertLess(losses[-1], 0.2 * losses[0])
        self.assertAllClose(losses[-1], logits_losses[-1], rtol=0.25)
        self.assertGreater(accuracy, logits_accuracy - 0.03)
        self.assertGreater(accuracy, 0.85)

    def test_from_logits_true_with_a_softmax_student_is_corrected_with_a_warning(self):
        student = self._student("softmax")
        with self.assertWarnsRegex(UserWarning, r"student 'student_softmax' outputs probabilities.*from_logits=True"
                                                r".*To silence this warning, pass from_logits=False"):
            distiller = D.Distiller(self.teacher, student, from_logits=True)
        self.assertFalse(distiller.from_logits)
        x, y = self.x[:64], self.y[:64]
        s = student(x)
        reference = D.Distiller(self.teacher, student)  # detected
        self.assertAllClose(float(distiller.compute_loss(x, y, s, training=False)),
                            float(reference.compute_loss(x, y, s, training=False)), rtol=1e-6)

    def test_the_resolved_reading_round_trips_without_a_warning(self):
        distiller = D.Distiller(self.teacher, self._student("softmax"))
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            copy = D.Distiller.from_config(distiller.get_config())
        self.assertFalse(copy.from_logits)
        self.assertEqual(copy.teacher_outputs, "logits")

    def test_a_subclassed_student_is_a_guess_and_says_so(self):
        with self.assertWarnsRegex(UserWarning, r"subclassed model \(_Subclassed\).*assumed to be logits.*"
                                                r"Received: from_logits=None. Fix: pass from_logits=False"):
            distiller = D.Distiller(_teacher(), _Subclassed(name="sub"))
        self.assertTrue(distiller.from_logits)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            D.Distiller(_teacher(), _Subclassed(name="sub"), from_logits=True)

    def test_cached_softmax_student_is_read_as_probabilities_with_a_warning(self):
        x, y = self.x[:256], self.y[:256]
        x_fit, y_fit = D.attach_teacher((x, y), self.teacher)
        student = self._student("softmax")
        student.compile(keras.optimizers.Adam(1e-2), D.DistillationLoss(alpha=0.0))
        with self.assertWarnsRegex(UserWarning, r"DistillationLoss: the student 'student_softmax' outputs "
                                                r"probabilities.*DistillationLoss\(from_logits=False\)"):
            student.fit(x_fit, y_fit, batch_size=64, verbose=0)
        s = student(x)
        expected = D.DistillationLoss(alpha=0.0, from_logits=False)(y_fit, s)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # said once per student
            self.assertAllClose(student.evaluate(x_fit, y_fit, verbose=0, batch_size=256), float(expected),
                                rtol=1e-4)


class PlainLabelsTest(testing.TestCase):
    def test_fit_on_plain_labels_raises_and_evaluate_still_works(self):
        x, y = _data()
        for labels in (y, y[:, None], keras.utils.to_categorical(y, 4)):
            student = _mlp()
            student.compile("adam", D.DistillationLoss())
            with self.assertRaisesRegex(ValueError, r"`fit` of model 'student' received plain labels.*no "
                                                    r"distillation.*Received: y of shape .*attach_teacher"):
                student.fit(x, labels, batch_size=16, verbose=0)
        ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.assertAllClose(student.evaluate(x, y, verbose=0, batch_size=32), float(ce(y, student(x))), rtol=1e-5)
        x_fit, y_fit = D.attach_teacher((x, y), _teacher())
        student.fit(x_fit, y_fit, batch_size=16, verbose=0, validation_data=(x, y))  # plain labels to validate

    def test_a_distillers_supervised_loss_may_see_plain_labels(self):
        x, y = _data()
        distiller = D.Distiller(_teacher(), _mlp())
        distiller.compile("adam", loss=D.DistillationLoss())  # its label term: crossentropy on y
        before = [w.copy() for w in distiller.student.get_weights()]
        losses = distiller.fit(x, y, batch_size=16, verbose=0).history["loss"]
        self.assertTrue(np.all(np.isfinite(losses)), losses)  # no refusal, and a real loss
        self.assertFalse(all(np.array_equal(a, b) for a, b in zip(before, distiller.student.get_weights())))


class PackedTargetsMetricsTest(testing.TestCase):
    def test_accuracy_metrics_on_packed_targets_name_label_accuracy(self):
        x, y = _data()
        x_fit, y_fit = D.attach_teacher((x, y), _teacher())
        for metrics in (["accuracy"], ["sparse_categorical_accuracy"], [keras.metrics.SparseCategoricalAccuracy()],
                        [D.LabelAccuracy(), "acc"]):
            student = _mlp()
            student.compile("adam", D.DistillationLoss(), metrics=metrics)
            with self.assertRaisesRegex(ValueError, r"compiled with metrics \[.*\].*packed targets of "
                                                    r"`attach_teacher`.*Fix: compile with `metrics=\[tfopt"
                                                    r"\.distillation\.LabelAccuracy\(\)\]`"):
                student.fit(x_fit, y_fit, batch_size=16, verbose=0)
        student = _mlp()
        student.compile("adam", D.DistillationLoss(), metrics=["accuracy"])
        with self.assertRaisesRegex(ValueError, r"LabelAccuracy"):
            student.evaluate(x_fit, y_fit, verbose=0)
        student.compile("adam", D.DistillationLoss(), metrics=[D.LabelAccuracy()])
        history = student.fit(x_fit, y_fit, batch_size=16, verbose=0)
        self.assertIn("label_accuracy", history.history)


class AttachTeacherInputsTest(testing.TestCase):
    def test_empty_data(self):
        teacher = _teacher()
        for data in ((np.zeros((0, 8), "float32"), np.zeros((0,), "int64")), np.zeros((0, 8), "float32")):
            with self.assertRaisesRegex(ValueError, r"`data` holds no samples \(inputs of shape \(0, 8\)\).*"
                                                    r"Received: 0 samples. Fix: pass at least one sample"):
                D.attach_teacher(data, teacher)

    def test_inputs_the_teacher_does_not_take(self):
        x, y = _data(16, width=5)
        with self.assertRaisesRegex(ValueError, r"teacher 'teacher' takes inputs of shape \(None, 8\).*data's "
                                                r"inputs have shape \(16, 5\). Received: x of shape \(16, 5\). "
                                                r"Fix: pass inputs shaped \(n, 8\)"):
            D.attach_teacher((x, y), _teacher())
        with self.assertRaisesRegex(ValueError, r"teacher 'sub' \(_Subclassed\) could not run on the data "
                                                r"\(ValueError: .*\(16, 5\).*Received: inputs of shape \(16, 5\)"):
            teacher = _Subclassed(name="sub")
            teacher(np.zeros((1, 8), "float32"))
            D.attach_teacher((x, y), teacher)

    def test_a_missing_last_axis_of_one_is_what_keras_accepts(self):
        keras.utils.set_random_seed(0)
        teacher = keras.Sequential([keras.Input((8, 1)), keras.layers.Flatten(), keras.layers.Dense(4)])
        x, y = _data(16)
        _, y_fit = D.attach_teacher((x, y), teacher)
        self.assertAllClose(y_fit[:, 1], teacher(x[..., None]), atol=1e-6)


class SoftmaxLayerStudentTest(testing.TestCase):
    def test_a_student_ending_in_a_softmax_layer_is_read_as_probabilities(self):
        student = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Softmax()], name="s")
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            distiller = D.Distiller(_teacher(), student)
        self.assertFalse(distiller.from_logits)
