"""Distillation: cached (attach_teacher + DistillationLoss) and online (Distiller)."""

import os
import tempfile
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized
from keras import ops

import tfopt
from tfopt import distillation as D
from tfopt import testing


def _mlp(width, classes=4, name=None, inputs=8):
    inp = keras.Input((inputs,))
    x = keras.layers.Dense(width, activation="relu", name=f"{name}_hidden")(inp)
    return keras.Model(inp, keras.layers.Dense(classes, name=f"{name}_logits")(x), name=name)


def _frozen_teacher(width=32, seed=0):
    keras.utils.set_random_seed(seed)
    teacher = _mlp(width, name="teacher")
    teacher.trainable = False
    return teacher


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 8)).astype("float32"), rng.integers(0, 4, n)


class LossTest(testing.TestCase, parameterized.TestCase):
    @parameterized.parameters(("kd", 1.0), ("kd", 4.0), ("mse", 1.0))
    def test_distiller_and_cached_give_the_same_loss(self, method, temperature):
        teacher, student = _frozen_teacher(), _mlp(8, name="student")
        x, y = _data()
        x_fit, y_fit = D.attach_teacher((x, y), teacher)
        loss = D.DistillationLoss(temperature=temperature, alpha=0.3, method=method)
        cached = float(loss(y_fit, student(x)))
        distiller = D.Distiller(teacher, student, temperature=temperature, alpha=0.3, method=method)
        online = float(distiller.compute_loss(x, y, student(x), training=False))
        self.assertAllClose(cached, online, rtol=1e-5)
        # and by hand: alpha * CE + (1 - alpha) * T^2 KL
        t, s = teacher.predict(x, verbose=0), student.predict(x, verbose=0)
        ce = keras.losses.sparse_categorical_crossentropy(y, s, from_logits=True)
        teach = D.kd_loss(t, s, temperature) if method == "kd" else D.logit_mse(t, s)
        self.assertAllClose(cached, float(np.mean(0.3 * ce + 0.7 * np.asarray(teach))), rtol=1e-5)

    def test_unlabelled_samples_train_on_the_teacher_alone(self):
        teacher, student = _frozen_teacher(), _mlp(8, name="student")
        x, y = _data()
        extra = _data(16, seed=1)[0]
        x_fit, y_fit = D.attach_teacher((x, y), teacher, unlabelled=extra)
        self.assertEqual(y_fit.shape, (80, 2, 4))
        self.assertAllEqual(y_fit[64:, 0], np.zeros((16, 4)))  # no label
        loss = D.DistillationLoss(alpha=0.4)
        per_sample_unlabelled = loss.call(y_fit[64:], student(extra))
        kd = D.kd_loss(teacher.predict(extra, verbose=0), student(extra), D.DEFAULT_TEMPERATURE)
        self.assertAllClose(per_sample_unlabelled, 0.6 * np.asarray(kd), rtol=1e-5)
        x_only, y_only = D.attach_teacher(extra, teacher)
        self.assertAllEqual(y_only[:, 0], np.zeros((16, 4)))

    def test_one_hot_labels_and_plain_labels(self):
        teacher, student = _frozen_teacher(), _mlp(8, name="student")
        x, y = _data()
        one_hot = keras.utils.to_categorical(y, 4)
        _, packed_sparse = D.attach_teacher((x, y), teacher)
        _, packed_dense = D.attach_teacher((x, one_hot), teacher)
        self.assertEqual(packed_dense.shape, (64, 2, 4))
        self.assertAllEqual(packed_sparse, packed_dense)
        loss = D.DistillationLoss()
        self.assertAllClose(float(loss(packed_sparse, student(x))), float(loss(packed_dense, student(x))), rtol=1e-5)
        ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.assertAllClose(float(loss(y, student(x))), float(ce(y, student(x))), rtol=1e-5)

    def test_label_accuracy_skips_unlabelled(self):
        m = D.LabelAccuracy()
        packed = np.array([[[1, 0], [9, 0]], [[0, 1], [9, 0]], [[0, 0], [0, 9]]], "float32")
        m.update_state(packed, np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], "float32"))
        self.assertAllClose(float(m.result()), 0.5)
        m.reset_state()  # plain labels: class indices (-1 skipped) and one-hot
        m.update_state(np.array([0, 1, -1]), np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], "float32"))
        self.assertAllClose(float(m.result()), 0.5)
        m.reset_state()
        m.update_state(np.array([[1, 0], [0, 1], [0, 0]], "float32"),
                       np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], "float32"))
        self.assertAllClose(float(m.result()), 0.5)


