"""Pruning under `KERAS_BACKEND=jax` (issue 23, first slice): schedules, tfopt layers and the
`Pruning` and `WidthPruning` callbacks train in JAX's stateless step, with the masks the TensorFlow
run of the same script finds; `tfopt.shrink` then removes what WidthPruning zeroed, and a `.keras`
file saved in the middle of pruning goes on training from the step it was saved at. On a backend
tfopt cannot prune on, the callbacks say so when attached. This process runs TensorFlow, so each
script runs in a child process."""

import unittest

import pytest

from tfopt import pruning, testing
from tfopt.testing.backends import HAS_JAX as _HAS_JAX
from tfopt.testing.backends import run_script as _run


_TWINS = """
import os, tempfile
schedule = tfopt.schedules.PolynomialDecay(0.0, 0.75, begin_step=0, end_step=4, power=1, frequency=1)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")  # JAX warns at each int64 it is asked for without x64
    inputs = keras.Input((8, 8, 1))
    x = tfopt.layers.Conv2D(8, 3, pruning_schedule=schedule, name="conv")(inputs)
    x = keras.layers.Flatten()(x)
    outputs = tfopt.layers.Dense(4, pruning_schedule=schedule, name="dense")(x)
    model = keras.Model(inputs, outputs)
    set_weights(model)
    model.compile(keras.optimizers.SGD(0.01), "mse")
    x, y = data()
    callback = tfopt.callbacks.Pruning()
    for _ in range(2):  # two fits: the second goes on from the first's masks and step
        model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0, callbacks=[callback])
int64 = sorted({str(w.message)[:100] for w in caught if "int64" in str(w.message)})
own = {layer.name: [int(layer.pruning_step),  # the layer's own step and mask, saved in .keras files
                    bool(np.array_equal(keras.ops.convert_to_numpy(layer.kernel_mask),
                                        keras.ops.convert_to_numpy(layer.kernel) != 0))]
       for layer in model.layers if hasattr(layer, "kernel_mask")}
path = os.path.join(tempfile.mkdtemp(), "twins.keras")
model.save(path)
loaded = keras.saving.load_model(path)
reloaded = {"iterations": int(keras.ops.convert_to_numpy(loaded.optimizer.iterations)),
            "steps": [int(layer.pruning_step) for layer in loaded.layers if hasattr(layer, "kernel_mask")]}
report(model, masks=True, own=own, int64=int64, reloaded=reloaded)
"""

_CALLBACK = """
schedule = tfopt.schedules.PolynomialDecay(0.0, 0.75, begin_step="0%", end_step="50%", power=1, frequency=1)
inputs = keras.Input((8, 8, 1))
x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inputs)
x = keras.layers.Flatten()(x)
outputs = keras.layers.Dense(16, name="dense")(x)  # 4,608 weights: the radix select, not the sort
model = keras.Model(inputs, outputs)
set_weights(model)
model.compile(keras.optimizers.SGD(0.01), "mse")
x, y = data()
y = np.tile(y, (1, 4))
model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0, callbacks=[tfopt.callbacks.Pruning(schedule)])
report(model, masks=True)
"""

