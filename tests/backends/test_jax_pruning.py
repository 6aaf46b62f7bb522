"""Pruning under `KERAS_BACKEND=jax` (issue 23, first slice): schedules, tfopt layers and the
`Pruning` callback train in JAX's stateless step, with the masks the TensorFlow run of the same
script finds. This process runs TensorFlow, so each script runs in a child process."""

import unittest

import pytest

from tfopt import testing
from tfopt.testing.backends import HAS_JAX as _HAS_JAX
from tfopt.testing.backends import run_script as _run


_TWINS = """
schedule = tfopt.schedules.PolynomialDecay(0.0, 0.75, begin_step=0, end_step=4, power=1, frequency=1)
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
own = {layer.name: [int(layer.pruning_step),  # the layer's own step and mask, saved in .keras files
                    bool(np.array_equal(keras.ops.convert_to_numpy(layer.kernel_mask),
                                        keras.ops.convert_to_numpy(layer.kernel) != 0))]
       for layer in model.layers if hasattr(layer, "kernel_mask")}
report(model, masks=True, own=own)
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

    def test_callback_reaches_a_relative_polynomial_target_on_a_cnn(self):
        self._assert_target_reached(self._result(_CALLBACK))

    @pytest.mark.slow  # four child processes, two of them TensorFlow (about 25 s)
    def test_masks_equal_those_of_tensorflow(self):
        for script in (_TWINS, _CALLBACK):
            jax_run, tf_run = self._result(script), self._result(script, "tensorflow")
            self.assertEqual({**jax_run, "backend": None}, {**tf_run, "backend": None})

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
