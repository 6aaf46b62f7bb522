"""Quantization-aware training under `KERAS_BACKEND=jax` (issue 23): `quantize_model` twins
(Conv2D with a folded BatchNormalization, DepthwiseConv2D with one, Dense, LayerNormalization,
MultiHeadAttention, LSTM, GRU), `QuantizationSchedule` and `quantize_weights` compute under JAX
what they compute under TensorFlow from the same numpy weights, data and SGD steps; `.keras`
files written under one backend load under the other with the same outputs and state.

This process runs TensorFlow, so each script runs in a child process (`run_script`). JAX runs
each script twice: jit-compiled (as `fit` runs by default) and with `jit_compile=False`. The
second equals TensorFlow to float rounding. XLA fuses float ops and rounds some sums
differently, and fake quantization is a step function: a value that lands on the other side
of a rounding boundary moves one quantization step (measured on the sequence model: int8
gradients equal to 1e-8 with jit_compile=False, and one flip after 2 jit-compiled steps).
So the jit-compiled run is compared with a tolerance that one flip fits in.
"""

import atexit
import os
import shutil
import tempfile
import unittest

import keras
import numpy as np
import pytest

import tfopt
from tfopt import testing
from tfopt.testing.backends import HAS_JAX as _HAS_JAX
from tfopt.testing.backends import run_script as _run

_DIR = tempfile.mkdtemp(prefix="tfopt-jax-quantization-")
atexit.register(shutil.rmtree, _DIR, True)

# What every script shares: where the .keras files go, and a model's state as JSON.
_HEAD = f"""
import os
DIR = {_DIR!r}
backend = keras.backend.backend()
modes = ("auto", False) if backend == "jax" else ("auto",)  # JAX: jit-compiled, then not

def state(model):
    return {{w.path: np.asarray(keras.ops.convert_to_numpy(w), "float64").ravel().tolist() for w in model.weights}}

class EpochStates(keras.callbacks.Callback):  # (JAX writes its state back to the variables at epoch ends)
    def __init__(self):
        super().__init__()
        self.states = []

    def on_epoch_end(self, epoch, logs=None):
        self.states.append(state(self.model))
"""

_CNN = _HEAD + """
def cnn():
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)  # folded into conv
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.DepthwiseConv2D(3, name="dw")(x)
    x = keras.layers.BatchNormalization(name="dw_bn")(x)  # folded into dw
    x = keras.layers.ReLU(name="relu2")(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(4, name="dense")(x)
    model = keras.Model(inputs, outputs)
    set_weights(model)
    return model

x, y = data()
out = {"backend": backend}
for jit in modes:
    keras.utils.clear_session()  # the same layer names in each run (and under each backend)
    qat = tfopt.quantize_model(cnn(), "int8")
    qat.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=jit)
    epochs = EpochStates()
    fit = dict(batch_size=4, shuffle=False, verbose=0)  # 4 steps an epoch
    # Fake quantization from step 2; ranges frozen from step 4; BN statistics from half of the fit (4).
    first = qat.fit(x, y, epochs=2, callbacks=[tfopt.callbacks.QuantizationSchedule(
        start=2, freeze_ranges=4, freeze_batch_norm=0.5), epochs], **fit)
    # A new schedule (fractions, nothing frozen): JAX traces the step again.
    second = qat.fit(x, y, epochs=2, callbacks=[tfopt.callbacks.QuantizationSchedule(start=0.25), epochs], **fit)
    out["int8" if jit else "int8_eager"] = {
        "loss": first.history["loss"] + second.history["loss"], "epochs": epochs.states,
        "pred": qat.predict(x[:4], verbose=0).tolist()}
    if jit:
        out["layers"] = [type(layer).__name__ for layer in qat.layers]
        qat.save(os.path.join(DIR, f"cnn_{backend}.keras"))
keras.utils.clear_session()
qat = tfopt.quantize_model(cnn(), "int4")
qat.compile(keras.optimizers.SGD(0.01), "mse")
history = qat.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
out["int4"] = {"loss": history.history["loss"], "state": state(qat), "pred": qat.predict(x[:4], verbose=0).tolist()}
print("RESULT " + json.dumps(out))
"""