_WIDTH = """
import os, tempfile
import tfopt.reporting
L, S = keras.layers, tfopt.schedules

def cnn():  # the digits-size CNN of issue 23's probe
    inputs = keras.Input((8, 8, 1))
    x = L.Conv2D(8, 3, name="conv")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU()(x)
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = L.Flatten()(x)
    x = L.Dense(16, activation="relu", name="hidden")(x)
    return keras.Model(inputs, L.Dense(4, name="dense")(x))

def transformer():  # attention heads, feed-forward units, a residual stream
    inputs = keras.Input((6, 8))
    x = L.Add()([inputs, L.MultiHeadAttention(4, 4, name="mha")(inputs, inputs)])
    f = L.Dense(16, activation="relu", name="ff_in")(x)
    x = L.Add()([x, L.Dense(8, name="ff_out")(f)])
    x = L.Dense(12, name="proj")(L.GlobalAveragePooling1D()(x))
    return keras.Model(inputs, L.Dense(4, name="dense")(x))

def masks(model):
    return {w.path: np.packbits(keras.ops.convert_to_numpy(w).ravel() != 0).tobytes().hex()
            for w in model.weights if len(w.shape) > 1}

def widths(model):
    return {layer.name: getattr(layer, "num_heads", None) or getattr(layer, "filters", None)
            or getattr(layer, "units", None) for layer in model.layers if layer.weights}

def train(build, callback, steps_per_execution=1, epochs=1, model=None):
    if model is None:
        model = build()
        set_weights(model)
        model.compile(keras.optimizers.SGD(0.01, momentum=0.9), "mse", steps_per_execution=steps_per_execution)
    x, y = data()
    if model.input_shape[1:] == (6, 8):
        x = x.reshape(16, 8, 8)[:, :6]
    history = model.fit(x, y, batch_size=4, epochs=epochs, shuffle=False, verbose=0, callbacks=[callback])
    return model, x, history.history

def case(build, callback, **kwargs):
    model, x, history = train(build, callback, **kwargs)
    stripped = tfopt.strip(model)
    small = tfopt.shrink(stripped)
    gap = float(np.max(np.abs(keras.ops.convert_to_numpy(small(x)) - keras.ops.convert_to_numpy(stripped(x)))))
    rows = tfopt.summary(model, print_fn=None)
    return {"masks": masks(model), "widths": widths(small), "shrink_gap": gap, "loss": history["loss"],
            "sparsity": round(history["sparsity"][-1], 6),
            "structure": sorted({row["structure"] for row in rows if row.get("structure") not in (None, "", "-")}),
            "macs": [tfopt.reporting.total_macs(tfopt.reporting.macs(m)) for m in (stripped, small)],
            "iterations": int(keras.ops.convert_to_numpy(model.optimizer.iterations))}

out = {"backend": keras.backend.backend()}
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # (a fit that ends before its ramp warns, as meant)
    out["constant"] = case(cnn, tfopt.callbacks.WidthPruning(S.ConstantSparsity(0.5, 0, frequency=1)))
    out["relative"] = case(cnn, tfopt.callbacks.WidthPruning(S.PolynomialDecay(0.0, 0.75, "0%", "50%", frequency=1)),
                           steps_per_execution=2, epochs=2)
    out["heads"] = case(transformer, tfopt.callbacks.WidthPruning(S.ConstantSparsity(0.75, 0, frequency=2),
                                                                  min_channels=2, layers=["mha", "ff_in"]))
    model = cnn()
    set_weights(model)
    plan = tfopt.plan_shrink(model, 0.5, importance="taylor", data=data(), loss="mse")
    out["taylor"] = {"removed": plan.removed, "roots": sorted(plan._removed)}
    # Saved in the middle of a ramp, loaded, trained on: the optimizer's step and slots come back.
    ramp = lambda: S.PolynomialDecay(0.0, 0.75, begin_step=0, end_step=8, power=1, frequency=1)
    path = os.path.join(tempfile.mkdtemp(), "pruned.keras")
    for name, make in (("width_reload", tfopt.callbacks.WidthPruning), ("pruning_reload", tfopt.callbacks.Pruning)):
        model, _, _ = train(cnn, make(ramp()))
        model.save(path)
        loaded = keras.saving.load_model(path)
        restored = int(keras.ops.convert_to_numpy(loaded.optimizer.iterations))
        _, _, history = train(None, make(ramp()), model=loaded)
        out[name] = {"restored_iterations": restored, "masks": masks(loaded), "sparsity": history["sparsity"],
                     "iterations": int(keras.ops.convert_to_numpy(loaded.optimizer.iterations))}
print("RESULT " + json.dumps(out))
"""