class CachedTest(testing.TestCase):
    def test_fit_never_calls_the_teacher(self):
        teacher, student = _frozen_teacher(), _mlp(8, name="student")
        x, y = _data()
        x_fit, y_fit = D.attach_teacher((x, y), teacher)

        def forbidden(*args, **kwargs):
            raise AssertionError("the teacher ran during fit")

        teacher.call = teacher.predict = teacher.__call__ = forbidden
        student.compile("adam", D.DistillationLoss(), metrics=[D.LabelAccuracy()], steps_per_execution=2)
        history = student.fit(x_fit, y_fit, batch_size=16, epochs=2, verbose=0)
        self.assertLess(history.history["loss"][-1], history.history["loss"][0])
        self.assertIn("label_accuracy", history.history)

    def test_datasets_in_and_out(self):
        teacher, student = _frozen_teacher(), _mlp(8, name="student")
        x, y = _data()
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
        cached = D.attach_teacher(data, teacher)
        self.assertIsInstance(cached, tf.data.Dataset)
        xb, yb = next(iter(cached))
        self.assertEqual(tuple(yb.shape), (16, 2, 4))
        self.assertAllClose(yb[:, 1], teacher.predict(x[:16], verbose=0), atol=1e-5)
        student.compile("adam", D.DistillationLoss())
        student.fit(cached, epochs=1, verbose=0)

    def test_student_compiled_with_the_loss_round_trips(self):
        teacher, student = _frozen_teacher(), _mlp(8, name="student")
        x, y = _data()
        x_fit, y_fit = D.attach_teacher((x, y), teacher)
        student.compile("adam", D.DistillationLoss(temperature=3.0, alpha=0.2, method="mse"),
                        metrics=[D.LabelAccuracy()])
        student.fit(x_fit, y_fit, verbose=0)
        path = os.path.join(tempfile.mkdtemp(), "student.keras")
        student.save(path)
        loaded = keras.models.load_model(path)
        self.assertIsInstance(loaded.loss, D.DistillationLoss)
        self.assertEqual((loaded.loss.temperature, loaded.loss.alpha, loaded.loss.method), (3.0, 0.2, "mse"))
        self.assertAllClose(loaded.evaluate(x_fit, y_fit, verbose=0), student.evaluate(x_fit, y_fit, verbose=0),
                            rtol=1e-5)
        loaded.fit(x_fit, y_fit, verbose=0)

    def test_temperature_schedule_reads_the_step_in_graph(self):
        teacher, student = _frozen_teacher(), _mlp(8, name="student")
        x, y = _data(16)
        x_fit, y_fit = D.attach_teacher((x, y), teacher)
        schedule = keras.optimizers.schedules.PolynomialDecay(4.0, 4, 1.0)
        loss = D.DistillationLoss(temperature=schedule, alpha=0.0)
        student.compile(keras.optimizers.SGD(0.0), loss, steps_per_execution=4)
        with self.assertRaisesRegex(ValueError, "DistillationSchedule"):
            student.fit(x_fit, y_fit, batch_size=4, verbose=0)
        student.compile(keras.optimizers.SGD(0.0), loss, steps_per_execution=4)
        student.fit(x_fit, y_fit, batch_size=4, verbose=0, callbacks=[D.DistillationSchedule()])
        # After 4 steps the schedule is at its end, T = 1: the loss is T=1's.
        t, s = teacher.predict(x, verbose=0), student.predict(x, verbose=0)
        self.assertAllClose(float(loss(y_fit, s)), float(np.mean(D.kd_loss(t, s, 1.0))), rtol=1e-5)