_SEQUENCE = _HEAD + """
def sequence_model():
    inputs = keras.Input((6, 8))
    x = keras.layers.Dense(16, name="embed")(inputs)
    x = keras.layers.LayerNormalization(name="ln1")(x)
    a = keras.layers.MultiHeadAttention(2, 8, name="mha")(x, x, use_causal_mask=True)
    x = keras.layers.Add(name="add")([x, a])
    x = keras.layers.LayerNormalization(name="ln2")(x)
    x = keras.layers.LSTM(8, return_sequences=True, name="lstm")(x)
    x = keras.layers.GRU(8, name="gru")(x)
    outputs = keras.layers.Dense(4, name="head")(x)
    model = keras.Model(inputs, outputs)
    set_weights(model)
    return model

rng = np.random.default_rng(2)
xs = rng.standard_normal((16, 6, 8)).astype("float32")
ys = data()[1]
out = {"backend": backend}
for precision, jit in [("int8", m) for m in modes] + [("int4", "auto")]:
    keras.utils.clear_session()  # the same layer names in each run (and under each backend)
    qat = tfopt.quantize_model(sequence_model(), precision)
    qat.compile(keras.optimizers.SGD(0.05), "mse", jit_compile=jit)
    history = qat.fit(xs, ys, batch_size=4, epochs=2, shuffle=False, verbose=0)
    out[precision if jit else precision + "_eager"] = {
        "loss": history.history["loss"], "state": state(qat), "pred": qat.predict(xs[:4], verbose=0).tolist()}
    if precision == "int8" and jit:
        out["layers"] = [type(layer).__name__ for layer in qat.layers]
        qat.save(os.path.join(DIR, f"sequence_{backend}.keras"))
# Weight-only QAT (`quantize_weights`, the LiteRT weight-only precisions), in place.
for precision in ("int4_weight_only", "int4_block32"):
    keras.utils.clear_session()
    inputs = keras.Input((6, 32))
    x = keras.layers.Dense(32, name="dense")(inputs)
    x = keras.layers.EinsumDense("abc,cd->abd", output_shape=(6, 16), name="einsum")(x)
    outputs = keras.layers.Dense(4, name="head")(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    set_weights(model)
    tfopt.quantize_weights(model, precision)
    model.compile(keras.optimizers.SGD(0.05), "mse")
    wide = np.random.default_rng(3).standard_normal((16, 6, 32)).astype("float32")
    history = model.fit(wide, ys, batch_size=4, epochs=2, shuffle=False, verbose=0)
    out[precision] = {"loss": history.history["loss"], "state": state(model),
                      "pred": model.predict(wide[:4], verbose=0).tolist()}
print("RESULT " + json.dumps(out))
"""

# Loads the files the other backend wrote (run after _CNN and _SEQUENCE under both).
_LOAD = _HEAD + """
other = "tensorflow" if backend == "jax" else "jax"
x, _ = data()
xs = np.random.default_rng(2).standard_normal((16, 6, 8)).astype("float32")
out = {"backend": backend}
for name, inputs in (("cnn", x[:4]), ("sequence", xs[:4])):
    model = keras.models.load_model(os.path.join(DIR, f"{name}_{other}.keras"))
    out[name] = {"pred": model.predict(inputs, verbose=0).tolist(), "state": state(model)}
print("RESULT " + json.dumps(out))
"""

#: Tolerances: the jit-compiled JAX run (one rounding flip fits), everything else (float rounding).
_JIT_ATOL = 1e-3
_ATOL = 2e-5


def _max_difference(a, b, path=""):
    """`(largest |a - b| over matching numbers of two JSON values, its path)`; structures must match."""
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(set(a) ^ set(b))} differ"
        return max((_max_difference(a[k], b[k], f"{path}/{k}") for k in a), default=(0.0, path))
    if isinstance(a, list) and a and isinstance(a[0], dict):
        assert len(a) == len(b), f"{path}: {len(a)} items against {len(b)}"
        return max((_max_difference(p, q, f"{path}[{i}]") for i, (p, q) in enumerate(zip(a, b))),
                   default=(0.0, path))
    if isinstance(a, str):
        assert a == b, f"{path}: {a!r} against {b!r}"
        return 0.0, path
    p, q = np.asarray(a, "float64"), np.asarray(b, "float64")
    assert p.shape == q.shape, f"{path}: shapes {p.shape} and {q.shape}"
    return (float(np.abs(p - q).max()) if p.size else 0.0), path


