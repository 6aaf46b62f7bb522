"""tfopt under MirroredStrategy on 2 and 4 logical CPUs (split in conftest.py)."""

import os
import tempfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized

import tfopt
from tfopt import testing


_STRATEGIES = {}


def _strategy(kind):
    # One strategy object per kind for the whole process: several
    # MirroredStrategy objects in one process can mix up their collective ops.
    if kind not in _STRATEGIES:
        _STRATEGIES[kind] = _make_strategy(kind)
    return _STRATEGIES[kind]


def _make_strategy(kind):
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    if kind == "one":
        return tf.distribute.OneDeviceStrategy(devices[0])
    count = 4 if kind == "mirrored4" else 2
    assert len(devices) >= count, devices
    return tf.distribute.MirroredStrategy(devices[:count])


def _replica_values(variable):
    value = variable.value if isinstance(variable, keras.Variable) else variable
    values = getattr(value, "values", None)
    return [v.numpy() for v in values] if values else [value.numpy()]


class MirroredPruningTest(testing.TestCase, parameterized.TestCase):
    @parameterized.named_parameters(("one_device", "one"), ("mirrored", "mirrored"))
    def test_layers_fit_save_load(self, kind):
        strategy = _strategy(kind)
        schedule = tfopt.schedules.PolynomialDecay(0.0, 0.75, 0, 6, power=1, frequency=2)
        with strategy.scope():
            model = keras.Sequential([
                keras.Input((8, 8, 1)),
                tfopt.layers.Conv2D(8, 3, activation="relu", pruning_schedule=schedule),
                keras.layers.Flatten(),
                tfopt.layers.Dense(10, pruning_schedule=schedule),
            ])
            model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        rng = np.random.default_rng(0)
        x, y = rng.standard_normal((64, 8, 8, 1)).astype("float32"), rng.integers(0, 10, 64)
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        for layer in (model.layers[0], model.layers[2]):
            masks = _replica_values(layer.kernel_mask)
            steps = _replica_values(layer.pruning_step)
            kernels = _replica_values(layer.kernel)
            self.assertEqual(len(masks), 2 if kind == "mirrored" else 1)
            for m, s, k in zip(masks, steps, kernels):
                self.assertAllEqual(m, masks[0])
                self.assertEqual(int(s), 8)
                self.assertAllEqual(k == 0, masks[0] == 0)
            self.assertAlmostEqual(float(np.mean(masks[0] == 0)), round(0.75 * masks[0].size) / masks[0].size)
        path = os.path.join(tempfile.mkdtemp(), "mirrored.keras")
        model.save(path)
        with strategy.scope():
            loaded = keras.models.load_model(path)
        self.assertAllClose(loaded.predict(x[:4], verbose=0), model.predict(x[:4], verbose=0), atol=1e-5)
        self.assertAllEqual(_replica_values(loaded.layers[0].kernel_mask)[0], _replica_values(model.layers[0].kernel_mask)[0])
        for row in tfopt.summary(loaded, print_fn=None)[:-1]:
            self.assertAlmostEqual(row["sparsity"], 0.75, places=2)

    def test_callback_under_mirrored(self):
        strategy = _strategy("mirrored")
        with strategy.scope():
            model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(4)])
            model.compile("adam", "mse")
        model.fit(np.ones((32, 16)), np.ones((32, 4)), batch_size=8, verbose=0,
                  callbacks=[tfopt.callbacks.Pruning(tfopt.schedules.ConstantSparsity(0.5, frequency=1))])
        for layer in model.layers:
            kernels = _replica_values(layer.kernel)
            masks = _replica_values(tfopt.pruning.record_of(layer.kernel).mask)
            self.assertEqual(len(kernels), 2)
            self.assertEqual(len(masks), 2)  # one copy per replica, equal
            self.assertAllEqual(masks[1], masks[0])
            self.assertAllEqual(masks[0] == 0, kernels[0] == 0)
            for k in kernels:
                self.assertAllEqual(k, kernels[0])
                self.assertEqual(float(np.mean(k == 0)), 0.5)


    def test_width_pruning_under_mirrored(self):
        strategy = _strategy("mirrored")
        with strategy.scope():
            model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"),
                                      keras.layers.Dense(4)])
            model.compile("adam", "mse")
        rng = np.random.default_rng(0)
        model.fit(rng.standard_normal((32, 16)), rng.standard_normal((32, 4)), batch_size=8, verbose=0,
                  callbacks=[tfopt.callbacks.WidthPruning(tfopt.schedules.ConstantSparsity(0.5, frequency=1))])
        kernels = [_replica_values(layer.kernel) for layer in model.layers]
        for values in kernels:
            self.assertEqual(len(values), 2)
            self.assertAllEqual(values[1], values[0])
        dead = np.all(kernels[0][0] == 0, axis=0)
        self.assertEqual(int(dead.sum()), 16)
        self.assertTrue(np.all(kernels[1][0][dead] == 0))  # the rows that read them too
        small = tfopt.shrink(tfopt.strip(model))
        self.assertEqual(small.layers[0].units, 16)


