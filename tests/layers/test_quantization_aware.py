"""Quantization-aware tfopt layers and QuantizeActivation."""

import os
import tempfile
import warnings

import keras
import numpy as np
from absl.testing import parameterized

import tfopt
from tfopt import testing
from tests.layers.test_layers import _LAYERS_UNDER_TEST as _ALL_LAYERS

# The layers whose geometry has weights to quantize (recurrent layers: issue 12).
_LAYERS_UNDER_TEST = [row for row in _ALL_LAYERS
                      if any(spec.quantize for spec in tfopt.geometry.of(row[1]).weights)]

_RANGE_NAMES = ["output_range_min", "output_range_max", "output_range_updates"]


class QuantizeActivationTest(testing.TestCase):
    def test_harness(self):
        self.run_layer_test(tfopt.layers.QuantizeActivation, {"bits": 8}, (2, 5),
                            expected_weight_names=["range_min", "range_max", "range_updates"],
                            run_training_step=False)

    def test_first_batch_sets_range_then_moving_average(self):
        layer = tfopt.layers.QuantizeActivation(momentum=0.9)
        layer(np.array([[-1.0, 3.0]], "float32"), training=True)
        self.assertAllClose([layer.range_min, layer.range_max], [-1.0, 3.0])
        layer(np.array([[-2.0, 5.0]], "float32"), training=True)
        self.assertAllClose([layer.range_min, layer.range_max], [-1.1, 3.2], atol=1e-6)
        layer(np.array([[-100.0, 100.0]], "float32"), training=False)
        self.assertAllClose([layer.range_min, layer.range_max], [-1.1, 3.2], atol=1e-6)

    def test_frozen_range_does_not_move(self):
        layer = tfopt.layers.QuantizeActivation(freeze=True)
        layer(np.array([[-1.0, 3.0]], "float32"), training=True)
        self.assertAllClose([layer.range_min, layer.range_max], [-6.0, 6.0])

    def test_momentum_validated(self):
        with self.assertRaisesRegex(ValueError, r"momentum.*\[0, 1\).*momentum=1.5"):
            tfopt.layers.QuantizeActivation(momentum=1.5)

    def test_state_stays_float32_under_mixed_precision(self):
        keras.config.set_dtype_policy("mixed_float16")
        try:
            model = keras.Sequential([keras.Input((4,)), tfopt.layers.QuantizeActivation(),
                                      tfopt.layers.Dense(3, quantization_aware="int8")])
            model.compile("adam", "mse")
            model.fit(np.random.rand(8, 4), np.random.rand(8, 3), verbose=0)
            for layer in model.layers:
                for w in layer.weights:
                    if "range" in w.name:
                        self.assertIn(w.dtype, ("float32", "int64"), w.name)
            self.assertNotEqual(float(model.layers[0].range_max.numpy()), 6.0)
        finally:
            keras.config.set_dtype_policy("float32")


