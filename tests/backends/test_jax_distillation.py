"""Distillation under `KERAS_BACKEND=jax` (issue 23): `Distiller` (kd, reverse_kl, mse, feature
losses, a temperature schedule, `compile(loss=...)`), the cached teacher (`attach_teacher` +
`DistillationLoss` + `LabelAccuracy`) and sequence distillation give, epoch by epoch, the losses
TensorFlow gives from the same numpy weights, data and SGD steps; `attach_teacher` and `Distiller`
load no TensorFlow; `.keras` files of a Distiller and its student load under the other backend.
This process runs TensorFlow, so each script runs in a child process (`run_script`)."""

import atexit
import os
import shutil
import tempfile
import unittest

import keras
import numpy as np
import pytest

import tfopt  # noqa: F401  (registers the Distiller for loading)
from tfopt import testing
from tfopt.testing.backends import HAS_JAX as _HAS_JAX
from tfopt.testing.backends import run_script as _run

_DIR = tempfile.mkdtemp(prefix="tfopt-jax-distillation-")
atexit.register(shutil.rmtree, _DIR, True)

_HEAD = f"""
import os, sys
DIR = {_DIR!r}
backend = keras.backend.backend()
"""

_CLASSIFIERS = _HEAD + """
rng = np.random.default_rng(3)
xs = rng.standard_normal((32, 8, 8, 1)).astype("float32")
labels = (np.arange(32) % 4).astype("int32")

def cnn(width, name):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(width, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.Conv2D(width, 3, activation="relu", name="block")(x)
    outputs = keras.layers.Dense(4, name="logits")(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs, name=name)
    set_weights(model)
    return model

fit = dict(batch_size=8, epochs=2, shuffle=False, verbose=0)
out = {"backend": backend}
teacher = cnn(6, "teacher")
teacher.trainable = False
for method in ("kd", "reverse_kl", "mse"):
    distiller = tfopt.distillation.Distiller(teacher, cnn(3, "student"), method=method)
    distiller.compile(keras.optimizers.SGD(0.05), metrics=["accuracy"])
    out[method] = distiller.fit(xs, labels, **fit).history
# Feature losses: a hint through a learned projection (3 -> 6 channels) and attention transfer.
distiller = tfopt.distillation.Distiller(teacher, cnn(3, "student"), losses=[
    tfopt.distillation.FeatureHint("block", "block", weight=0.5), tfopt.distillation.AttentionTransfer("conv", "conv")])
distiller.projections[0].set_weights([0.1 * np.random.default_rng(4).standard_normal((3, 6)).astype("float32")])
distiller.compile(keras.optimizers.SGD(0.05))
out["features"] = distiller.fit(xs, labels, **fit).history
# Cached teacher outputs.
x_fit, y_fit = tfopt.distillation.attach_teacher((xs, labels), teacher)
out["tensorflow_loaded"] = "tensorflow" in sys.modules  # Distiller and attach_teacher import none (saving does)
# A temperature schedule (the optimizer's step, read in JAX's stateless step), the student's own loss,
# validation and evaluate (whose step JAX reads when it traces the test step).
temperature = keras.optimizers.schedules.PolynomialDecay(4.0, 8, 1.0)
distiller = tfopt.distillation.Distiller(teacher, cnn(3, "student"), temperature=temperature)
distiller.compile(keras.optimizers.SGD(0.05), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
out["schedule"] = distiller.fit(xs, labels, validation_data=(xs[:8], labels[:8]), **fit).history
out["schedule_evaluate"] = distiller.evaluate(xs[:8], labels[:8], verbose=0)
distiller.save(os.path.join(DIR, f"distiller_{backend}.keras"))
distiller.student.save(os.path.join(DIR, f"student_{backend}.keras"))
out["student_pred"] = distiller.student.predict(xs[:4], verbose=0).tolist()
out["distiller_evaluate"] = distiller.evaluate(xs[:8], labels[:8], verbose=0)
student = cnn(3, "student")
student.compile(keras.optimizers.SGD(0.05), loss=tfopt.distillation.DistillationLoss(temperature=2.0),
                metrics=[tfopt.distillation.LabelAccuracy()])
out["cached"] = student.fit(x_fit, y_fit, validation_data=(xs[:8], labels[:8]), **fit).history
try:
    tfopt.distillation.DistillationLoss(temperature=temperature)
    out["loss_schedule_error"] = None
except ValueError as error:
    out["loss_schedule_error"] = str(error)
print("RESULT " + json.dumps(out))
"""

