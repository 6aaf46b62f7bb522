"""The Pruning callback and tfopt layers inside real `fit` loops."""

import csv
import os
import tempfile

import keras
import numpy as np
from absl.testing import parameterized

import tfopt
from tfopt import testing
from tfopt.testing import backends
import pytest

pytestmark = pytest.mark.backend_neutral


def _data(n=64, shape=(8, 8, 1), classes=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n,) + shape).astype("float32")
    y = rng.integers(0, classes, size=(n,))
    return x, y


def _cnn(layer_module=keras.layers, **prune_kwargs):
    L = layer_module
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        L.Conv2D(8, 3, activation="relu", **prune_kwargs),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        L.Dense(16, activation="relu", **prune_kwargs),
        L.Dense(10, **prune_kwargs),
    ])


class MLP(keras.Model):
    """A subclassed model: its layers are built only when `fit` first traces."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(32, activation="relu")
        self.head = keras.layers.Dense(10)

    def call(self, x):
        return self.head(self.hidden(keras.ops.reshape(x, (-1, 64))))


class KernelLayer(keras.layers.Layer):
    """A custom layer with a `kernel`: the callback prunes it too."""

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], 12), name="kernel")

    def call(self, x):
        return keras.ops.matmul(x, self.kernel)


def _kernels(model):
    return {layer.name: keras.ops.convert_to_numpy(pw.variable).copy()
            for layer in tfopt._keras_internal.all_layers(model) for pw in tfopt.pruning.prunable_weights(layer)}


class PruningCallbackTest(testing.TestCase, parameterized.TestCase):
    @pytest.mark.tensorflow_only  # under JAX export rebuilds the model in a child, which cannot import this module's MLP
    def test_subclassed_model_reaches_target_and_exports_with_parity(self):
        x, y = _data()
        model = MLP()
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        schedule = tfopt.schedules.PolynomialDecay(0.0, 0.8, "0%", "50%", frequency="10%")
        history = model.fit(x, y, epochs=4, batch_size=16, verbose=0,
                            callbacks=[tfopt.callbacks.Pruning(schedule)])
        self.assertAlmostEqual(history.history["sparsity"][-1], 0.8, places=3)
        for row in tfopt.summary(model, print_fn=None)[:-1]:
            self.assertAlmostEqual(row["sparsity"], 0.8, places=2)
        report = tfopt.export(model, os.path.join(tempfile.mkdtemp(), "mlp.tflite"), inputs=x[:8])
        self.assertLess(report.max_abs_diff, 1e-4)
        self.assertAlmostEqual(report.sparsity, 0.8, places=3)

    def test_custom_layer_with_kernel_is_pruned(self):
        inputs = keras.Input((6,))
        model = keras.Model(inputs, keras.layers.Dense(1)(KernelLayer(name="custom")(inputs)))
        model.compile("adam", "mse")
        model.fit(np.ones((8, 6)), np.ones((8, 1)), verbose=0, callbacks=[
            tfopt.callbacks.Pruning(tfopt.schedules.ConstantSparsity(0.5, frequency=1), layers="custom")])
        self.assertEqual(float(np.mean(keras.ops.convert_to_numpy(model.get_layer("custom").kernel) == 0)), 0.5)
        self.assertFalse(np.any(keras.ops.convert_to_numpy(model.layers[-1].kernel) == 0))

    @parameterized.named_parameters(
        ("unstructured", None, 0.8),
        ("nm_2_4", "2:4", 0.5),
        ("block_1x4", (1, 4), 0.8),
        ("channel", "channel", 0.8),
    )
    def test_sparsity_follows_schedule_at_update_steps(self, structure, final):
        x, y = _data(n=96)
        model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                                  keras.layers.Dense(40, name="a"), keras.layers.Dense(10, name="b")])
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        schedule = tfopt.schedules.PolynomialDecay(0.0, final if structure != "2:4" else 0.5, 0, 10, power=1, frequency=3)
        seen = []
        recorder = keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs: seen.append(
                float(np.mean(backends.synced(model, model.get_layer("a").kernel) == 0))))
        callback = tfopt.callbacks.Pruning(schedule, structure=structure, layers="a")
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[callback, recorder])
        structure_obj = tfopt.sparsity.get(structure)
        shape = model.get_layer("a").kernel.shape
        current = 0.0
        for step, achieved in enumerate(seen):
            should, target = schedule(step)
            if bool(should):
                current = structure_obj.achievable_sparsity(float(target), shape, 0, -1)
            self.assertAlmostEqual(achieved, current, places=6, msg=f"step {step}")
        self.assertAlmostEqual(seen[-1], final, places=6)

    def _train(self, spe=1, jit=False, via_callback=False, epochs=2):
        keras.utils.clear_session()  # same layer names in every run
        keras.utils.set_random_seed(7)
        x, y = _data(n=64)
        schedule = tfopt.schedules.ConstantSparsity(0.7, begin_step=1, frequency=3)
        if via_callback:
            model, callbacks = _cnn(), [tfopt.callbacks.Pruning(schedule)]
        else:
            model = _cnn(tfopt.layers, pruning_schedule=schedule)
            callbacks = backends.layer_callbacks(model)
        model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      steps_per_execution=spe, jit_compile=jit)
        model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)
        return _kernels(model)

    @parameterized.named_parameters(("layers", False), ("callback", True))
    def test_same_result_for_steps_per_execution_and_jit(self, via_callback):
        reference = self._train(spe=1, via_callback=via_callback)
        for name, value in reference.items():
            self.assertAlmostEqual(float(np.mean(value == 0)), round(0.7 * value.size) / value.size, places=6)
        for kwargs in ({"spe": 4}, {"jit": True}, {"spe": 4, "jit": True}):
            other = self._train(via_callback=via_callback, **kwargs)
            for name in reference:
                self.assertAllEqual(other[name] == 0, reference[name] == 0, msg=f"{kwargs} {name}")
                self.assertAllClose(other[name], reference[name], atol=1e-4, msg=f"{kwargs} {name}")

    def test_resume_from_keras_file_equals_uninterrupted_run(self):
        schedule = tfopt.schedules.PolynomialDecay(0.0, 0.8, 0, 12, power=1, frequency=2)
        x, y = _data(n=64)

        def fresh():
            keras.utils.set_random_seed(3)
            model = _cnn(tfopt.layers, pruning_schedule=schedule)
            model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            return model

        full = fresh()
        full.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=backends.layer_callbacks(full))
        half = fresh()
        half.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=backends.layer_callbacks(half))
        path = os.path.join(tempfile.mkdtemp(), "half.keras")
        half.save(path)
        resumed = keras.models.load_model(path)
        self.assertEqual(int(keras.ops.convert_to_numpy(resumed.layers[0].pruning_step)), 8)
        resumed.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=backends.layer_callbacks(resumed))
        for a, b in zip(full.weights, resumed.weights):
            self.assertAllClose(a, b, atol=1e-5, msg=a.name)
        self.assertAllEqual(full.layers[0].kernel_mask, resumed.layers[0].kernel_mask)

    def test_backup_and_restore_continues_schedule_with_same_masks(self):
        x, y = _data(n=64)
        schedule = tfopt.schedules.PolynomialDecay(0.0, 0.8, 0, 24, power=1, frequency=2)

        class Interrupt(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if epoch == 1:
                    raise RuntimeError("simulated preemption")

        def run(backup, extra=()):
            keras.utils.set_random_seed(5)
            model = _cnn()
            model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            model.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0,
                      callbacks=[keras.callbacks.BackupAndRestore(backup), tfopt.callbacks.Pruning(schedule), *extra])
            return model

        reference = run(tempfile.mkdtemp())
        backup = tempfile.mkdtemp()
        with self.assertRaisesRegex(RuntimeError, "simulated preemption"):
            run(backup, [Interrupt()])
        keras.utils.clear_session()
        resumed = run(backup)
        self.assertEqual(int(keras.ops.convert_to_numpy(resumed.optimizer.iterations)), 32)
        for a, b in zip(_kernels(reference).values(), _kernels(resumed).values()):
            self.assertAllEqual(a == 0, b == 0)
            self.assertAllClose(a, b, atol=1e-5)
        self.assertAlmostEqual(tfopt.reporting.overall_sparsity(resumed), 0.8, places=2)

    @parameterized.parameters(("mixed_float16",), ("mixed_bfloat16",))
    @pytest.mark.tensorflow_only  # under JAX, LossScaleOptimizer applies in a cond the layers' masks cannot leave
    def test_mixed_precision(self, policy):
        keras.config.set_dtype_policy(policy)
        try:
            x, y = _data()
            model = _cnn(tfopt.layers, pruning_schedule=tfopt.schedules.ConstantSparsity(0.6, frequency=2))
            subclassed = MLP()
            for m, callbacks in ((model, backends.layer_callbacks(model)), (subclassed, [tfopt.callbacks.Pruning(tfopt.schedules.ConstantSparsity(0.6, frequency=2))])):
                m.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
                m.fit(x, y, batch_size=16, verbose=0, callbacks=callbacks)
                for value in _kernels(m).values():
                    self.assertAlmostEqual(float(np.mean(value == 0)), round(0.6 * value.size) / value.size, places=6)
            layer = model.layers[0]
            self.assertEqual(layer.kernel_mask.dtype, "float32")
            self.assertEqual(layer.pruning_step.dtype, "int64")
            self.assertEqual(layer.compute_dtype, policy.split("_")[1])
        finally:
            keras.config.set_dtype_policy("float32")

    def test_sparsity_reaches_csv_logger(self):
        x, y = _data()
        model = _cnn()
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        path = os.path.join(tempfile.mkdtemp(), "log.csv")
        model.fit(x, y, epochs=2, verbose=0, callbacks=[
            tfopt.callbacks.Pruning(tfopt.schedules.ConstantSparsity(0.5, frequency=1)), keras.callbacks.CSVLogger(path)])
        with open(path) as f:
            rows = list(csv.DictReader(f))
        self.assertAlmostEqual(float(rows[-1]["sparsity"]), 0.5, places=2)

    def test_callback_resolves_relative_schedules_of_tfopt_layers(self):
        x, y = _data()
        model = _cnn(tfopt.layers, pruning_schedule="gradual")
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(x, y, epochs=4, batch_size=16, verbose=0, callbacks=[tfopt.callbacks.Pruning()])
        self.assertAlmostEqual(history.history["sparsity"][-1], 0.8, places=2)
        # The length of the fit (4 epochs x 4 steps) is tfopt state, read in-graph.
        length = int(keras.ops.convert_to_numpy(tfopt._state.TRAINING_LENGTH.get(model.layers[0])))
        self.assertEqual(model.layers[0].pruning_schedule.resolve(length).end_step, 12)

    def test_errors_at_attach(self):
        model = _cnn()
        model.compile("adam", "mse")
        with self.assertRaisesRegex(ValueError, r"Layer 'max_pooling2d'.*no prunable weights.*prunable_weights\(\)"):
            model.fit(np.ones((4, 8, 8, 1)), np.ones((4, 10)), verbose=0,
                      callbacks=[tfopt.callbacks.Pruning("baseline", layers=["max_pooling2d"])])
        with self.assertRaisesRegex(ValueError, r"\['nope'\].*Layer names are"):
            model.fit(np.ones((4, 8, 8, 1)), np.ones((4, 10)), verbose=0,
                      callbacks=[tfopt.callbacks.Pruning("baseline", layers="nope")])
        with self.assertRaisesRegex(TypeError, r"`layers` selects layers.*Received an item 3"):
            tfopt.callbacks.Pruning("baseline", layers=[3])

    def test_nan_weights_are_refused_at_attach(self):
        model = _cnn()
        model.compile("adam", "mse")
        kernel = model.layers[-1].kernel
        kernel.assign(np.where(np.eye(*kernel.shape) > 0, np.nan, keras.ops.convert_to_numpy(kernel)))
        with self.assertRaisesRegex(ValueError, r"Layer 'dense_1' weight 'kernel' holds 10 NaN/Inf"):
            model.fit(np.ones((4, 8, 8, 1)), np.ones((4, 10)), verbose=0,
                      callbacks=[tfopt.callbacks.Pruning("baseline")])

    def test_nan_during_training_keeps_previous_mask(self):
        model = keras.Sequential([keras.Input((4,)), tfopt.layers.Dense(
            4, pruning_schedule=tfopt.schedules.ConstantSparsity(0.5, frequency=1))])
        model.compile(keras.optimizers.SGD(0.1), "mse")
        model.fit(np.ones((2, 4)), np.ones((2, 4)), verbose=0, callbacks=backends.layer_callbacks(model))
        mask_before = keras.ops.convert_to_numpy(model.layers[0].kernel_mask).copy()
        model.fit(np.full((2, 4), np.nan), np.ones((2, 4)), verbose=0, callbacks=backends.layer_callbacks(model))
        self.assertAllEqual(model.layers[0].kernel_mask, mask_before)

    def test_nm_skips_layers_it_does_not_fit_unless_named(self):
        x, y = _data()
        model = _cnn()  # first conv has 1 input channel: 2:4 cannot apply
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        with self.assertLogs("tfopt", "WARNING") as logs:
            model.fit(x, y, verbose=0, callbacks=[tfopt.callbacks.Pruning(
                tfopt.schedules.ConstantSparsity(0.5, frequency=1), structure="2:4")])
        self.assertIn("conv2d", logs.output[0])
        self.assertEqual(float(np.mean(keras.ops.convert_to_numpy(model.layers[0].kernel) == 0)), 0.0)
        self.assertEqual(float(np.mean(keras.ops.convert_to_numpy(model.layers[-1].kernel) == 0)), 0.5)
        with self.assertRaisesRegex(ValueError, r"Layer 'conv2d'.*multiple of M=4"):
            model.fit(x, y, verbose=0, callbacks=[tfopt.callbacks.Pruning(
                "baseline", structure="2:4", layers="conv2d")])

    def test_tf_keras_model_is_refused(self):
        import tf_keras

        legacy = tf_keras.Sequential([tf_keras.layers.Dense(2, input_shape=(3,))])
        with self.assertRaisesRegex(TypeError, r"tf_keras \(Keras 2\) object.*needs Keras 3"):
            tfopt.callbacks.Pruning("baseline").set_model(legacy)
        with self.assertRaisesRegex(TypeError, r"tf_keras \(Keras 2\)"):
            tfopt.prune(legacy, "baseline")


class PruningMisuseBehaviourTest(testing.TestCase):
    """What the misuse table cannot show with a message alone (issue 11)."""

    def test_total_steps_spreads_a_relative_ramp_over_several_fits(self):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(16, name="hidden"), keras.layers.Dense(2)])
        model.compile("adam", "mse")
        x, y = np.random.rand(16, 4), np.random.rand(16, 2)
        callback = tfopt.callbacks.Pruning(tfopt.schedules.PolynomialDecay(0.0, 0.8, "0%", "75%", frequency=1),
                                           total_steps=12)
        seen = []
        for _ in range(3):  # three fit(epochs=1) calls of 4 steps: 12 steps in all
            model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[callback])
            seen.append(float(np.mean(keras.ops.convert_to_numpy(model.get_layer("hidden").kernel) == 0)))
        self.assertLess(seen[0], 0.75)  # without total_steps the first fit reached 0.8 already
        self.assertAlmostEqual(seen[-1], 0.8, places=2)

    def test_channel_target_keeps_one_channel(self):
        layer = tfopt.layers.Dense(2, pruning_schedule=tfopt.schedules.ConstantSparsity(0.8, frequency=1),
                                   structure="channel", name="head")
        with self.assertWarnsRegex(UserWarning, "Layer 'head'.*keeps the largest one"):
            model = keras.Sequential([keras.Input((4,)), layer])  # the layer builds here
        model.compile("adam", "mse")
        model.fit(np.random.rand(8, 4), np.random.rand(8, 2), batch_size=4, verbose=0,
                  callbacks=backends.layer_callbacks(model))
        kept = np.any(keras.ops.convert_to_numpy(layer.kernel) != 0, axis=0)
        self.assertEqual(int(kept.sum()), 1)

    def test_numpy_scalars_are_numbers(self):
        # tfmot's pruning guide computes end_step with numpy.
        end_step = np.ceil(100 / 32).astype(np.int32) * 2
        schedule = tfopt.schedules.PolynomialDecay(np.float32(0.5), np.float64(0.8), np.int64(0), end_step)
        self.assertEqual(type(schedule.end_step), int)
        self.assertEqual(tfopt.schedules.get(keras.saving.serialize_keras_object(schedule)), schedule)
        tfopt.schedules.ConstantSparsity(np.float32(0.5), frequency=np.int32(10))
        tfopt.sparsity.NM(np.int32(2), np.int64(4))
        tfopt.callbacks.QuantizationSchedule(start=np.int32(3), freeze_ranges=np.float32(0.5))
        tfopt.quantizers.QuantSpec(np.int8(4))
        tfopt.callbacks.Pruning(schedule, total_steps=np.int32(10))