class QuantizationAwareLayersTest(testing.TestCase, parameterized.TestCase):
    @parameterized.parameters(_LAYERS_UNDER_TEST)
    def test_harness_int8(self, cls, base_cls, kwargs, shape, weight, dtype):
        base = base_cls(**kwargs)
        base.build(shape)
        # Tensors LiteRT computes inside the layer (a separable conv's depthwise output) get ranges too.
        inner = [f"{name}_range_{part}" for name in cls.INTERMEDIATE_RANGES for part in ("min", "max", "updates")]
        keras_names, tfopt_names = [w.name for w in base.weights], _RANGE_NAMES + inner
        # A layer lists its own variables before its sublayers' (an RNN's cell holds Keras's).
        names = tfopt_names + keras_names if all("." in p for p in weight) else keras_names + tfopt_names
        self.run_layer_test(cls, {**kwargs, "quantization_aware": "int8"}, shape, input_dtype=dtype,
                            expected_weight_names=names)

    @parameterized.parameters(_LAYERS_UNDER_TEST)
    def test_outputs_lie_on_the_range_grid(self, cls, base_cls, kwargs, shape, weight, dtype):
        layer = cls(**kwargs, quantization_aware="int8")
        x = self.make_input(shape, dtype)
        layer(x, training=True)
        out = np.asarray(layer(x, training=False))
        lo, hi = min(float(layer.output_range_min.numpy()), 0.0), max(float(layer.output_range_max.numpy()), 0.0)
        scale = (hi - lo) / 255
        nudged_lo = -round(-lo / scale) * scale
        codes = (out - nudged_lo) / scale
        self.assertAllClose(codes, np.round(codes), atol=2e-3)

    def test_quantization_aware_config_round_trip(self):
        for q in (True, "int4", "binary", tfopt.quantizers.QuantSpec(6, per_channel=True, symmetric=True),
                  (tfopt.quantizers.QuantSpec(4), tfopt.quantizers.QuantSpec(8))):
            layer = tfopt.layers.Dense(3, quantization_aware=q)
            revived = tfopt.layers.Dense.from_config(layer.get_config())
            self.assertEqual(revived.weight_quant_spec, layer.weight_quant_spec, q)
            self.assertEqual(revived.output_quant_spec, layer.output_quant_spec, q)

    @parameterized.parameters(("int8",), ("int4",), ("binary",))
    def test_training_reduces_loss(self, precision):
        from sklearn.datasets import load_digits

        digits = load_digits()
        x, y = (digits.data / 16.0).astype("float32"), digits.target
        model = keras.Sequential([
            keras.Input((64,)), tfopt.layers.QuantizeActivation(),
            tfopt.layers.Dense(64, activation="relu", quantization_aware=precision),
            tfopt.layers.Dense(10, quantization_aware=precision),
        ])
        model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(x[:1024], y[:1024], batch_size=64, epochs=4, verbose=0)
        self.assertLess(history.history["loss"][-1], 0.75 * history.history["loss"][0])

    def test_pruning_survives_quantization(self):
        layer = tfopt.layers.Dense(16, pruning_schedule=tfopt.schedules.ConstantSparsity(0.75, frequency=1),
                                   quantization_aware="int8")
        model = keras.Sequential([keras.Input((32,)), tfopt.layers.QuantizeActivation(), layer])
        model.compile("adam", "mse")
        model.fit(np.random.rand(16, 32), np.random.rand(16, 16), verbose=0)
        kernel = layer.kernel.numpy()
        quantized = np.asarray(tfopt.quantizers.quantize_weight(kernel, layer.weight_quant_spec.__class__(
            **{**layer.weight_quant_spec.get_config(), "per_channel": False})))
        self.assertEqual(float(np.mean(kernel == 0)), 0.75)
        self.assertAllEqual(quantized == 0, kernel == 0)
        self.assertEqual([w.name for w in layer.weights][-5:], _RANGE_NAMES + ["kernel_mask", "pruning_step"])

    def test_unknown_precision(self):
        with self.assertRaisesRegex(ValueError, r"Unknown precision: 'int9'"):
            tfopt.layers.Conv2D(4, 3, quantization_aware="int9")


def _digits_qat_cnn():
    q = "int8"
    return keras.Sequential([
        keras.Input((8, 8, 1)), tfopt.layers.QuantizeActivation(),
        tfopt.layers.Conv2D(32, 3, padding="same", activation="relu", quantization_aware=q),
        keras.layers.MaxPooling2D(),
        tfopt.layers.Conv2D(64, 3, padding="same", activation="relu", quantization_aware=q),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        tfopt.layers.Dense(128, activation="relu", quantization_aware=q),
        tfopt.layers.Dense(10, quantization_aware=q),
    ])