class DistillerTest(testing.TestCase):
    def test_fit_and_round_trip(self):
        teacher, student = _frozen_teacher(), _mlp(8, name="student")
        x, y = _data()
        distiller = D.Distiller(teacher, student, temperature=2.0, alpha=0.5)
        distiller.compile("adam", metrics=["accuracy"], steps_per_execution=2)
        teacher_before = [w.copy() for w in teacher.get_weights()]
        history = distiller.fit(x, y, batch_size=16, epochs=3, verbose=0)
        self.assertLess(history.history["loss"][-1], history.history["loss"][0])
        for a, b in zip(teacher.get_weights(), teacher_before):
            self.assertAllEqual(a, b)
        path = os.path.join(tempfile.mkdtemp(), "distiller.keras")
        distiller.save(path)
        loaded = keras.models.load_model(path)
        self.assertIsInstance(loaded, D.Distiller)
        self.assertAllClose(loaded.student.predict(x, verbose=0), student.predict(x, verbose=0), atol=1e-6)
        self.assertEqual((loaded.temperature, loaded.alpha), (2.0, 0.5))
        self.assertFalse(loaded.teacher.trainable)

    def test_trainable_teacher_is_frozen_with_a_warning(self):
        keras.utils.set_random_seed(0)
        teacher = _mlp(16, name="teacher")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            D.Distiller(teacher, _mlp(8, name="student"))
        self.assertFalse(teacher.trainable)
        self.assertTrue(any("frozen" in str(w.message) for w in caught))

    def test_feature_hint_with_projection_and_attention_transfer(self):
        def cnn(width, name):
            inp = keras.Input((8, 8, 1))
            x = keras.layers.Conv2D(width, 3, padding="same", activation="relu", name=f"{name}_conv")(inp)
            x = keras.layers.GlobalAveragePooling2D()(x)
            return keras.Model(inp, keras.layers.Dense(4)(x), name=name)

        teacher, student = cnn(16, "teacher"), cnn(4, "student")
        teacher.trainable = False
        rng = np.random.default_rng(0)
        x, y = rng.standard_normal((32, 8, 8, 1)).astype("float32"), rng.integers(0, 4, 32)
        distiller = D.Distiller(teacher, student, losses=[
            D.FeatureHint("teacher_conv", "student_conv", weight=0.5),
            D.AttentionTransfer("teacher_conv", "student_conv", weight=10.0),
        ])
        self.assertEqual(distiller.projections[0].units, 16)
        self.assertIsNone(distiller.projections[1])
        distiller.compile("adam")
        history = distiller.fit(x, y, batch_size=8, epochs=3, verbose=0)
        self.assertLess(history.history["loss"][-1], history.history["loss"][0])
        with_features = float(distiller.compute_loss(x, y, distiller(x, training=True), training=True))
        outputs_only = float(distiller.compute_loss(x, y, student(x), training=False))
        self.assertGreater(with_features, outputs_only)  # the feature terms count
        path = os.path.join(tempfile.mkdtemp(), "features.keras")
        distiller.save(path)
        loaded = keras.models.load_model(path)
        self.assertAllClose(loaded.projections[0].kernel.numpy(), distiller.projections[0].kernel.numpy())


