"""`tfopt.export` under `KERAS_BACKEND=jax` (issue 23): the model is rebuilt under TensorFlow in a
child process from a `.keras` file and exported there (`tfopt/_export/child.py`); the file is
checked against the JAX model's own outputs. This process runs TensorFlow, so the JAX script runs
in a child process (which starts its own TensorFlow child per export)."""

import pickle
import unittest

import numpy as np
import pytest

from tfopt import testing
from tfopt._export import child
from tfopt.testing.backends import HAS_JAX as _HAS_JAX
from tfopt.testing.backends import run_script as _run

# A CNN with BatchNormalization, quantize_model'd (trained a few steps under JAX), then exported in
# int8 (QAT ranges), float32 and int8_weight_only; then a failing export over the float file, and
# export_generator (refused under JAX).
# Under TensorFlow the same script (untrained) gives the error to compare with.
_EXPORTS = """
import hashlib, os, tempfile
from tfopt import exporting, litert
os.chdir(tempfile.mkdtemp())
inputs = keras.Input((8, 8, 1), name="image")
h = keras.layers.Conv2D(8, 3, name="conv")(inputs)
h = keras.layers.BatchNormalization(name="bn")(h)
h = keras.layers.ReLU(name="relu")(h)
h = keras.layers.Flatten(name="flatten")(h)
model = keras.Model(inputs, keras.layers.Dense(4, name="dense")(h), name="cnn")
set_weights(model)
q = tfopt.quantize_model(model)
x, y = data()
out = {"backend": keras.backend.backend()}
if out["backend"] == "jax":
    q.compile(keras.optimizers.SGD(0.01), "mse")
    q.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    own = exporting._outputs(q, [x])[0]  # the JAX model, fake quantization on
    for precision in ("int8", "float32", "int8_weight_only"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = tfopt.export(q, precision + ".tflite", inputs=x, precision=precision)
        content = open(r.path, "rb").read()
        got = litert.run_litert(content, [x], input_names=["image"])[0]  # the file, run here
        out[precision] = {"type": type(r).__name__, "size": r.size_bytes, "on_disk": len(content),
                          "top1": r.top1_agreement, "diff": r.max_abs_diff, "float_ops": r.float_ops,
                          "ranges": r.activation_ranges, "float_size": r.float_size_bytes,
                          "own_top1": float(np.mean(got.argmax(-1) == own.argmax(-1))),
                          "own_diff": float(np.abs(got - own).max()),
                          "warnings": [str(w.message)[:200] for w in caught if "tfopt" in str(w.message)]}
    before = hashlib.sha256(open("float32.tflite", "rb").read()).hexdigest()
    import keras_hub
    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=8, num_layers=1, num_heads=1, hidden_dim=4,
                                             intermediate_dim=4, max_sequence_length=4)
    try:
        tfopt.export_generator(keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None), "lm.tflite")
    except Exception as error:
        out["generator"] = [type(error).__name__, str(error)]
else:
    before = None
try:  # 288 inputs to the Dense layer: int4 in blocks of 64 is refused after converting
    tfopt.export(q, "float32.tflite", inputs=x, precision="int4_block64")
except Exception as error:
    out["error"] = [type(error).__name__, str(error), getattr(error, "__notes__", [])]
if before is not None:
    out["kept"] = hashlib.sha256(open("float32.tflite", "rb").read()).hexdigest() == before
print("RESULT " + json.dumps(out))
"""