class Int8ExportTest(testing.TestCase):
    def test_qat_cnn_exports_full_integer_with_parity(self):
        from tfopt.demo.data import compile_classifier, load_digits

        x_train, y_train, x_test, y_test = load_digits(0)
        model = _digits_qat_cnn()
        compile_classifier(model)
        model.fit(x_train, y_train, batch_size=32, epochs=6, verbose=0)
        keras_accuracy = model.evaluate(x_test, y_test, verbose=0)[1]
        path = os.path.join(tempfile.mkdtemp(), "int8.tflite")
        report = tfopt.export(model, path, inputs=x_test, precision="int8")
        self.assertEqual(report.float_ops, [])
        self.assertGreaterEqual(report.top1_agreement, 0.99)
        with open(path, "rb") as f:
            logits = tfopt.exporting.run_litert(f.read(), [x_test], ["input_layer"])[0]
        litert_accuracy = float(np.mean(np.argmax(logits, -1) == y_test))
        self.assertLessEqual(abs(litert_accuracy - keras_accuracy), 0.005)
        float_report = tfopt.export(model, os.path.join(tempfile.mkdtemp(), "f.tflite"), check=False)
        self.assertLess(report.size_bytes, 0.3 * float_report.size_bytes)
        # .keras round trip keeps the ranges.
        saved = os.path.join(tempfile.mkdtemp(), "qat.keras")
        model.save(saved)
        loaded = keras.models.load_model(saved)
        self.assertAllClose(loaded.predict(x_test[:16], verbose=0), model.predict(x_test[:16], verbose=0), atol=1e-5)

    def test_int8_without_ranges_or_data_says_what_to_pass(self):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        with self.assertRaisesRegex(ValueError, r"no quantization ranges.*representative_data="):
            tfopt.export(model, os.path.join(tempfile.mkdtemp(), "m.tflite"), precision="int8")
        with self.assertRaisesRegex(ValueError, r"precision='int3'"):
            tfopt.export(model, os.path.join(tempfile.mkdtemp(), "m.tflite"), precision="int3")

    def test_post_training_int8_with_representative_data(self):
        model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(4)])
        x = self.make_input((64, 16))
        report = tfopt.export(model, os.path.join(tempfile.mkdtemp(), "ptq.tflite"), inputs=x,
                              precision="int8", representative_data=x)
        self.assertEqual(report.float_ops, [])
        self.assertGreaterEqual(report.top1_agreement, 0.9)

    def test_depthwise_weights_are_per_channel_in_the_file(self):
        # Channels with very different magnitudes: one per-tensor scale would
        # flatten the small ones to zero.
        layer = tfopt.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2, use_bias=False,
                                             quantization_aware="int8", name="dw")
        model = keras.Sequential([keras.Input((6, 6, 3)), tfopt.layers.QuantizeActivation(), layer])
        kernel = layer.kernel.numpy() * (10.0 ** -np.arange(6)).reshape(1, 1, 3, 2)
        layer.kernel.assign(kernel)
        x = self.make_input((8, 6, 6, 3))
        model(x, training=True)
        from ai_edge_litert.interpreter import Interpreter

        path = os.path.join(tempfile.mkdtemp(), "dw.tflite")
        report = tfopt.export(model, path, inputs=x, precision="int8")
        self.assertEqual(report.float_ops, [])
        filters = [t for t in Interpreter(model_path=path).get_tensor_details()
                   if t["dtype"] == np.int8 and list(t["shape"]) == [1, 3, 3, 6]]
        self.assertEqual(len(filters), 1)
        scales = filters[0]["quantization_parameters"]["scales"]
        self.assertAllClose(scales, np.abs(kernel).reshape(9, 6).max(0) / 127, rtol=1e-5)

    def test_latency_of_int8_and_float_files(self):
        model = keras.Sequential([keras.Input((16,)), tfopt.layers.QuantizeActivation(),
                                  tfopt.layers.Dense(8, quantization_aware="int8")])
        x = self.make_input((4, 16))
        model(x, training=True)
        report = tfopt.export(model, os.path.join(tempfile.mkdtemp(), "l.tflite"), inputs=x,
                              precision="int8", measure_latency=True)
        self.assertGreater(report.latency_ms, 0.0)
        self.assertGreater(report.float_latency_ms, 0.0)
        self.assertIn("float32:", str(report))
        plain = tfopt.export(model, os.path.join(tempfile.mkdtemp(), "p.tflite"), check=False)
        self.assertIsNone(plain.latency_ms)

    def test_binary_and_ternary_weights_export_full_integer(self):
        x = self.make_input((16, 8, 8, 1))
        for precision in ("binary", "ternary"):
            model = keras.Sequential([
                keras.Input((8, 8, 1)), tfopt.layers.QuantizeActivation(),
                tfopt.layers.Conv2D(4, 3, activation="relu", quantization_aware=precision),
                keras.layers.Flatten(), tfopt.layers.Dense(3, quantization_aware=precision),
            ])
            model(x, training=True)
            report = tfopt.export(model, os.path.join(tempfile.mkdtemp(), f"{precision}.tflite"), inputs=x,
                                  precision="int8")
            self.assertEqual(report.float_ops, [], precision)
            self.assertLess(report.max_abs_diff, 0.05, precision)

    def test_fully_pruned_channel_with_a_bias_exports_exactly(self):
        # A channel whose kernel is all zeros (pruned away) but whose bias is
        # not: a 1e-8 weight range made the converter's int32 bias saturate.
        conv = tfopt.layers.Conv2D(4, 3, activation="relu", quantization_aware="int8", name="c")
        model = keras.Sequential([keras.Input((6, 6, 1)), tfopt.layers.QuantizeActivation(), conv,
                                  keras.layers.Flatten(), tfopt.layers.Dense(3, quantization_aware="int8")])
        x = self.make_input((16, 6, 6, 1))
        model(x, training=True)
        kernel = conv.kernel.numpy()
        kernel[..., 1] = 0.0
        conv.kernel.assign(kernel)
        conv.bias.assign(np.array([0.1, 0.5, -0.2, 0.3], "float32"))
        model(x, training=True)
        report = tfopt.export(model, os.path.join(tempfile.mkdtemp(), "z.tflite"), inputs=x, precision="int8")
        self.assertEqual(report.float_ops, [])
        self.assertLess(report.max_abs_diff, 0.05)