_SEQUENCES = _HEAD + """
rng = np.random.default_rng(5)
tokens = rng.integers(0, 20, (16, 7)).astype("int32")
mask = np.ones((16, 6), "int32")
mask[::3, 4:] = 0  # padding
x = {"token_ids": tokens[:, :-1], "padding_mask": mask}
y = tokens[:, 1:].copy()
y[1::4, 0] = -1  # no label there
weights = np.ones((16, 6), "float32")
weights[::5] = 0.5

def lm(width, name):
    ids = keras.Input((6,), dtype="int32", name="token_ids")
    pad = keras.Input((6,), dtype="int32", name="padding_mask")
    h = keras.layers.Embedding(20, width, name="embed")(ids)
    h = h * keras.ops.expand_dims(keras.ops.cast(pad, "float32"), -1)
    h = keras.layers.Dense(width, activation="relu", name="block")(h)
    model = keras.Model({"token_ids": ids, "padding_mask": pad}, keras.layers.Dense(20, name="logits")(h), name=name)
    set_weights(model)
    return model

fit = dict(batch_size=4, epochs=2, shuffle=False, verbose=0)
out = {"backend": backend}
teacher = lm(12, "teacher")
teacher.trainable = False
for method in ("kd", "reverse_kl", "mse"):
    distiller = tfopt.distillation.Distiller(teacher, lm(6, "student"), method=method, temperature=2.0)
    distiller.compile(keras.optimizers.SGD(0.1))
    out[method] = distiller.fit(x, y, sample_weight=weights, **fit).history
distiller = tfopt.distillation.Distiller(teacher, lm(6, "student"), losses=[tfopt.distillation.FeatureHint("block", "block")])
distiller.projections[0].set_weights([0.1 * np.random.default_rng(4).standard_normal((6, 12)).astype("float32")])
distiller.compile(keras.optimizers.SGD(0.1))
out["features"] = distiller.fit(x, y, **fit).history
x_fit, y_fit = tfopt.distillation.attach_teacher((x, y), teacher, top_k=5)
out["packed"] = {"shape": list(y_fit.shape), "sum": float(np.abs(y_fit).sum())}
out["tensorflow_loaded"] = "tensorflow" in sys.modules
student = lm(6, "student")
student.compile(keras.optimizers.SGD(0.1), loss=tfopt.distillation.DistillationLoss(temperature=2.0),
                metrics=[tfopt.distillation.LabelAccuracy()])
out["cached"] = student.fit(x_fit, y_fit, sample_weight=weights, **fit).history
out["cached_evaluate"] = student.evaluate(x, y, verbose=0)
print("RESULT " + json.dumps(out))
"""

# Loads the files TensorFlow wrote (run after _CLASSIFIERS under TensorFlow).
_LOAD = _HEAD + """
xs = np.random.default_rng(3).standard_normal((32, 8, 8, 1)).astype("float32")
labels = (np.arange(32) % 4).astype("int32")
student = keras.models.load_model(os.path.join(DIR, "student_tensorflow.keras"))
distiller = keras.models.load_model(os.path.join(DIR, "distiller_tensorflow.keras"))
print("RESULT " + json.dumps({"backend": backend, "student_pred": student.predict(xs[:4], verbose=0).tolist(),
                              "distiller_pred": distiller.student.predict(xs[:4], verbose=0).tolist(),
                              "distiller_evaluate": distiller.evaluate(xs[:8], labels[:8], verbose=0)}))
"""

_ATOL = 1e-5