class BadInputTest(testing.TestCase, parameterized.TestCase):
    @parameterized.parameters(0, -1.0, True, "warm", float("inf"), float("nan"), np.float32("inf"), np.int32(0))
    def test_temperature(self, value):
        with self.assertRaisesRegex(ValueError, r"`temperature` must be a finite number > 0.*Received: temperature="):
            D.DistillationLoss(temperature=value)
        with self.assertRaisesRegex(ValueError, r"`temperature` must be a finite number > 0.*Fix"):
            D.Distiller(_frozen_teacher(), _mlp(8, name="student"), temperature=value)

    @parameterized.parameters(-0.1, 1.5, None, float("nan"), float("inf"), np.float32("nan"), np.bool_(True))
    def test_alpha(self, value):
        with self.assertRaisesRegex(ValueError, r"`alpha` .* must be in \[0, 1\].*Received: alpha=.*Fix"):
            D.DistillationLoss(alpha=value)
        with self.assertRaisesRegex(ValueError, r"`alpha` .* must be in \[0, 1\]"):
            D.Distiller(_frozen_teacher(), _mlp(8, name="student"), alpha=value)

    @parameterized.parameters(float("nan"), float("inf"), -1.0)
    def test_feature_loss_weight_and_p(self, value):
        with self.assertRaisesRegex(ValueError, r"`weight` must be a finite number >= 0. Received: weight="):
            D.FeatureHint("a", "b", weight=value)
        with self.assertRaisesRegex(ValueError, r"`p` must be a finite number > 0.*Received: p="):
            D.AttentionTransfer("a", "b", p=value)

    def test_teacher_outputs_argument(self):
        with self.assertRaisesRegex(ValueError, r"`teacher_outputs` must be None.*Received: teacher_outputs='softmax'"):
            D.attach_teacher(_data()[0], _frozen_teacher(), teacher_outputs="softmax")
        with self.assertRaisesRegex(ValueError, r"Received: teacher_outputs='softmax'"):
            D.Distiller(_frozen_teacher(), _mlp(8, name="student"), teacher_outputs="softmax")
        x, y = _data()
        with self.assertRaisesRegex(ValueError, r"`teacher_outputs=\"probabilities\"` but .* negative values"):
            D.attach_teacher((x, y), _frozen_teacher(), teacher_outputs="probabilities")

    def test_output_shapes_that_cannot_match(self):
        with self.assertRaisesRegex(ValueError, r"teacher's output shape \(None, 4\) and the student's \(None, 5\)"):
            D.Distiller(_frozen_teacher(), _mlp(8, classes=5, name="student"))
        teacher = _frozen_teacher()
        x, y = _data()
        _, y_fit = D.attach_teacher((x, y), teacher)
        with self.assertRaisesRegex(ValueError, r"teacher outputs 4 values per sample .* student outputs 3"):
            D.DistillationLoss()(y_fit, np.zeros((64, 3), "float32"))

    def test_integer_teacher_outputs(self):
        x, y = _data()
        with self.assertRaisesRegex(ValueError, r"outputs are int64, not floats"):
            D.attach_teacher((x, y), np.zeros((64, 4), "int64"))

    def test_feature_layer_names_that_do_not_exist(self):
        with self.assertRaisesRegex(ValueError, r"the student has no layer named 'nope'. Its layers are"):
            D.Distiller(_frozen_teacher(), _mlp(8, name="student"), losses=[D.FeatureHint("teacher_hidden", "nope")])

    def test_features_of_a_subclassed_student(self):
        class Student(keras.Model):
            def __init__(self):
                super().__init__()
                self.d = keras.layers.Dense(4)

            def call(self, x):
                return self.d(x)

        with self.assertRaisesRegex(ValueError, r"subclassed model \(Student\).*Functional or Sequential"):
            D.Distiller(_frozen_teacher(), Student(), losses=[D.FeatureHint("teacher_hidden", "d")])

    def test_cached_outputs_of_the_wrong_length(self):
        x, y = _data()
        with self.assertRaisesRegex(ValueError, r"cached teacher outputs have 10 rows but the data has 64 samples"):
            D.attach_teacher((x, y), np.zeros((10, 4), "float32"))
        with self.assertRaisesRegex(ValueError, r"x has 64 samples but y has 3"):
            D.attach_teacher((x, y[:3]), _frozen_teacher())

    def test_labels_out_of_range(self):
        x, _ = _data()
        with self.assertRaisesRegex(ValueError, r"class indices in \[0, 4\)"):
            D.attach_teacher((x, np.full(64, 7)), _frozen_teacher())