class _TransformerBlock(keras.layers.Layer):
    """keras-io's text-classification TransformerBlock: attention, two
    LayerNormalizations and a feed-forward Sequential, held by a custom layer."""

    def __init__(self, embed_dim, num_heads, ff_dim, **kwargs):
        super().__init__(**kwargs)
        self.embed_dim, self.num_heads, self.ff_dim = embed_dim, num_heads, ff_dim
        self.att = keras.layers.MultiHeadAttention(num_heads=num_heads, key_dim=embed_dim)
        self.ffn = keras.Sequential([keras.layers.Dense(ff_dim, activation="relu"), keras.layers.Dense(embed_dim)])
        self.layernorm1 = keras.layers.LayerNormalization(epsilon=1e-6)
        self.layernorm2 = keras.layers.LayerNormalization(epsilon=1e-6)

    def call(self, inputs):
        out1 = self.layernorm1(inputs + self.att(inputs, inputs))
        return self.layernorm2(out1 + self.ffn(out1))

    def get_config(self):
        return {**super().get_config(), "embed_dim": self.embed_dim, "num_heads": self.num_heads,
                "ff_dim": self.ff_dim}


def _qat_transformer(seed=0):
    inputs = keras.Input((8, 8))
    x = _TransformerBlock(16, 2, 32, name="block")(keras.layers.Dense(16, name="embed")(inputs))
    x = keras.layers.GlobalAveragePooling1D()(x)
    qat = tfopt.quantize_model(keras.Model(inputs, keras.layers.Dense(10, name="head")(x)), unsupported="float")
    qat.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    data = np.random.default_rng(seed).normal(size=(64, 8, 8)).astype("float32")
    qat.fit(data, np.arange(64) % 10, epochs=1, verbose=0)
    return qat, data


class NestedLayerNormalizationTest(testing.TestCase):
    def test_export_copy_puts_nested_layer_norms_in_integer_form(self):
        # LiteRT has no integer NEG; Keras's LayerNormalization has one. The
        # nested ones stayed Keras's: NEG stayed float even with representative_data.
        from tfopt import litert
        from tfopt.layers import litert_forms

        qat, data = _qat_transformer()
        stripped = tfopt.strip(qat)
        block = stripped.get_layer("block")
        copies = []

        def clone_function(layer):  # what the export form does with a layer holding others
            copy = litert_forms.export_copy(layer, calibrating=True)
            if copy is not layer:
                copies.append(copy)
            return copy

        exported = keras.models.clone_model(stripped, clone_function=clone_function)
        exported.set_weights(stripped.get_weights())
        for copy in copies:
            litert_forms.use_nested_forms(copy, calibrating=True)
        self.assertEqual([c.name for c in copies], ["block"])
        self.assertIsInstance(copies[0].layernorm1, tfopt.layers.IntegerLayerNormalization)
        self.assertIsInstance(copies[0].layernorm2, tfopt.layers.IntegerLayerNormalization)
        self.assertIs(type(block.layernorm1), keras.layers.LayerNormalization)  # the model given is kept
        self.assertAllClose(exported.predict(data, verbose=0), stripped.predict(data, verbose=0), atol=1e-5)
        self.assertIn("NEG", litert.float_ops(litert.convert(stripped, precision="int8", representative_data=[data])))
        content = litert.convert(exported, precision="int8", representative_data=[data])
        self.assertNotIn("NEG", litert.float_ops(content))

    def test_a_layer_keras_cannot_recreate_keeps_its_form(self):
        # (With representative data it warns: a row of tests/misuse/test_quantization.py.)
        from tests.misuse.test_quantization import FixedBlock
        from tfopt.layers import litert_forms

        layer = FixedBlock()
        layer(np.ones((1, 4), "float32"))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            self.assertIs(litert_forms.export_copy(layer, calibrating=False), layer)  # no form without calibration

    def test_int8_export_with_representative_data_has_no_float_neg(self):
        qat, data = _qat_transformer()
        report = tfopt.export(qat, os.path.join(tempfile.mkdtemp(), "t.tflite"), inputs=data[:8],
                              precision="int8", representative_data=data)
        self.assertNotIn("NEG", report.float_ops)