@unittest.skipUnless(_HAS_JAX, "jax is not installed (pip install jax[cpu])")
class JaxDistillationTest(testing.TestCase):
    def _result(self, script, backend="jax"):
        run = _run(script, backend, timeout=300)
        self.assertIsInstance(run, dict, getattr(run, "stderr", "")[-3000:])
        self.assertEqual(run["backend"], backend)
        return run

    def assertSameLosses(self, a, b, what):
        a, b = np.asarray(a, "float64"), np.asarray(b, "float64")
        self.assertEqual(a.shape, b.shape, what)
        self.assertLessEqual(float(np.abs(a - b).max()), _ATOL, f"{what}: JAX {a.tolist()}, TensorFlow {b.tolist()}")

    def _compare(self, script, keys):
        jax_run, tf_run = self._result(script), self._result(script, "tensorflow")
        for key in keys:
            self.assertEqual(sorted(jax_run[key]), sorted(tf_run[key]), key)
            for name in jax_run[key]:
                self.assertSameLosses(jax_run[key][name], tf_run[key][name], f"{key} {name}")
        return jax_run, tf_run

    @pytest.mark.slow  # a JAX and a TensorFlow child (about 35 s)
    def test_classifier_distillation_equals_tensorflow(self):
        jax_run, tf_run = self._compare(_CLASSIFIERS, ("kd", "reverse_kl", "mse", "features", "schedule", "cached"))
        self.assertSameLosses(jax_run["schedule_evaluate"], tf_run["schedule_evaluate"], "evaluate")
        self.assertFalse(jax_run["tensorflow_loaded"])
        # The schedule moved: T from 4 to 1 over the 8 steps changes the validation loss.
        self.assertNotAlmostEqual(jax_run["schedule"]["val_loss"][0], jax_run["schedule"]["val_loss"][1], places=6)

    @pytest.mark.slow  # a JAX and a TensorFlow child (about 30 s)
    def test_sequence_distillation_equals_tensorflow(self):
        jax_run, tf_run = self._compare(_SEQUENCES, ("kd", "reverse_kl", "mse", "features", "cached"))
        self.assertEqual(jax_run["packed"], tf_run["packed"])
        self.assertSameLosses(jax_run["cached_evaluate"], tf_run["cached_evaluate"], "evaluate")
        self.assertFalse(jax_run["tensorflow_loaded"])

    @pytest.mark.slow  # shares the classifier children
    def test_loss_schedule_under_jax_names_the_distiller(self):
        error = self._result(_CLASSIFIERS)["loss_schedule_error"]
        self.assertIsNotNone(error)
        self.assertIn("`temperature` is a schedule", error)
        self.assertIn("tfopt.distillation.Distiller(teacher, student, temperature=...)", error)

    @pytest.mark.slow  # the classifier children of both backends, then a JAX loader (about 10 s more)
    def test_keras_files_load_under_the_other_backend(self):
        jax_run, tf_run = self._result(_CLASSIFIERS), self._result(_CLASSIFIERS, "tensorflow")
        xs = np.random.default_rng(3).standard_normal((32, 8, 8, 1)).astype("float32")
        labels = (np.arange(32) % 4).astype("int32")
        # Written under JAX, loaded here (TensorFlow).
        student = keras.models.load_model(os.path.join(_DIR, "student_jax.keras"))
        self.assertSameLosses(student.predict(xs[:4], verbose=0), jax_run["student_pred"], "student from JAX")
        distiller = keras.models.load_model(os.path.join(_DIR, "distiller_jax.keras"))
        self.assertIsInstance(distiller, tfopt.distillation.Distiller)
        self.assertSameLosses(distiller.student.predict(xs[:4], verbose=0), jax_run["student_pred"],
                              "distiller from JAX")
        self.assertSameLosses(distiller.evaluate(xs[:8], labels[:8], verbose=0), jax_run["distiller_evaluate"],
                              "evaluate of the distiller from JAX")
        # Written under TensorFlow, loaded under JAX.
        loaded = self._result(_LOAD)
        self.assertSameLosses(loaded["student_pred"], tf_run["student_pred"], "student from TensorFlow")
        self.assertSameLosses(loaded["distiller_pred"], tf_run["student_pred"], "distiller from TensorFlow")
        self.assertSameLosses(loaded["distiller_evaluate"], tf_run["distiller_evaluate"],
                              "evaluate of the distiller from TensorFlow")