class PackingTest(testing.TestCase, parameterized.TestCase):
    """Issue 11: the old 2-D packing `[label, t_1..t_K]` of a 9- or 19-output teacher had
    10 or 20 columns, which a 10-class student's loss read as plain labels (no error,
    label accuracy near 0). Packed targets are now `(n, 2, K)` and K must be 10."""

    @parameterized.parameters(9, 19)
    def test_a_teacher_of_another_width_is_an_error(self, teacher_width):
        keras.utils.set_random_seed(0)
        teacher, student = _mlp(16, classes=teacher_width, name="teacher"), _mlp(8, classes=10, name="student")
        x, _ = _data()
        y = np.arange(64) % 9
        x_fit, y_fit = D.attach_teacher((x, y), teacher)
        self.assertEqual(y_fit.shape, (64, 2, teacher_width))
        pattern = rf"teacher outputs {teacher_width} values per sample .* student outputs 10.*Fix"
        with self.assertRaisesRegex(ValueError, pattern):
            D.DistillationLoss()(y_fit, student(x))
        student.compile("adam", D.DistillationLoss(), metrics=[D.LabelAccuracy()])
        with self.assertRaisesRegex(ValueError, pattern):  # at the first loss call, in fit's graph
            student.fit(x_fit, y_fit, batch_size=32, epochs=1, verbose=0)
        with self.assertRaisesRegex(ValueError, pattern):
            D.LabelAccuracy().update_state(y_fit, student(x))
        with self.assertRaisesRegex(ValueError, pattern):  # before running the teacher, given the student
            D.attach_teacher((x, y), teacher, student=student)
        with self.assertRaisesRegex(ValueError, pattern):  # cached outputs, given the number of classes
            D.attach_teacher((x, y), teacher.predict(x, verbose=0), student=10)
        with self.assertRaisesRegex(ValueError, rf"\(None, {teacher_width}\) and the student's \(None, 10\)"):
            D.Distiller(teacher, student)

    @parameterized.parameters(2, 10)
    def test_packed_and_plain_targets_are_read_as_what_they_are(self, classes):
        # With 2 classes the packed targets (n, 2, 2) and one-hot labels (n, 2) share a dimension of 2.
        keras.utils.set_random_seed(0)
        teacher, student = _mlp(16, classes=classes, name="teacher"), _mlp(8, classes=classes, name="student")
        teacher.trainable = False
        x, _ = _data()
        y = np.arange(64) % classes
        _, y_fit = D.attach_teacher((x, y), teacher, student=student)
        s = student(x)
        t = teacher.predict(x, verbose=0)
        ce = np.asarray(keras.losses.sparse_categorical_crossentropy(y, s, from_logits=True))
        kd = np.asarray(D.kd_loss(t, s, 2.0))
        loss = D.DistillationLoss(temperature=2.0, alpha=0.3)
        self.assertAllClose(float(loss(y_fit, s)), np.mean(0.3 * ce + 0.7 * kd), rtol=1e-5)
        one_hot = keras.utils.to_categorical(y, classes)
        for plain in (y, y[:, None], one_hot):
            self.assertAllClose(float(loss(plain, s)), np.mean(ce), rtol=1e-5)
        accuracy = float(np.mean(np.argmax(np.asarray(s), -1) == y))
        for targets in (y_fit, y, one_hot):
            m = D.LabelAccuracy()
            m.update_state(targets, s)
            self.assertAllClose(float(m.result()), accuracy)

    def test_old_two_dimensional_packing_is_refused(self):
        teacher, student = _frozen_teacher(), _mlp(8, name="student")
        x, y = _data()
        old = np.concatenate([y[:, None].astype("float32"), teacher.predict(x, verbose=0)], axis=1)  # (64, 5)
        with self.assertRaisesRegex(ValueError, r"targets have shape \(64, 5\).*older tfopt must be made again"):
            D.DistillationLoss()(old, student(x))

    def test_distiller_refuses_packed_targets(self):
        teacher, student = _frozen_teacher(), _mlp(8, name="student")
        x, y = _data()
        _, y_fit = D.attach_teacher((x, y), teacher)
        distiller = D.Distiller(teacher, student)
        with self.assertRaisesRegex(ValueError, r"packed targets of `attach_teacher`.*Fix: pass the labels"):
            distiller.compute_loss(x, y_fit, student(x), training=False)

    def test_unsigned_labels_with_unlabelled_inputs(self):
        teacher = _frozen_teacher()
        x, y = _data()
        _, y_fit = D.attach_teacher((x, y.astype("uint8")), teacher, unlabelled=_data(8, seed=1)[0])
        self.assertAllEqual(np.argmax(y_fit[:64, 0], -1), y)
        self.assertAllEqual(y_fit[64:, 0], np.zeros((8, 4)))

    def test_unlabelled_inputs_of_another_structure_or_shape(self):
        teacher = _frozen_teacher()
        x, y = _data()
        with self.assertRaisesRegex(ValueError, r"structured like the labelled inputs `x`, which are one array"):
            D.attach_teacher((x, y), teacher, unlabelled=[x[:4]])
        with self.assertRaisesRegex(ValueError, r"have shape \(4, 8, 1\) but the labelled inputs `x` have shape "
                                                r"\(64, 8\).*Fix"):
            D.attach_teacher((x, y), teacher, unlabelled=x[:4, :, None])
        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
        with self.assertRaisesRegex(ValueError, r"have shape \(4, 6\) but the labelled inputs `x` have shape"):
            D.attach_teacher(data, teacher, unlabelled=x[:4, :6])