def _keras_twin_pair(keras_cls, twin_cls, kwargs, *inputs, **twin_kwargs):
    """A Keras layer and its twin (with `twin_kwargs`), both built on `inputs`, with the same weights."""
    base, twin = keras_cls(**kwargs), twin_cls(**kwargs, **twin_kwargs)
    base(*inputs)
    twin(*inputs)
    base.set_weights(twin.keras_weights())
    return base, twin


_LN_CONFIGS = [{}, {"rms_scaling": True}, {"center": False}, {"scale": False}, {"axis": [1, 2], "epsilon": 1e-6}]
_ATTENTION_CALLS = [  # (call kwargs, whether value differs from query)
    ({}, False), ({}, True), ({"use_causal_mask": True}, False), ({"return_attention_scores": True}, False),
    ({"attention_mask": np.tril(np.ones((3, 5, 5), bool))}, False),
    ({"value_mask": np.arange(7)[None].repeat(3, 0) < [[7], [4], [2]]}, True),
]


class TransformerTwinsTest(testing.TestCase, parameterized.TestCase):
    """LayerNormalization and MultiHeadAttention twins (tfopt/layers/normalization.py, attention.py)."""

    def setUp(self):
        super().setUp()
        warnings.filterwarnings("ignore", message=".*rms_scaling=True.*deprecated")
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(3, 5, 8)).astype("float32")
        self.y = rng.normal(size=(3, 7, 8)).astype("float32")

    def test_layer_normalization_harness(self):
        names = [f"{n}_range_{p}" for n in tfopt.layers.LayerNormalization.INTERMEDIATE_RANGES
                 for p in ("min", "max", "updates")]
        for kwargs, keras_names in (({}, ["gamma", "beta"]), ({"rms_scaling": True}, ["gamma"])):
            self.run_layer_test(tfopt.layers.LayerNormalization, {**kwargs, "quantization_aware": "int8"}, (2, 5, 8),
                                expected_weight_names=keras_names + _RANGE_NAMES + names)

    @parameterized.parameters(*[(c,) for c in _LN_CONFIGS])
    def test_layer_normalization_off_is_keras(self, config):
        base, twin = _keras_twin_pair(keras.layers.LayerNormalization, tfopt.layers.LayerNormalization, config, self.x)
        for w in twin.weights:
            w.assign(np.random.default_rng(1).normal(size=w.shape))
        base.set_weights(twin.get_weights())
        self.assertAllEqual(base(self.x), twin(self.x))

    @parameterized.parameters(*[(c,) for c in _LN_CONFIGS])
    def test_layer_normalization_on_is_close_to_keras(self, config):
        base, twin = _keras_twin_pair(keras.layers.LayerNormalization, tfopt.layers.LayerNormalization, config, self.x,
                                      quantization_aware="int8")
        twin(self.x, training=True)  # the first batch sets the ranges
        expected = np.asarray(base(self.x))
        self.assertAllClose(twin(self.x), expected, atol=0.08 * np.abs(expected).max())

    @parameterized.parameters(*_ATTENTION_CALLS)
    def test_attention_off_is_keras(self, call, cross):
        value = self.y if cross else self.x
        base, twin = _keras_twin_pair(keras.layers.MultiHeadAttention, tfopt.layers.MultiHeadAttention,
                                      {"num_heads": 2, "key_dim": 4}, self.x, value)
        keras.tree.map_structure(self.assertAllEqual, base(self.x, value, **call), twin(self.x, value, **call))

    @parameterized.parameters(*_ATTENTION_CALLS)
    def test_attention_on_is_close_to_keras(self, call, cross):
        value = self.y if cross else self.x
        base, twin = _keras_twin_pair(keras.layers.MultiHeadAttention, tfopt.layers.MultiHeadAttention,
                                      {"num_heads": 2, "key_dim": 4}, self.x, value, quantization_aware="int8")
        twin(self.x, value, training=True, **call)  # the first batch sets the ranges
        expected = keras.tree.flatten(base(self.x, value, **call))[0]
        got = keras.tree.flatten(twin(self.x, value, **call))[0]
        self.assertAllClose(got, expected, atol=0.1 * np.abs(np.asarray(expected)).max())

    def test_attention_applies_the_keras_mask_its_inputs_carry(self):
        # Padding ids (0) masked by Embedding(mask_zero=True): the quantization-aware
        # form masks them as Keras does, so the same layer given the mask explicitly agrees.
        ids = np.array([[3, 1, 4, 0, 0], [2, 7, 1, 8, 0]], "int32")
        embedding = keras.layers.Embedding(10, 8, mask_zero=True)
        twin = tfopt.layers.MultiHeadAttention(2, 4, quantization_aware="int8")
        x = embedding(ids)
        twin(x, x, training=True)
        carried = np.asarray(twin(x, x))
        keep = ids != 0
        explicit = np.asarray(twin(keras.ops.convert_to_tensor(np.asarray(x)), np.asarray(x),
                                   attention_mask=keep[:, :, None] & keep[:, None, :]))
        self.assertAllClose(carried, explicit, atol=1e-6)

    def test_attention_keeps_keras_weights_then_ranges(self):
        base, twin = _keras_twin_pair(keras.layers.MultiHeadAttention, tfopt.layers.MultiHeadAttention,
                                      {"num_heads": 2, "key_dim": 4}, self.x, self.x, quantization_aware="int8")
        names = [w.name for w in twin.weights]
        self.assertEqual(names[:8], [w.name for w in base.weights])
        inner = [f"{n}_range_{p}" for n in twin.INTERMEDIATE_RANGES for p in ("min", "max", "updates")]
        self.assertEqual(names[8:], _RANGE_NAMES + inner)

    def test_attention_config_round_trip(self):
        for q in (None, "int8", "int4"):
            layer = tfopt.layers.MultiHeadAttention(2, 4, value_dim=3, dropout=0.1, output_shape=6,
                                                    quantization_aware=q, name="attention")
            revived = tfopt.layers.MultiHeadAttention.from_config(layer.get_config())
            self.assertEqual(revived.get_config(), layer.get_config())
            self.assertEqual(revived.weight_quant_spec, layer.weight_quant_spec)

    def test_saved_model_round_trip(self):
        inputs = keras.Input((5, 8))
        h = tfopt.layers.LayerNormalization(quantization_aware="int8")(inputs)
        h = tfopt.layers.MultiHeadAttention(2, 4, quantization_aware="int8")(h, h)
        h = tfopt.layers.LayerNormalization(rms_scaling=True, quantization_aware="int8")(h)
        model = keras.Model(inputs, h)
        model.compile("adam", "mse")
        model.fit(self.x, self.x, epochs=2, verbose=0)
        path = os.path.join(tempfile.mkdtemp(), "transformer.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        self.assertAllClose(model.predict(self.x, verbose=0), loaded.predict(self.x, verbose=0))
        for a, b in zip(model.weights, loaded.weights):
            self.assertEqual(a.path, b.path)
            self.assertAllEqual(a, b)
        stripped = tfopt.strip(loaded)
        self.assertEqual([type(layer).__module__.split(".")[0] for layer in stripped.layers[1:]], ["keras"] * 3)

    def test_attention_with_a_gate_is_refused_with_the_fix(self):
        layer = tfopt.layers.MultiHeadAttention(2, 4, use_gate=True, quantization_aware="int8", name="gated")
        with self.assertRaisesRegex(ValueError, r"'gated'.*use_gate=True.*Fix: leave quantization_aware off"):
            layer(self.x, self.x)

    def test_quantize_model_keeps_a_gated_attention_float_with_a_warning(self):
        inputs = keras.Input((5, 8))
        h = keras.layers.LayerNormalization()(inputs)
        out = keras.layers.MultiHeadAttention(2, 4, use_gate=True, name="gated")(h, h)
        with self.assertWarnsRegex(UserWarning, r"gated.*use_gate=True.*stay float"):
            qat = tfopt.quantize_model(keras.Model(inputs, out))
        kinds = {layer.name: type(layer).__module__.split(".")[0] for layer in qat.layers}
        self.assertEqual(kinds["gated"], "keras")
        self.assertIn("gated_quantize", kinds)  # a range after it
        self.assertEqual(type(qat.layers[2]).__module__, "tfopt.layers.normalization")