@unittest.skipUnless(_HAS_JAX, "jax is not installed (pip install jax[cpu])")
@pytest.mark.slow  # two child processes, the JAX one starting four TensorFlow children (about 60 s)
class JaxExportTest(testing.TestCase):
    def _result(self, backend="jax"):
        run = _run(_EXPORTS, backend, timeout=300)
        self.assertIsInstance(run, dict, getattr(run, "stderr", "")[-3000:])
        self.assertEqual(run["backend"], backend)
        return run

    def test_int8_of_a_jax_trained_qat_cnn_is_full_integer(self):
        int8 = self._result()["int8"]
        self.assertEqual(int8["type"], "ExportReport")
        self.assertEqual(int8["float_ops"], [])
        self.assertEqual(int8["ranges"], "quantization-aware training")
        self.assertGreaterEqual(int8["top1"], 0.95)
        # The report's parity is the file's against the JAX model, as measured here independently.
        self.assertEqual(int8["top1"], int8["own_top1"])
        self.assertAlmostEqual(int8["diff"], int8["own_diff"], places=6)
        self.assertEqual(int8["size"], int8["on_disk"])
        self.assertEqual(int8["warnings"], [])

    def test_float32_and_weight_only(self):
        run = self._result()
        self.assertGreaterEqual(run["float32"]["own_top1"], 0.95)  # (fake quantization on in the JAX model)
        self.assertEqual(run["float32"]["top1"], run["float32"]["own_top1"])
        weight_only = run["int8_weight_only"]
        self.assertEqual(weight_only["float_size"], run["float32"]["size"])  # LiteRT's quantizer on the float file
        self.assertLess(weight_only["size"], run["float32"]["size"])
        self.assertEqual(weight_only["top1"], weight_only["own_top1"])

    def test_child_error_reaches_the_caller_as_under_tensorflow(self):
        jax_run, tf_run = self._result(), self._result("tensorflow")
        kind, message, notes = jax_run["error"]
        self.assertEqual([kind, message], tf_run["error"][:2])
        self.assertEqual(kind, "ValueError")
        self.assertIn("int4_block64", message)
        self.assertIn("KERAS_BACKEND=jax", " ".join(notes))
        self.assertTrue(jax_run["kept"])  # the float file written before is still there, unchanged


    def test_export_generator_says_it_needs_tensorflow(self):
        kind, message = self._result()["generator"]
        self.assertEqual(kind, "NotImplementedError")
        self.assertIn("under KERAS_BACKEND=jax", message)
        self.assertIn("in a process with KERAS_BACKEND=tensorflow", message)


class RebuildCheckTest(testing.TestCase):
    """The parent's check of the TensorFlow rebuild, and the error transport (no child process)."""

    def test_rebuild_within_float_rounding_passes(self):
        own = [np.linspace(-2, 2, 12, dtype="float32").reshape(3, 4)]
        child.check_rebuild(_Named(), [own[0] + 1e-6], own, quantized=False)
        child.check_rebuild(_Named(), [own[0] + 0.05], own, quantized=True)  # a quantization step or so

    def test_rebuild_that_computes_otherwise_raises(self):
        own = [np.linspace(-2, 2, 12, dtype="float32").reshape(3, 4)]
        with self.assertRaisesRegex(RuntimeError, r"model 'cnn'.*max \|TensorFlow - own backend\| 0\.5.*"
                                                  r"KERAS_BACKEND=tensorflow"):
            child.check_rebuild(_Named(), [own[0] + 0.5], own, quantized=False)
        with self.assertRaisesRegex(RuntimeError, "NaN/Inf"):
            child.check_rebuild(_Named(), [np.where(own[0] > 1, np.nan, own[0])], own, quantized=True)

    def test_errors_travel_as_themselves(self):
        record = child._error_record(ValueError("tfopt.export: bad"))
        error = child._error(pickle.loads(pickle.dumps(record)), "jax")
        self.assertIs(type(error), ValueError)
        self.assertEqual(str(error), "tfopt.export: bad")
        self.assertIn("KERAS_BACKEND=jax", error.__notes__[0])

        class Unpicklable(Exception):
            def __init__(self, a, b):
                super().__init__(f"{a} {b}")

        record = child._error_record(Unpicklable(1, 2))
        self.assertIsNone(record["pickled"])
        error = child._error(record, "jax")  # (its class is local: the type and message as text)
        self.assertIs(type(error), RuntimeError)
        self.assertIn("Unpicklable: 1 2", str(error))


class _Named:
    name = "cnn"