class MirroredQuantizationTest(testing.TestCase):
    def test_ranges_equal_on_every_replica_and_cover_all_replicas_data(self):
        strategy = _strategy("mirrored")
        with strategy.scope():
            model = keras.Sequential([
                keras.Input((4,)), tfopt.layers.QuantizeActivation(name="q_in", momentum=0.0),
                tfopt.layers.Dense(3, quantization_aware="int8", name="d"),
            ])
            model.compile("sgd", "mse")
        # One global batch of 8 split 4 / 4: the extreme values sit in the second half only.
        x = np.zeros((8, 4), "float32")
        x[4:, 0] = [5.0, -3.0, 1.0, 2.0]
        model.fit(x, np.zeros((8, 3)), batch_size=8, epochs=1, shuffle=False, verbose=0)
        q_in = model.get_layer("q_in")
        lows, highs = _replica_values(q_in.range_min), _replica_values(q_in.range_max)
        self.assertEqual(len(lows), 2)
        for lo, hi in zip(lows, highs):
            self.assertAlmostEqual(float(lo), -3.0, places=5)
            self.assertAlmostEqual(float(hi), 5.0, places=5)
        dense = model.get_layer("d")
        out_lo = _replica_values(dense.output_range_min)
        out_hi = _replica_values(dense.output_range_max)
        self.assertAllEqual(out_lo[0], out_lo[1])
        self.assertAllEqual(out_hi[0], out_hi[1])

    def test_folded_batch_norm_statistics_equal_on_every_replica(self):
        strategy = _strategy("mirrored")
        inputs = keras.Input((6, 6, 2))
        x = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
        x = keras.layers.BatchNormalization(momentum=0.5)(x)
        outputs = keras.layers.Dense(2)(keras.layers.Flatten()(keras.layers.ReLU()(x)))
        base = keras.Model(inputs, outputs)
        with strategy.scope():
            model = tfopt.quantize_model(base, "int8")
            model.compile(keras.optimizers.SGD(0.0), "mse")
        single = tfopt.quantize_model(base, "int8")
        single.compile(keras.optimizers.SGD(0.0), "mse")
        rng = np.random.default_rng(0)
        # The replicas' halves have different scales: only statistics reduced
        # over both replicas match the single-device run on the whole batch.
        x = rng.standard_normal((16, 6, 6, 2)).astype("float32")
        x[8:] *= 5.0
        for m in (model, single):
            m.fit(x, np.zeros((16, 2)), batch_size=16, epochs=2, shuffle=False, verbose=0)
        conv = model.get_layer("conv")
        self.assertAllClose(conv.bn_moving_variance.numpy(), single.get_layer("conv").bn_moving_variance.numpy(),
                            rtol=1e-4, atol=1e-5)
        for variable in (conv.bn_moving_mean, conv.bn_moving_variance, conv.output_range_max):
            values = _replica_values(variable)
            self.assertEqual(len(values), 2)
            self.assertAllEqual(values[0], values[1])
        self.assertGreater(np.abs(conv.bn_moving_variance.numpy() - 1.0).max(), 0.5)


