"""Patterns of other people's code (keras-io examples) through every transform, and
the BatchNormalization statistics that pruning leaves behind."""

import os
import tempfile
import warnings

import keras
import numpy as np

import tfopt
from tfopt import testing


class Scale(keras.layers.Layer):
    """A keras-io style custom layer: its `__init__` takes no `**kwargs`, so Keras
    cannot re-create it from its config ("unexpected keyword argument 'name'")."""

    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="w")

    def call(self, x):
        return x * self.w * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


def _with_custom_layer():
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu", name="hidden"),
                              Scale(2.0), keras.layers.Dense(4, name="head")], name="net")
    model.compile("adam", "mse")
    return model


class CustomLayerWithoutKwargsTest(testing.TestCase):
    """A layer Keras cannot clone no longer breaks export, prune, strip, shrink or
    quantize_model: the result reuses it, with a warning that says so."""

    def setUp(self):
        super().setUp()
        self.x = self.make_input((16, 8))

    def _check(self, result, model, fn):
        scale = next(layer for layer in result.layers if isinstance(layer, Scale))
        self.assertIs(scale, next(layer for layer in model.layers if isinstance(layer, Scale)), fn)

    def test_transforms_reuse_the_layer_with_a_warning(self):
        cases = {
            "prune": lambda m: tfopt.prune(m, "baseline"),
            "strip": tfopt.strip,
            "shrink": lambda m: tfopt.shrink(m, 0.5),
            "quantize_model": lambda m: tfopt.quantize_model(m, unsupported="float"),
        }
        for fn, transform in cases.items():
            with self.subTest(fn):
                model = _with_custom_layer()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    result = transform(model)
                messages = [str(w.message) for w in caught]
                self.assertTrue(any("cannot be re-created from its config" in m and "**kwargs" in m
                                    for m in messages), (fn, messages))
                self._check(result, model, fn)
                self.assertEqual(result(self.x).shape, (16, 4))
                if fn in ("prune", "strip"):
                    self.assertAllClose(result(self.x), model(self.x), atol=1e-5)

    def test_export_float_and_after_the_pruning_callback(self):
        model = _with_custom_layer()
        model.fit(self.x, self.make_input((16, 4), seed=1), epochs=2, batch_size=4, verbose=0,
                  callbacks=[tfopt.callbacks.Pruning(tfopt.schedules.ConstantSparsity(0.5, frequency=1))])
        with tempfile.TemporaryDirectory() as d, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = tfopt.export(model, os.path.join(d, "m.tflite"), inputs=self.x)
            # The stripped copy shares the layer with the model, but never leaves export: no warning.
            self.assertFalse([w for w in caught if "re-created" in str(w.message)])
            self.assertGreater(report.size_bytes, 0)
            self.assertLess(report.max_abs_diff, 1e-4)


