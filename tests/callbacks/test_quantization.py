"""QuantizationSchedule: delayed fake quantization, frozen ranges and BN statistics, in-graph."""

import os
import tempfile

import keras
import numpy as np
from absl.testing import parameterized

import tfopt
from tfopt import testing


def _dense_model(steps_per_execution=1):
    model = keras.Sequential([
        keras.Input((4,)),
        tfopt.layers.QuantizeActivation(name="q_in"),
        tfopt.layers.Dense(3, quantization_aware="int4", name="d"),
    ])
    model.compile("sgd", "mse", steps_per_execution=steps_per_execution)
    return model


def _plain_dense(model, x):
    layer = model.get_layer("d")
    return x @ layer.kernel.numpy() + layer.bias.numpy()


def _conv_bn_model():
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(momentum=0.5, name="bn")(x)
    x = keras.layers.ReLU()(x)
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(x))
    return keras.Model(inputs, outputs)


class QuantizationScheduleTest(testing.TestCase, parameterized.TestCase):
    @parameterized.parameters(1, 3)
    def test_start_delays_fake_quantization_in_graph(self, steps_per_execution):
        model = _dense_model(steps_per_execution)
        rng = np.random.default_rng(0)
        x, y = rng.standard_normal((12, 4)).astype("float32"), rng.standard_normal((12, 3)).astype("float32")
        schedule = tfopt.callbacks.QuantizationSchedule(start=6)
        model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0, callbacks=[schedule])
        # 6 steps seen (two executions of 3 when steps_per_execution=3): on from step 6.
        layer = model.get_layer("d")
        self.assertEqual(int(layer.output_range_updates.numpy()), 6)
        out = model.predict(x, verbose=0)
        self.assertGreater(np.abs(out - _plain_dense(model, x)).max(), 1e-3)  # int4 kernel

        fresh = _dense_model(steps_per_execution)
        fresh.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0,
                  callbacks=[tfopt.callbacks.QuantizationSchedule(start=100)])
        # Not started: the layer computes in float (inputs aside: the input
        # quantizer has not started either).
        self.assertAllClose(fresh.predict(x, verbose=0), _plain_dense(fresh, x), atol=1e-5)

    def test_freeze_ranges_keeps_counting(self):
        model = _dense_model(steps_per_execution=2)
        rng = np.random.default_rng(1)
        x = rng.standard_normal((16, 4)).astype("float32") * np.arange(1, 17, dtype="float32")[:, None]
        y = np.zeros((16, 3), "float32")
        q_in = model.get_layer("q_in")
        ranges = []

        class Record(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                ranges.append((float(q_in.range_min.numpy()), float(q_in.range_max.numpy())))

        model.fit(x, y, batch_size=2, shuffle=False, verbose=0,
                  callbacks=[tfopt.callbacks.QuantizationSchedule(freeze_ranges=4), Record()])
        self.assertEqual(int(q_in.range_updates.numpy()), 8)
        # Growing inputs: the range moves for the first 4 steps, then stays.
        self.assertNotEqual(ranges[0], ranges[1])
        self.assertEqual(ranges[1], ranges[-1])

    def test_fractions_resolve_from_fit(self):
        model = _dense_model()
        x, y = np.ones((10, 4), "float32"), np.zeros((10, 3), "float32")
        model.fit(x, y, batch_size=2, epochs=2, verbose=0,
                  callbacks=[tfopt.callbacks.QuantizationSchedule(start=0.5, freeze_ranges=0.9)])
        layer = model.get_layer("d")
        times = layer.quantization_times()
        self.assertEqual((int(times.start.numpy()), int(times.freeze_ranges.numpy())), (5, 9))

    def test_folded_batch_norm_statistics_track_keras(self):
        base = _conv_bn_model()
        base.compile(keras.optimizers.SGD(0.0), "mse")
        qat = tfopt.quantize_model(base, "int8")
        qat.compile(keras.optimizers.SGD(0.0), "mse")
        rng = np.random.default_rng(2)
        x = (rng.standard_normal((16, 6, 6, 2)) * 3 + 1).astype("float32")
        y = np.zeros((16, 2), "float32")
        base.fit(x, y, batch_size=16, verbose=0)
        qat.fit(x, y, batch_size=16, verbose=0)
        bn, conv = base.get_layer("bn"), qat.get_layer("conv")
        # Same batch statistics as Keras's own BatchNormalization, up to the int8 kernel's error.
        self.assertAllClose(conv.bn_moving_mean.numpy(), bn.moving_mean.numpy(), atol=0.05, rtol=0.02)
        self.assertAllClose(conv.bn_moving_variance.numpy(), bn.moving_variance.numpy(), atol=0.05, rtol=0.05)
        self.assertGreater(np.abs(conv.bn_moving_variance.numpy() - 1.0).max(), 0.5)  # it moved

    def test_freeze_batch_norm_and_non_trainable_batch_norm(self):
        base = _conv_bn_model()
        qat = tfopt.quantize_model(base, "int8")
        qat.compile("sgd", "mse")
        rng = np.random.default_rng(3)
        x, y = (rng.standard_normal((16, 6, 6, 2)) * 3).astype("float32"), np.zeros((16, 2), "float32")
        conv = qat.get_layer("conv")
        qat.fit(x, y, batch_size=4, verbose=0,
                callbacks=[tfopt.callbacks.QuantizationSchedule(freeze_batch_norm=2)])
        frozen = conv.bn_moving_variance.numpy().copy()
        self.assertGreater(np.abs(frozen - 1.0).max(), 0.1)
        qat.fit(x, y, batch_size=4, verbose=0,
                callbacks=[tfopt.callbacks.QuantizationSchedule(freeze_batch_norm=2)])
        self.assertAllEqual(conv.bn_moving_variance.numpy(), frozen)

        base.get_layer("bn").trainable = False
        fixed = tfopt.quantize_model(base, "int8")
        fixed.compile("sgd", "mse")
        before = fixed.get_layer("conv").bn_moving_mean.numpy().copy()
        fixed.fit(x, y, batch_size=4, verbose=0)
        self.assertAllEqual(fixed.get_layer("conv").bn_moving_mean.numpy(), before)

    def test_counts_survive_keras_round_trip(self):
        model = _dense_model()
        x, y = np.ones((8, 4), "float32"), np.zeros((8, 3), "float32")
        model.fit(x, y, batch_size=2, verbose=0, callbacks=[tfopt.callbacks.QuantizationSchedule(start=6)])
        path = os.path.join(tempfile.mkdtemp(), "m.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
        self.assertEqual(int(loaded.get_layer("d").output_range_updates.numpy()), 4)
        loaded.fit(x, y, batch_size=2, verbose=0, callbacks=[tfopt.callbacks.QuantizationSchedule(start=6)])
        self.assertEqual(int(loaded.get_layer("d").output_range_updates.numpy()), 8)

    def test_export_quantizes_even_before_start(self):
        model = _dense_model()
        x, y = np.random.default_rng(4).standard_normal((8, 4)).astype("float32"), np.zeros((8, 3), "float32")
        model.fit(x, y, batch_size=2, verbose=0, callbacks=[tfopt.callbacks.QuantizationSchedule(start=50)])
        report = tfopt.export(model, os.path.join(tempfile.mkdtemp(), "m.tflite"), precision="int8", inputs=x)
        self.assertEqual(report.float_ops, [])

    @parameterized.named_parameters(
        ("negative", dict(start=-1), "start=-1"),
        ("bool", dict(start=True), "start=True"),
        ("fraction_above_one", dict(freeze_ranges=1.5), "freeze_ranges=1.5"),
        ("string", dict(freeze_batch_norm="late"), "freeze_batch_norm='late'"),
    )
    def test_bad_arguments(self, kwargs, needle):
        with self.assertRaisesRegex(ValueError, needle):
            tfopt.callbacks.QuantizationSchedule(**kwargs)

    def test_model_without_quantization_is_an_error(self):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        model.compile("sgd", "mse")
        with self.assertRaisesRegex(ValueError, "no quantization-aware layers.*quantize_model"):
            model.fit(np.ones((4, 4)), np.ones((4, 2)), verbose=0,
                      callbacks=[tfopt.callbacks.QuantizationSchedule(start=2)])

    def test_fraction_without_known_length_is_an_error(self):
        import tensorflow as tf

        model = _dense_model()
        data = tf.data.Dataset.from_tensors((np.ones((2, 4), "float32"), np.zeros((2, 3), "float32")))
        data = data.repeat(3).filter(lambda x, y: True)  # unknown length
        with self.assertRaisesRegex(ValueError, "start=0.5.*steps_per_epoch"):
            model.fit(data, epochs=1, verbose=0, callbacks=[tfopt.callbacks.QuantizationSchedule(start=0.5)])