@unittest.skipUnless(_HAS_JAX, "jax is not installed (pip install jax[cpu])")
class JaxQuantizationTest(testing.TestCase):
    def _result(self, script, backend="jax"):
        run = _run(script, backend, timeout=400)
        self.assertIsInstance(run, dict, getattr(run, "stderr", "")[-3000:])
        self.assertEqual(run["backend"], backend)
        return run

    def assertSameRun(self, a, b, atol, what):
        difference, path = _max_difference(a, b)
        self.assertLessEqual(difference, atol, f"{what}: |JAX - TensorFlow| = {difference:.3g} at {path}")

    # --- JAX alone --------------------------------------------------------------------
    @pytest.mark.slow  # one JAX child training four CNNs (about 25 s)
    def test_cnn_schedule_freezes_and_resumes_under_jax(self):
        run = self._result(_CNN)
        # Both BatchNormalizations folded away, into the Conv2D and the DepthwiseConv2D twins.
        self.assertNotIn("BatchNormalization", run["layers"])
        for key in ("int8", "int8_eager"):
            first, second, third, fourth = run[key]["epochs"]
            for name in ("conv/output_range_max", "dw/output_range_min", "relu_quantize/range_max",
                         "conv/bn_moving_mean", "dw/bn_moving_variance"):
                # Frozen from step 4 (the end of the first epoch) in the first fit ...
                self.assertEqual(first[name], second[name], f"{key}: {name}")
                # ... moving again in the second fit, whose schedule freezes nothing.
                self.assertNotEqual(second[name], third[name], f"{key}: {name}")
            self.assertEqual(fourth["conv/output_range_updates"], [16.0])
            self.assertTrue(np.all(np.isfinite(run[key]["pred"])))

    # --- JAX against TensorFlow ---------------------------------------------------------
    @pytest.mark.slow  # a JAX and a TensorFlow child (about 40 s)
    def test_cnn_equals_tensorflow(self):
        jax_run, tf_run = self._result(_CNN), self._result(_CNN, "tensorflow")
        self.assertEqual(jax_run["layers"], tf_run["layers"])
        self.assertSameRun(jax_run["int8_eager"], tf_run["int8"], _ATOL, "int8, jit_compile=False")
        self.assertSameRun(jax_run["int8"], tf_run["int8"], _JIT_ATOL, "int8")
        self.assertSameRun(jax_run["int4"], tf_run["int4"], _JIT_ATOL, "int4")

    @pytest.mark.slow  # a JAX and a TensorFlow child (about 60 s)
    def test_sequence_model_equals_tensorflow(self):
        jax_run, tf_run = self._result(_SEQUENCE), self._result(_SEQUENCE, "tensorflow")
        self.assertEqual(jax_run["layers"], tf_run["layers"])
        for twin in ("Dense", "LayerNormalization", "MultiHeadAttention", "LSTM", "GRU"):
            self.assertIn(twin, jax_run["layers"])
        self.assertSameRun(jax_run["int8_eager"], tf_run["int8"], _ATOL, "int8, jit_compile=False")
        self.assertSameRun(jax_run["int8"], tf_run["int8"], _JIT_ATOL, "int8")
        self.assertSameRun(jax_run["int4"], tf_run["int4"], _JIT_ATOL, "int4")
        for precision in ("int4_weight_only", "int4_block32"):
            self.assertSameRun(jax_run[precision], tf_run[precision], _ATOL, precision)

    @pytest.mark.slow  # the CNN and sequence children of both backends, then a JAX loader (about 15 s more)
    def test_keras_files_load_under_the_other_backend(self):
        runs = {backend: {name: self._result(script, backend) for name, script in
                          (("cnn", _CNN), ("sequence", _SEQUENCE))} for backend in ("jax", "tensorflow")}
        x, _ = _prelude_data()
        xs = np.random.default_rng(2).standard_normal((16, 6, 8)).astype("float32")
        # Written under JAX, loaded here (TensorFlow).
        for name, inputs in (("cnn", x[:4]), ("sequence", xs[:4])):
            model = keras.models.load_model(os.path.join(_DIR, f"{name}_jax.keras"))
            self.assertIsInstance(model, tfopt.transforms.quantize.QuantizedModel)
            saved = runs["jax"][name]["int8"]
            self.assertSameRun(model.predict(inputs, verbose=0).tolist(), saved["pred"], 1e-5, f"{name} from JAX")
            final = saved["epochs"][-1] if name == "cnn" else saved["state"]
            self.assertSameRun(_state(model), final, 0.0, f"{name} state from JAX")
        # Written under TensorFlow, loaded under JAX.
        loaded = self._result(_LOAD)
        for name in ("cnn", "sequence"):
            saved = runs["tensorflow"][name]["int8"]
            self.assertSameRun(loaded[name]["pred"], saved["pred"], 1e-5, f"{name} from TensorFlow")
            final = saved["epochs"][-1] if name == "cnn" else saved["state"]
            self.assertSameRun(loaded[name]["state"], final, 0.0, f"{name} state from TensorFlow")


def _prelude_data():
    """`data()` of `tfopt.testing.backends.PRELUDE`."""
    rng = np.random.default_rng(1)
    return rng.standard_normal((16, 8, 8, 1)).astype("float32"), rng.standard_normal((16, 4)).astype("float32")


def _state(model):
    return {w.path: np.asarray(keras.ops.convert_to_numpy(w), "float64").ravel().tolist() for w in model.weights}


class WeightOnlyPrecisionTest(testing.TestCase):
    """(Any backend.) A weight-only precision pair would make twins that quantize nothing."""

    def test_quantize_model_refuses_a_weight_only_precision(self):
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="dense")])
        spec = tfopt.quantizers.QuantSpec(4, per_channel=True, symmetric=True, narrow_range=True)
        for kwargs in ({"numerical_precision": (spec, None)}, {"overrides": {"dense": (spec, None)}}):
            with self.assertRaisesRegex(ValueError, r"quantizes weights only .*tfopt\.quantize_weights"):
                tfopt.quantize_model(model, **kwargs)