class ReestimateBatchNormTest(testing.TestCase):
    def _model(self):
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="hidden"),
                                  keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(3, name="head")])
        bn = model.get_layer("bn")
        bn.moving_mean.assign(np.full(8, 5.0, "float32"))  # statistics of weights it no longer has
        bn.moving_variance.assign(np.full(8, 40.0, "float32"))
        return model

    def test_statistics_are_the_data_s_and_nothing_else_changes(self):
        model = self._model()
        x = np.random.default_rng(0).normal(1.0, 3.0, (100, 6)).astype("float32")
        weights = [w.copy() for w in model.get_weights()]
        self.assertEqual(tfopt.reestimate_batch_norm(model, x, batch_size=25), 1)
        hidden = model.get_layer("hidden")(x).numpy()
        bn = model.get_layer("bn")
        self.assertAllClose(bn.moving_mean, hidden.mean(0), atol=1e-4)
        # The average of the four batches' (biased) variances.
        expected = np.mean([hidden[i:i + 25].var(0) for i in range(0, 100, 25)], axis=0)
        self.assertAllClose(bn.moving_variance, expected, rtol=1e-4, atol=1e-4)
        self.assertEqual(bn.momentum, 0.99)
        for before, after, variable in zip(weights, model.get_weights(), model.weights):
            if "moving" not in variable.path:
                self.assertAllEqual(before, after)
        # Inference now normalizes like training does on the whole set (before: far off).
        self.assertAllClose(model(x, training=False), model(x, training=True), atol=0.1, rtol=0.05)

    def test_frozen_model_dataset_and_pruned_masks(self):
        import tensorflow as tf

        model = tfopt.prune(self._model(), "baseline")
        model.trainable = False
        masks = {v.path: np.array(v) for v in model.weights if v.path.endswith("_mask")}
        self.assertTrue(masks)
        x = self.make_input((64, 6))
        data = tf.data.Dataset.from_tensor_slices((x, np.zeros((64, 3), "float32"))).batch(16)
        tfopt.reestimate_batch_norm(model, data, steps=2)
        hidden = model.get_layer("hidden")(x[:32]).numpy()
        self.assertAllClose(model.get_layer("bn").moving_mean, hidden.mean(0), atol=1e-4)
        self.assertFalse(model.get_layer("bn").trainable)
        for v in model.weights:
            if v.path in masks:
                self.assertAllEqual(masks[v.path], v)

    def test_folded_batch_norm_of_a_quantized_model(self):
        inputs = keras.Input((8, 8, 2))
        x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
        x = keras.layers.BatchNormalization(name="bn")(x)
        outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x)))
        q = tfopt.quantize_model(keras.Model(inputs, outputs))
        conv = q.get_layer("conv")
        self.assertIsNotNone(conv.folded_batch_norm)
        data = self.make_input((32, 8, 8, 2))
        ranges = {v.path: np.array(v) for v in q.non_trainable_weights if "bn_moving" not in v.path}
        self.assertEqual(tfopt.reestimate_batch_norm(q, data), 1)
        raw = keras.ops.conv(data, conv.kernel, 1, "valid").numpy() + np.array(conv.bias)
        self.assertAllClose(conv.bn_moving_mean, raw.reshape(-1, 4).mean(0), atol=0.05)
        for v in q.non_trainable_weights:
            if v.path in ranges:
                self.assertAllEqual(v, ranges[v.path])

    def test_empty_data_is_refused(self):
        with self.assertRaisesRegex(ValueError, "no batches"):
            tfopt.reestimate_batch_norm(self._model(), [])


class OutputStructureTest(testing.TestCase):
    def test_strip_of_a_quantized_dict_output_model_returns_a_dict(self):
        inputs = keras.Input((4,), name="x")
        hidden = keras.layers.Dense(3, name="hidden")(inputs)
        model = keras.Model(inputs, {"a": hidden, "b": keras.layers.Dense(2, name="head")(hidden)})
        x = self.make_input((2, 4))
        for result in (tfopt.quantize_model(model), tfopt.strip(tfopt.quantize_model(model)),
                       tfopt.strip(tfopt.prune(model, "baseline"))):
            out = result(x)
            self.assertIsInstance(out, dict)
            self.assertEqual(sorted(out), ["a", "b"])


class ShrinkAroundLayersKerasCannotRecreateTest(testing.TestCase):
    def test_a_dense_with_a_lambda_activation_keeps_its_channels(self):
        inputs = keras.Input((8,))
        x = keras.layers.Dense(16, activation="relu", name="a")(inputs)
        x = keras.layers.Dense(16, activation=lambda t: keras.ops.relu(t) * 0.5, name="b")(x)
        model = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = tfopt.plan_shrink(model, 0.5)
            small = plan.apply()
        x = self.make_input((4, 8))
        self.assertAllClose(small(x), plan.masked()(x), atol=1e-5)
        self.assertEqual(small.get_layer("b").kernel.shape, (16, 16))