def _softmax_twin(model, name="soft_teacher"):
    """`model` with a softmax on its logits (same weights), frozen like its layers."""
    twin = keras.Model(model.inputs, keras.layers.Activation("softmax")(model.outputs[0]), name=name)
    twin.trainable = model.trainable
    return twin


class ProbabilityTeacherTest(testing.TestCase):
    def test_cached_softmax_teacher_warns_and_matches_the_logits_teacher(self):
        teacher, student = _frozen_teacher(), _mlp(8, name="student")
        soft = _softmax_twin(teacher)
        x, y = _data()
        _, y_logits = D.attach_teacher((x, y), teacher)
        with self.assertWarnsRegex(UserWarning, r"teacher 'soft_teacher' outputs probabilities.*final activation "
                                                r"is softmax.*converted with log\(\).*teacher_outputs=\"probabilities\""):
            _, y_soft = D.attach_teacher((x, y), soft)
        loss = D.DistillationLoss(temperature=4.0, alpha=0.5)
        self.assertAllClose(float(loss(y_soft, student(x))), float(loss(y_logits, student(x))), rtol=1e-5)
        # Precomputed probabilities are recognized by their rows.
        probabilities = soft.predict(x, verbose=0)
        with self.assertWarnsRegex(UserWarning, r"non-negative and sums to 1"):
            _, y_rows = D.attach_teacher((x, y), probabilities)
        self.assertAllClose(float(loss(y_rows, student(x))), float(loss(y_logits, student(x))), rtol=1e-5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # declared: no warning
            _, y_declared = D.attach_teacher((x, y), soft, teacher_outputs="probabilities")
            _, y_as_is = D.attach_teacher((x, y), probabilities, teacher_outputs="logits")
        self.assertAllClose(y_declared, y_soft)
        self.assertAllClose(y_as_is[:, 1], probabilities)

    def test_distiller_with_a_softmax_teacher_warns_and_matches_the_logits_teacher(self):
        teacher, student = _frozen_teacher(), _mlp(8, name="student")
        soft = _softmax_twin(teacher)
        x, y = _data()
        with self.assertWarnsRegex(UserWarning, r"Distiller: the teacher 'soft_teacher' outputs probabilities.*"
                                                r"teacher_outputs=\"probabilities\""):
            online_soft = D.Distiller(soft, student)
        self.assertEqual(online_soft.teacher_outputs, "probabilities")
        online = D.Distiller(teacher, student)
        self.assertEqual(online.teacher_outputs, "logits")
        s = student(x)
        self.assertAllClose(float(online_soft.compute_loss(x, y, s, training=False)),
                            float(online.compute_loss(x, y, s, training=False)), rtol=1e-5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            D.Distiller(soft, student, teacher_outputs="probabilities")
            # Probabilities on both sides (from_logits=False) was already declared: no warning.
            both = D.Distiller(soft, _softmax_twin(student, "soft_student"), from_logits=False)
        self.assertEqual(both.teacher_outputs, "probabilities")

    def test_resolved_teacher_outputs_round_trip_without_a_warning(self):
        teacher = _frozen_teacher()
        with self.assertWarns(UserWarning):
            distiller = D.Distiller(_softmax_twin(teacher), _mlp(8, name="student"))
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            copy = D.Distiller.from_config(distiller.get_config())
        self.assertEqual(copy.teacher_outputs, "probabilities")


class DistillerCompileLossTest(testing.TestCase):
    def test_loss_as_keras_distiller(self):
        teacher, student = _frozen_teacher(), _mlp(8, name="student")
        x, y = _data()
        supervised = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        ours = D.Distiller(teacher, student, temperature=3.0, alpha=0.3)
        ours.compile("adam", loss=supervised)
        theirs = keras.distillation.Distiller(
            teacher, student, keras.distillation.LogitsDistillation(temperature=3.0, loss=keras.losses.KLDivergence()),
            student_loss_weight=0.3)
        theirs.compile("adam", loss=supervised)
        s = student(x)
        ours_value = float(ours.compute_loss(x, y, s, training=False))
        self.assertAllClose(ours_value, float(theirs.compute_loss(x, y, s, training=False)), rtol=1e-4)
        # and equal to the built-in label loss, which is the same crossentropy
        builtin = D.Distiller(teacher, student, temperature=3.0, alpha=0.3)
        self.assertAllClose(ours_value, float(builtin.compute_loss(x, y, s, training=False)), rtol=1e-5)

    def test_loss_is_used(self):
        teacher, student = _frozen_teacher(), _mlp(8, name="student")
        x, y = _data()

        def seven(y_true, y_pred):
            return ops.zeros_like(y_pred[:, 0]) + 7.0

        distiller = D.Distiller(teacher, student, temperature=2.0, alpha=0.25)
        distiller.compile("adam", loss=seven)
        s = student(x)
        kd = np.mean(np.asarray(D.kd_loss(teacher.predict(x, verbose=0), s, 2.0)))
        self.assertAllClose(float(distiller.compute_loss(x, y, s, training=False)), 0.25 * 7.0 + 0.75 * kd,
                            rtol=1e-5)
        distiller.compile("adam", loss="mean_squared_error")  # a name, as in Keras
        one_hot = keras.utils.to_categorical(y, 4)
        mse = np.mean(np.asarray(keras.losses.mean_squared_error(one_hot, s)))
        self.assertAllClose(float(distiller.compute_loss(x, one_hot, s, training=False)), 0.25 * mse + 0.75 * kd,
                            rtol=1e-5)
        with self.assertRaisesRegex(ValueError, r"`loss` is the student's one supervised loss.*Received: loss=\["):
            distiller.compile("adam", loss=["mse"])

    def test_compiled_loss_trains_and_survives_saving(self):
        teacher, student = _frozen_teacher(), _mlp(8, name="student")
        x, y = _data()
        distiller = D.Distiller(teacher, student, alpha=0.5)
        distiller.compile("adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, name="sup"),
                          metrics=["accuracy"])
        history = distiller.fit(x, y, batch_size=16, epochs=2, verbose=0)
        self.assertLess(history.history["loss"][-1], history.history["loss"][0])
        path = os.path.join(tempfile.mkdtemp(), "compiled.keras")
        distiller.save(path)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # Keras warns when it cannot compile a loaded model
            loaded = keras.models.load_model(path)
        self.assertTrue(loaded.compiled)
        self.assertIsInstance(loaded._student_loss, keras.losses.SparseCategoricalCrossentropy)
        s = loaded.student(x)
        self.assertAllClose(float(loaded.compute_loss(x, y, s, training=False)),
                            float(distiller.compute_loss(x, y, s, training=False)), rtol=1e-5)
        loaded.fit(x, y, batch_size=16, verbose=0)


class NumpyScalarsTest(testing.TestCase):
    def test_numpy_scalars_are_numbers(self):
        teacher, student = _frozen_teacher(), _mlp(8, name="student")
        x, y = _data()
        x_fit, y_fit = D.attach_teacher((x, y), teacher, batch_size=np.int32(16))
        numpy_loss = D.DistillationLoss(temperature=np.float32(2.0), alpha=np.float64(0.25))
        python_loss = D.DistillationLoss(temperature=2.0, alpha=0.25)
        self.assertAllClose(float(numpy_loss(y_fit, student(x))), float(python_loss(y_fit, student(x))))
        self.assertEqual(D.DistillationLoss(temperature=np.int32(4)).temperature, 4.0)
        config = numpy_loss.get_config()
        self.assertEqual((type(config["temperature"]), type(config["alpha"])), (float, float))
        distiller = D.Distiller(teacher, student, temperature=np.int32(4), alpha=np.float32(0.5), losses=[
            D.FeatureHint("teacher_hidden", "student_hidden", weight=np.float32(0.1))])
        self.assertEqual((distiller.temperature, distiller.alpha), (4.0, 0.5))
        self.assertEqual(type(distiller.feature_losses[0].weight), float)
        attention = D.AttentionTransfer("a", "b", weight=np.int64(2), p=np.int32(2))
        self.assertEqual(attention.get_config(), {"teacher_layer": "a", "student_layer": "b", "weight": 2.0, "p": 2})
        self.assertEqual(type(attention.p), int)
        D.attach_teacher((x, y), teacher, student=np.int64(4))


@pytest.mark.slow
class CombinedRecipeTest(testing.TestCase):
    def test_distill_prune_quantize_exports_int8_with_parity(self):
        from tfopt.demo.data import compile_classifier, build_cnn, load_digits

        x_train, y_train, x_test, y_test = load_digits(0)
        keras.utils.set_random_seed(0)
        teacher = build_cnn()
        compile_classifier(teacher)
        teacher.fit(x_train, y_train, epochs=6, verbose=0)
        teacher.trainable = False
        x_fit, y_fit = D.attach_teacher((x_train, y_train), teacher)
        schedule = tfopt.schedules.PolynomialDecay(0.0, 0.8, "0%", "50%", frequency="10%")
        student = tfopt.quantize_model(tfopt.prune(build_cnn(), schedule), "int8")
        student.compile(keras.optimizers.Adam(2e-3), D.DistillationLoss(), metrics=[D.LabelAccuracy()])
        student.fit(x_fit, y_fit, batch_size=32, epochs=8, verbose=0,
                    callbacks=[tfopt.callbacks.Pruning(), tfopt.callbacks.QuantizationSchedule(freeze_ranges=0.75)])
        path = os.path.join(tempfile.mkdtemp(), "combined.tflite")
        report = tfopt.export(student, path, inputs=x_test, precision="int8")
        self.assertEqual(report.float_ops, [])
        self.assertGreaterEqual(report.top1_agreement, 0.99)
        self.assertAllClose(report.sparsity, 0.8, atol=0.01)
        from tfopt.demo.data import litert_accuracy

        keras_acc = float(np.mean(np.argmax(student.predict(x_test, verbose=0), -1) == y_test))
        self.assertLessEqual(abs(litert_accuracy(path, x_test, y_test) - keras_acc), 0.005)


class UnevenBatchesTest(testing.TestCase):
    def test_last_partial_batch(self):
        teacher, student = _frozen_teacher(), _mlp(8, name="student")
        x, y = _data(50)  # 50 = 3 x 16 + 2: the batch dimension is dynamic
        distiller = D.Distiller(teacher, student)
        distiller.compile("adam")
        history = distiller.fit(x, y, batch_size=16, verbose=0)
        self.assertTrue(np.isfinite(history.history["loss"][0]))
        x_fit, y_fit = D.attach_teacher((x, y), teacher)
        student.compile("adam", D.DistillationLoss())
        history = student.fit(x_fit, y_fit, batch_size=16, verbose=0)
        self.assertTrue(np.isfinite(history.history["loss"][0]))
        # The 2-sample tail batch, traced with an unknown batch size, gives the same loss both ways.
        tail = tf.function(lambda xb, yb: distiller.compute_loss(xb, yb, student(xb), training=False),
                           input_signature=[tf.TensorSpec((None, 8)), tf.TensorSpec((None,), tf.int64)])
        online = float(tail(x[48:], y[48:].astype("int64")))
        cached = float(D.DistillationLoss()(y_fit[48:], student(x[48:])))
        self.assertAllClose(online, cached, rtol=1e-5)
