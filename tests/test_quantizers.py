"""Quantization specs and fake-quant functions: grids, gradients, bad input."""

import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from tfopt import quantizers, testing


class QuantizersTest(testing.TestCase, parameterized.TestCase):
    @parameterized.parameters((8,), (4,), (2,))
    def test_weights_lie_on_symmetric_per_channel_grid(self, bits):
        w = np.random.default_rng(0).standard_normal((3, 3, 4, 6)).astype("float32")
        spec = quantizers.get_precision(f"int{bits}")[0]
        q = np.asarray(quantizers.quantize_weight(w, spec)).reshape(-1, 6)
        step = np.abs(w).reshape(-1, 6).max(axis=0) / (2 ** (bits - 1) - 1)
        codes = q / step
        self.assertAllClose(codes, np.round(codes), atol=1e-3)
        self.assertLessEqual(np.abs(np.round(codes)).max(), 2 ** (bits - 1) - 1)
        self.assertLessEqual(len(np.unique(np.round(codes[:, 0]))), 2**bits - 1)

    def test_zero_stays_zero(self):
        w = np.random.default_rng(1).standard_normal((16, 8)).astype("float32")
        w[w < 0.3] = 0.0
        for name in ("int8", "int4", "int2", "ternary"):
            q = np.asarray(quantizers.quantize_weight(w, quantizers.get_precision(name)[0]))
            self.assertTrue(np.all(q[w == 0] == 0), name)

    def test_binary_and_ternary_values(self):
        w = np.random.default_rng(2).standard_normal((32, 4)).astype("float32")
        b = np.asarray(quantizers.binary(w))
        for c in range(4):
            magnitudes = np.unique(np.abs(b[:, c]))
            self.assertEqual(len(magnitudes), 1)
            self.assertAlmostEqual(float(magnitudes[0]), float(np.abs(w[:, c]).mean()), places=5)
        t = np.asarray(quantizers.ternary(w))
        for c in range(4):
            self.assertLessEqual(len(np.unique(t[:, c])), 3)

    @parameterized.parameters(("int8",), ("int4",), ("binary",), ("ternary",))
    def test_straight_through_gradient(self, name):
        w = tf.Variable(np.random.default_rng(3).uniform(-0.9, 0.9, (8, 4)).astype("float32"))
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(quantizers.quantize_weight(w, quantizers.get_precision(name)[0]) * 2.0)
        grad = tape.gradient(loss, w).numpy()
        self.assertAllClose(grad, np.full((8, 4), 2.0), atol=1e-6)

    def test_activation_grid_includes_zero(self):
        spec = quantizers.get_precision("int8")[1]
        x = np.linspace(-1.0, 3.0, 101, dtype="float32")
        q = np.asarray(quantizers.quantize_activation(x, -1.0, 3.0, spec))
        scale = 4.0 / 255
        zero_point = round(1.0 / scale)
        codes = (q + zero_point * scale) / scale
        self.assertAllClose(codes, np.round(codes), atol=1e-3)
        self.assertIn(0.0, np.asarray(quantizers.quantize_activation(np.zeros(3, "float32"), -1.0, 3.0, spec)))

    @parameterized.named_parameters(
        ("bits_zero", lambda: quantizers.QuantSpec(0), r"`bits` must be an int from 1 to 16. Received: bits=0"),
        ("bits_17", lambda: quantizers.QuantSpec(17), r"bits=17"),
        ("bits_str", lambda: quantizers.QuantSpec("8"), r"bits='8'"),
        ("affine_1bit", lambda: quantizers.QuantSpec(1), r"mode='binary'"),
        ("mode", lambda: quantizers.QuantSpec(8, mode="log"), r"mode='log'"),
        ("precision", lambda: quantizers.get_precision("int3"), r"Unknown precision: 'int3'.*'int8'"),
        ("per_channel_activation", lambda: quantizers.get_precision(
            (quantizers.QuantSpec(8), quantizers.QuantSpec(8, per_channel=True))), r"per-tensor"),
    )
    def test_bad_input(self, make, pattern):
        with self.assertRaisesRegex(ValueError, pattern):
            make()

    def test_spec_serialization(self):
        spec = quantizers.QuantSpec(4, per_channel=True, symmetric=True, narrow_range=True)
        import keras

        self.assertEqual(keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(spec)), spec)
        self.assertEqual(quantizers.get_precision(True), quantizers.PRECISIONS["int8"])


class IntWeightValuesTest(testing.TestCase, parameterized.TestCase):
    """`int_weight_values` is LiteRT's quantizer's grid (litert-quantizer 0.11), bit for bit."""

    @parameterized.parameters((4, 0), (4, 32), (4, 128), (8, 0))
    def test_matches_litert_quantizer_and_is_a_fixed_point(self, bits, block):
        import pytest

        pytest.importorskip("litert_quantizer")
        from litert_quantizer import qtyping
        from litert_quantizer.algorithms.uniform_quantize import uniform_quantize_tensor as u

        rng = np.random.default_rng(0)
        w = (rng.standard_normal((128, 24)) * rng.uniform(1e-3, 1.0, (1, 24))).astype("float32")
        ours = np.asarray(quantizers.int_weight_values(w, bits, block))
        file_weight = w.T  # the FULLY_CONNECTED weight: (outputs, inputs)
        if block:
            blocks = file_weight.reshape(24, -1, block)
            granularity = getattr(qtyping.QuantGranularity, f"BLOCKWISE_{block}")
            _, scale = u.tensor_zp_scale_from_min_max(blocks.min(-1), blocks.max(-1), bits, True, granularity)
            scale = np.repeat(scale, block, axis=1)
        else:
            _, scale = u.tensor_zp_scale_from_min_max(file_weight.min(1, keepdims=True), file_weight.max(1, keepdims=True),
                                                      bits, True, qtyping.QuantGranularity.CHANNELWISE)
        low, high = u.get_quantized_range(u.IntType(bits, signed=True))
        theirs = (np.clip(np.rint(file_weight / scale), low + (bits >= 8), high) * scale).T
        self.assertAllEqual(ours, theirs)
        self.assertAllEqual(np.asarray(quantizers.int_weight_values(ours, bits, block)), ours)

    def test_gradient_is_straight_through(self):
        w = tf.Variable(np.random.default_rng(1).standard_normal((64, 3)).astype("float32"))
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(quantizers.int_weight_values(w, 4, 32) * 2.0)
        self.assertAllClose(tape.gradient(loss, w), np.full((64, 3), 2.0, "float32"))

    def test_block_that_does_not_divide_is_refused(self):
        with self.assertRaisesRegex(ValueError, r"block_size=32 must divide the input dimension 48"):
            quantizers.int_weight_values(np.ones((48, 2), "float32"), 4, 32)