def _collective_ops(strategy, model, x, y):
    """Collective ops in one traced train step (every replica's, with the
    functions it calls), by op type."""
    import collections

    @tf.function
    def step(x, y):
        return strategy.run(model.train_step, args=((x, y),))

    graph = step.get_concrete_function(tf.TensorSpec(x.shape, tf.float32), tf.TensorSpec(y.shape, tf.int32)).graph
    definition = graph.as_graph_def()
    nodes = list(definition.node) + [n for f in definition.library.function for n in f.node_def]
    return collections.Counter(n.op for n in nodes if n.op.startswith("Collective") or "AllReduce" in n.op)


def _inverted_residual_net(blocks=5):
    """MobileNetV2's pattern, small enough to trace quickly: expand, depthwise,
    project, with BatchNormalizations (folded under QAT), ReLU6 and residual adds."""
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.ReLU(6.0)(keras.layers.BatchNormalization()(keras.layers.Conv2D(8, 3, use_bias=False)(inputs)))
    for _ in range(blocks):
        h = keras.layers.ReLU(6.0)(keras.layers.BatchNormalization()(keras.layers.Conv2D(16, 1, use_bias=False)(x)))
        h = keras.layers.ReLU(6.0)(keras.layers.BatchNormalization()(
            keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(h)))
        h = keras.layers.BatchNormalization()(keras.layers.Conv2D(8, 1, use_bias=False)(h))
        x = keras.layers.Add()([x, h])
    outputs = keras.layers.Dense(5)(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


class CollectiveCountTest(testing.TestCase):
    @pytest.mark.slow
    def test_one_collective_per_step_for_every_range_and_folded_batch_norm(self):
        strategy = _strategy("mirrored")
        rng = np.random.default_rng(0)
        x, y = rng.uniform(0, 1, (8, 16, 16, 3)).astype("float32"), rng.integers(0, 5, 8).astype("int32")
        counts = {}
        for kind in ("plain", "pruned", "quantized + pruned"):
            keras.utils.set_random_seed(0)
            with strategy.scope():
                base = _inverted_residual_net()
                model = base if kind == "plain" else tfopt.prune(base, tfopt.schedules.ConstantSparsity(0.5, frequency=1))
                if kind == "quantized + pruned":
                    model = tfopt.quantize_model(model, "int8")
                model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
                model.optimizer.build(model.trainable_variables)
            counts[kind] = sum(_collective_ops(strategy, model, x[:4], y[:4]).values())
        ranges = sum(1 for v in model.weights if v.path.endswith("range_max"))
        self.assertGreater(ranges, 25)  # (one collective each before)
        # Masks come from weights that are already equal on every replica: no collective.
        self.assertEqual(counts["pruned"], counts["plain"])
        # Every range and folded BatchNormalization: one collective per replica in all.
        self.assertEqual(counts["quantized + pruned"], counts["plain"] + strategy.num_replicas_in_sync)


class MirroredDistillationTest(testing.TestCase):
    def _models(self):
        from tfopt.demo.data import build_cnn

        keras.utils.set_random_seed(0)
        teacher = build_cnn(widths=(8, 8, 16), name="teacher")
        teacher.trainable = False
        student = build_cnn(widths=(4, 4, 8), name="student")
        return teacher, student

    def test_cached_and_online_match_a_single_device_run(self):
        rng = np.random.default_rng(0)
        x, y = rng.uniform(0, 1, (32, 8, 8, 1)).astype("float32"), rng.integers(0, 10, 32)
        results = {}
        for kind in ("one", "mirrored"):
            for path in ("cached", "online"):
                with _strategy(kind).scope():
                    teacher, student = self._models()
                    if path == "cached":
                        x_fit, y_fit = tfopt.distillation.attach_teacher((x, y), teacher)
                        model = student
                        model.compile(keras.optimizers.SGD(0.1), tfopt.distillation.DistillationLoss())
                    else:
                        x_fit, y_fit = x, y
                        model = tfopt.distillation.Distiller(teacher, student)
                        model.compile(keras.optimizers.SGD(0.1))
                model.fit(x_fit, y_fit, batch_size=16, epochs=2, shuffle=False, verbose=0)
                kernel = student.layers[-1].kernel
                values = _replica_values(kernel)
                self.assertEqual(len(values), 2 if kind == "mirrored" else 1)
                self.assertAllEqual(values[0], values[-1])
                results[(kind, path)] = values[0]
        for path in ("cached", "online"):
            self.assertAllClose(results[("mirrored", path)], results[("one", path)], atol=1e-5, rtol=1e-5)
        self.assertAllClose(results[("one", "cached")], results[("one", "online")], atol=1e-5, rtol=1e-5)


class MirroredEverythingTest(testing.TestCase, parameterized.TestCase):
    """Pruning + QAT (BN folded) + cached distillation in one fit: every variable equal on
    every replica, and equal to a single-device run with the same global batch."""

    def _run(self, strategy):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8, 8, 1))
        h = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")(inputs)
        h = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn")(h))
        base = keras.Model(inputs, keras.layers.Dense(10, name="head")(keras.layers.Flatten()(h)))
        teacher = keras.models.clone_model(base)
        teacher.trainable = False
        schedule = tfopt.schedules.PolynomialDecay(0.0, 0.5, 0, 4, power=1, frequency=1)
        rng = np.random.default_rng(0)
        x, y = rng.uniform(0, 1, (64, 8, 8, 1)).astype("float32"), rng.integers(0, 10, 64)
        import contextlib

        with strategy.scope() if strategy else contextlib.nullcontext():
            model = tfopt.quantize_model(tfopt.prune(base, schedule), "int8")
            model.compile(keras.optimizers.SGD(0.05), tfopt.distillation.DistillationLoss())
            x_fit, y_fit = tfopt.distillation.attach_teacher((x, y), teacher)
        # One epoch of 4 steps (BN frozen after 2): fake quantization is
        # discontinuous, so over many steps a float-rounding difference in the
        # replicas' gradient sum can flip one value to the next int8 step.
        model.fit(x_fit, y_fit, batch_size=16, epochs=1, shuffle=False, verbose=0,
                  callbacks=[tfopt.callbacks.QuantizationSchedule(freeze_batch_norm=2)])
        return model

    @parameterized.named_parameters(("two_cpus", "mirrored", 2), ("four_cpus", "mirrored4", 4))
    def test_matches_single_device(self, kind, replicas):
        if kind == "mirrored4" and not os.environ.get("TFOPT_TEST_FOUR_REPLICAS"):
            # Two MirroredStrategy objects in one process mix up their
            # collective ops (TensorFlow keys them per process): run the
            # 4-replica case in a process of its own.
            import subprocess
            import sys

            test = f"{os.path.abspath(__file__)}::MirroredEverythingTest::test_matches_single_device_four_cpus"
            result = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-n", "0", test],
                env={**os.environ, "TFOPT_TEST_FOUR_REPLICAS": "1"}, capture_output=True, text=True, timeout=600,
                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            )
            self.assertEqual(result.returncode, 0, result.stdout[-3000:])
            self.assertIn("1 passed", result.stdout)
            return
        single = self._run(None)
        mirrored = self._run(_strategy(kind))
        names = set()
        for s, m in zip(single.weights, mirrored.weights):
            values = _replica_values(m)
            self.assertEqual(len(values), replicas)
            for v in values[1:]:
                self.assertAllEqual(v, values[0], msg=m.path)
            expected = keras.ops.convert_to_numpy(s)
            if "mask" in m.path or "int" in str(expected.dtype):
                self.assertAllEqual(values[0], expected, msg=m.path)
            else:  # within one int8 rounding flip's effect (see _run)
                self.assertAllClose(values[0], expected, atol=2e-3, rtol=2e-3, msg=m.path)
            names.add(m.path.split("/")[-1])
        for state in ("kernel_mask", "pruning_step", "output_range_max", "bn_moving_variance", "range_min"):
            self.assertIn(state, names)
