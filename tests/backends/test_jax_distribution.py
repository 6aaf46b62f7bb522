"""Data parallelism under `KERAS_BACKEND=jax` (issue 23): `keras.distribution.DataParallel` over two
forced host devices trains tfopt's pruning and QAT models to the values of one device, each variable
replicated equally on both devices; `tfopt.strategies` hands out the distribution under JAX and refuses
its tf.distribute strategies there. This process runs TensorFlow, so the script runs in one child process
(XLA_FLAGS must be set before jax is imported)."""

import unittest

import numpy as np
import pytest

import tfopt
from tfopt import testing
from tfopt.testing.backends import HAS_JAX as _HAS_JAX
from tfopt.testing.backends import run_script as _run

_DEVICES = (("XLA_FLAGS", "--xla_force_host_platform_device_count=2"),)

# Pruning (the callback, PolynomialDecay, frequency 1) and QAT (BatchNormalization folded, ranges tracked)
# on tiny CNNs: on one device (jit on and off), then under auto_distribution(): DataParallel over both devices,
# same global batch (8, so 4 a device) and SGD.
_SCRIPT = """
import doctest, os, re
import jax

def cnn(bn):
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(8, 3, use_bias=not bn, name="conv")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h) if bn else h
    h = keras.layers.Flatten()(keras.layers.ReLU()(h))
    return keras.Model(inputs, keras.layers.Dense(4, name="dense")(h))

def train(jit):
    x, y = data()
    out = {}
    model = cnn(False)
    set_weights(model)
    model.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=jit)
    schedule = tfopt.schedules.PolynomialDecay(0.0, 0.75, begin_step=0, end_step=4, power=1, frequency=1)
    model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=[tfopt.callbacks.Pruning(schedule)])
    qat = tfopt.quantize_model(cnn(True))
    set_weights(qat)
    qat.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=jit)
    qat.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for name, m in (("prune", model), ("qat", qat)):
        variables = {}  # by path without Keras's numbering ("sgd_3/kernel_mask" -> "sgd/kernel_mask#0")
        for v in list(m.variables) + list(m.optimizer.variables):  # the callback's masks are the optimizer's
            path = re.sub(r"_[0-9]+(?=/|_quantize/)", "", v.path)
            variables[path + "#" + str(sum(k.startswith(path + "#") for k in variables))] = v
        out[name] = {k: np.asarray(v.value).ravel().tolist() for k, v in variables.items()}
        shards = {k: [np.asarray(s.data) for s in v.value.addressable_shards] for k, v in variables.items()}
        out[name + "_shards"] = {k: [len(s), all(np.array_equal(s[0], t) for t in s[1:])] for k, s in shards.items()}
    return out

result = {"backend": keras.backend.backend(), "devices": len(jax.devices())}
result["one"], result["one_nojit"] = train(True), train(False)
distribution = tfopt.strategies.auto_distribution()
result["auto"] = [type(tfopt.strategies.auto()).__name__, distribution.num_model_replicas,
                  tfopt.strategies.global_batch_size(distribution, 4),
                  tfopt.strategies.recommended_steps_per_execution(distribution),
                  tfopt.strategies.is_chief(distribution)]
with distribution.scope():
    result["two"] = train(True)
try:
    tfopt.strategies.Mirrored()
except ValueError as e:
    result["mirrored_error"] = str(e)
os.environ["TF_CONFIG"] = '{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}}'
try:
    tfopt.strategies.auto()
except ValueError as e:
    result["tf_config_error"] = str(e)
del os.environ["TF_CONFIG"]
# The docstring's example, for real (skipped under the TensorFlow doctests).
doc = tfopt.strategies.auto_distribution.__doc__.replace("# doctest: +SKIP", "")
test = doctest.DocTestParser().get_doctest(doc, {}, "auto_distribution", None, 0)
result["doctest"] = doctest.DocTestRunner(verbose=False).run(test).failed
print("RESULT " + json.dumps(result))
"""


@unittest.skipUnless(_HAS_JAX, "jax is not installed (pip install jax[cpu])")
@pytest.mark.slow  # one child process training six small models (about 25 s)
class JaxDataParallelTest(testing.TestCase):
    def _result(self):
        run = _run(_SCRIPT, "jax", timeout=300, env=_DEVICES)
        self.assertIsInstance(run, dict, getattr(run, "stderr", "")[-3000:])
        self.assertEqual((run["backend"], run["devices"]), ("jax", 2))
        return run

    def _assert_close(self, got, expected):
        self.assertEqual(sorted(got), sorted(expected))
        for path, values in expected.items():
            np.testing.assert_allclose(got[path], values, rtol=1e-5, atol=1e-6, err_msg=path)

    def test_pruning_on_two_devices_equals_one_device(self):
        run = self._result()
        for other in ("one", "one_nojit"):
            self._assert_close(run["two"]["prune"], run[other]["prune"])
        self.assertIn("sgd/kernel_mask#1", run["two"]["prune"])  # the callback's masks of both layers
        for name in ("conv/kernel#0", "dense/kernel#0"):
            kernels = [np.array(run[r]["prune"][name]) for r in ("one", "one_nojit", "two")]
            for kernel in kernels[1:]:  # the same weights pruned: equal masks
                np.testing.assert_array_equal(kernel == 0, kernels[0] == 0, err_msg=name)
            self.assertEqual(np.mean(kernels[2] == 0), 0.75, name)  # PolynomialDecay's target reached

    def test_qat_ranges_and_folded_statistics_on_two_devices_equal_one_device(self):
        run = self._result()
        two = run["two"]["qat"]
        for other in ("one", "one_nojit"):
            self._assert_close(two, run[other]["qat"])
        tracked = [p for p in two if "range_" in p or "moving" in p]
        self.assertIn("conv/bn_moving_mean#0", tracked)  # BatchNormalization folded into the convolution
        self.assertIn("conv/output_range_max#0", tracked)
        for path in tracked:
            if path.endswith("range_updates#0"):
                self.assertEqual(two[path], [4], path)  # every step of the 2 epochs of 2 batches
            elif path.endswith("range_min#0"):
                self.assertLess(two[path][0], two[path.replace("range_min", "range_max")][0], path)

    def test_every_variable_is_equal_on_every_device(self):
        run = self._result()
        for name in ("prune_shards", "qat_shards"):
            shards = run["two"][name]
            self.assertTrue(any("mask" in path for path in shards) or name == "qat_shards", sorted(shards))
            self.assertEqual({path: s for path, s in shards.items() if s != [2, True]}, {}, name)

    def test_strategies_give_the_distribution_under_jax(self):
        run = self._result()
        # auto() is auto_distribution() under JAX, and the helpers take it.
        self.assertEqual(run["auto"], ["DataParallel", 2, 8, 1, True])
        self.assertEqual(run["doctest"], 0)

    def test_tf_distribute_wrappers_and_tf_config_are_refused_under_jax(self):
        run = self._result()
        self.assertRegex(run["mirrored_error"], r"Mirrored\(\) is a tf.distribute strategy.*'jax' backend.*"
                                                r"keras.distribution.set_distribution\(tfopt.strategies.auto_distribution\(\)\)")
        self.assertRegex(run["tf_config_error"], r"TF_CONFIG is set.*keras.distribution.initialize.*Received: TF_CONFIG=")


class AutoDistributionUnderTensorFlowTest(testing.TestCase):
    def test_auto_distribution_names_the_backend_and_auto(self):
        with self.assertRaisesRegex(ValueError, r"JAX backend; this process runs Keras on 'tensorflow'.*"
                                                r"tfopt.strategies.auto\(\)"):
            tfopt.strategies.auto_distribution()