_OTHER_BACKEND = """
import sys
from tfopt import pruning
schedule = tfopt.schedules.ConstantSparsity(0.5, begin_step=0, frequency=1)
model = keras.Sequential([keras.Input((4,)), tfopt.layers.Dense(3, pruning_schedule=schedule, name="dense")])
out = {"backend": keras.backend.backend(), "tensorflow": "tensorflow" in sys.modules,
       "forward": list(keras.ops.convert_to_numpy(model(np.ones((2, 4), "float32"))).shape),
       "schedule": bool(schedule(keras.ops.convert_to_tensor(2))[0])}
for name, callback in (("pruning", tfopt.callbacks.Pruning(schedule)), ("width", tfopt.callbacks.WidthPruning(schedule))):
    try:
        callback.set_model(model)  # what fit does first (the numpy backend's fit itself is not implemented)
        out[name] = None
    except ValueError as e:
        out[name] = str(e)
print("RESULT " + json.dumps(out))
"""


@unittest.skipUnless(_HAS_JAX, "jax is not installed (pip install jax[cpu])")
class JaxPruningTest(testing.TestCase):
    def _result(self, script, backend="jax"):
        run = _run(script, backend)
        self.assertIsInstance(run, dict, getattr(run, "stderr", "")[-3000:])
        self.assertEqual(run["backend"], backend)
        return run

    def _assert_target_reached(self, run, target=0.75):
        for name in ("conv", "dense"):
            size = run[name]["size"]
            self.assertEqual(round(run[name]["sparsity"] * size), round(target * size), name)

    def test_import_loads_no_tensorflow(self):
        script = """
        import sys
        before = "tensorflow" in sys.modules
        tfopt.strategies.Mirrored  # a tf.distribute strategy: TensorFlow from here on
        print("RESULT " + json.dumps({"backend": keras.backend.backend(), "at_import": before,
                                      "after_strategy": "tensorflow" in sys.modules}))
        """
        run = _run(script, "jax")
        self.assertIsInstance(run, dict, getattr(run, "stderr", "")[-3000:])
        self.assertEqual(run, {"backend": "jax", "at_import": False, "after_strategy": True})

    def test_twins_reach_their_polynomial_target(self):
        run = self._result(_TWINS)
        self._assert_target_reached(run)
        # The layers' own masks and steps (those saved) got what the optimizer carried.
        self.assertEqual(run["own"], {"conv": [8, True], "dense": [8, True]})
        self.assertEqual(run["int64"], [])  # the steps are int32 under JAX without x64: no warning
        # A .keras reload restores the optimizer's step (the state tfopt lent it is not saved with it).
        self.assertEqual(run["reloaded"], {"iterations": 8, "steps": [8, 8]})

    def test_callback_reaches_a_relative_polynomial_target_on_a_cnn(self):
        self._assert_target_reached(self._result(_CALLBACK))

    @pytest.mark.slow  # a minute and more: JAX compiles each new shape of each model on the CPU
    def test_width_pruning_then_shrink(self):
        run = self._result(_WIDTH)
        for name, widths in (("constant", {"conv": 4, "hidden": 8}), ("relative", {"conv": 2, "hidden": 4}),
                             ("heads", {"mha": 2, "ff_in": 4, "ff_out": 8, "proj": 12})):
            with self.subTest(name):
                case = run[name]
                self.assertEqual({k: case["widths"][k] for k in widths}, widths)
                self.assertLess(case["shrink_gap"], 1e-5)  # the smaller model computes what the pruned one does
                self.assertEqual(case["structure"], ["width (channel groups)"])
                self.assertLess(case["macs"][1], case["macs"][0])
        self.assertEqual(run["relative"]["iterations"], 8)  # steps_per_execution=2, two epochs of 4 steps
        self.assertEqual(run["taylor"]["removed"], {"conv": [8, 4], "hidden": [16, 8]})
        for name in ("width_reload", "pruning_reload"):
            self.assertEqual([run[name]["restored_iterations"], run[name]["iterations"]], [4, 8], name)

    @pytest.mark.slow  # six child processes, three of them TensorFlow (about 2 min)
    def test_masks_equal_those_of_tensorflow(self):
        for script in (_TWINS, _CALLBACK):
            jax_run, tf_run = self._result(script), self._result(script, "tensorflow")
            self.assertEqual({**jax_run, "backend": None}, {**tf_run, "backend": None})
        # WidthPruning, shrink, Taylor scores and the reloads: the same masks, widths and removed units;
        # losses to float rounding.
        jax_run, tf_run = self._result(_WIDTH), self._result(_WIDTH, "tensorflow")
        for name in ("constant", "relative", "heads", "taylor", "width_reload", "pruning_reload"):
            with self.subTest(name):
                jax_case, tf_case = dict(jax_run[name]), dict(tf_run[name])
                self.assertAllClose(jax_case.pop("loss", 0.0), tf_case.pop("loss", 0.0), atol=1e-5)
                self.assertAllClose(jax_case.pop("shrink_gap", 0.0), tf_case.pop("shrink_gap", 0.0), atol=1e-5)
                self.assertEqual(jax_case, tf_case)

    def test_another_backend_is_named_when_a_callback_is_attached(self):
        with self.assertRaisesRegex(ValueError, r"backends \('tensorflow', 'jax'\).*backend 'torch'"):
            pruning.check_backend("tfopt.callbacks.Pruning", backend="torch")
        pruning.check_backend("tfopt.callbacks.Pruning", backend="jax")
        # Under Keras's numpy backend (no install needed): tfopt imports without TensorFlow, schedules
        # and the forward pass of tfopt layers run, and the callbacks refuse to attach, naming it.
        run = self._result(_OTHER_BACKEND, "numpy")
        self.assertEqual({k: run[k] for k in ("tensorflow", "forward", "schedule")},
                         {"tensorflow": False, "forward": [2, 3], "schedule": True})
        for name, who in (("pruning", "tfopt.callbacks.Pruning "), ("width", "tfopt.callbacks.WidthPruning ")):
            self.assertIn(who, run[name])
            self.assertIn("backend 'numpy'", run[name])
            self.assertIn("KERAS_BACKEND=jax", run[name])

    def test_twin_without_the_callback_names_it(self):
        script = _TWINS.replace("callbacks=[callback]", "callbacks=[]")
        done = _run(script, "jax")
        self.assertNotIsInstance(done, dict)
        self.assertIn("has its own pruning_schedule", done.stderr)
        self.assertIn("callbacks=[tfopt.callbacks.Pruning()]", done.stderr)

    def test_schedules_take_steps_of_any_integer_dtype(self):
        script = """
        import warnings
        warnings.simplefilter("error")  # JAX warns when asked for int64 without x64
        schedule = tfopt.schedules.PolynomialDecay(0.0, 0.8, "0%", "50%", frequency=2, power=1)
        should, sparsity = schedule(keras.ops.convert_to_tensor(25, "int32"), keras.ops.convert_to_tensor(100))
        constant = tfopt.schedules.ConstantSparsity(0.5, begin_step=10, end_step=30, frequency=10)
        print("RESULT " + json.dumps({"backend": keras.backend.backend(), "should": bool(should),
                                      "sparsity": round(float(sparsity), 4),
                                      "constant": [bool(constant(s)[0]) for s in (0, 10, 15, 20, 30, 40)]}))
        """
        jax_run, tf_run = self._result(script), self._result(script, "tensorflow")
        self.assertEqual({**jax_run, "backend": None}, {**tf_run, "backend": None})
        self.assertEqual(jax_run["sparsity"], 0.4)
        self.assertFalse(jax_run["should"])  # 25 is not on the frequency-2 grid from 0
        self.assertEqual(jax_run["constant"], [False, True, False, True, True, False])
