"""export()'s weight-quantized precisions: the converter's float file rewritten by LiteRT's quantizer."""

import os
import tempfile
import warnings
from unittest import mock

import keras
import numpy as np
import pytest

import tfopt
from tfopt import _keras_internal, litert, testing
from tfopt._export import weight_only

INT8, INT4 = weight_only.INT8, weight_only.INT4


def _mlp():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(128, activation="relu"),
                             keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10)])


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _export(model, precision, **kwargs):
    path = os.path.join(tempfile.mkdtemp(), f"{precision}.tflite")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (int4 on a random model: the agreement warning)
        return tfopt.export(model, path, precision=precision, **kwargs)


class MlpTest(testing.TestCase):
    @classmethod
    def setUpClass(cls):
        pytest.importorskip("litert_quantizer")
        cls.model = _mlp()
        cls.x = np.random.default_rng(0).standard_normal((64, 64)).astype("float32")
        cls.float_size = _export(cls.model, "float32", inputs=cls.x).size_bytes

    def _check(self, precision, most, int_type):
        report = _export(self.model, precision, inputs=self.x)
        content = _read(report.path)
        self.assertEqual(report.precision, precision)
        self.assertIsNone(litert.litert_load_error(content))
        self.assertEqual(report.float_size_bytes, self.float_size)
        self.assertLess(report.size_bytes, most * self.float_size)
        self.assertIn("x the float32 file", str(report))
        types = weight_only.tensor_types(content)
        self.assertEqual(types.get(int_type), 3, types)  # the three kernels
        return report, content

    def test_int8_weight_only(self):
        report, content = self._check("int8_weight_only", 0.35, INT8)
        self.assertGreaterEqual(report.top1_agreement, 0.95)
        self.assertLess(report.max_abs_diff, 0.05)
        ops = {op["op_name"] for op in _keras_internal.litert_ops(litert._interpreter(model_content=content))}
        self.assertIn("DEQUANTIZE", ops)  # weights dequantized, float compute

    def test_int4_weight_only_and_dynamic(self):
        for precision in ("int4_weight_only", "int4_dynamic"):
            report, _ = self._check(precision, 0.22, INT4)
            self.assertGreaterEqual(report.top1_agreement, 0.5)  # measured 0.80 / 0.81 on random inputs
            self.assertLess(report.max_abs_diff, 0.5)

    def test_int4_blocks(self):
        for block in (32, 64):
            report, content = self._check(f"int4_block{block}", 0.22, INT4)
            self.assertGreaterEqual(report.top1_agreement, 0.5)  # measured 0.81 / 0.84
            blocks = {t["quantization_parameters"]["block_size"]
                      for t in litert._interpreter(model_content=content).get_tensor_details()}
            self.assertIn(block, blocks)

    def test_block_size_that_does_not_divide_the_input_dim_is_refused(self):
        path = os.path.join(tempfile.mkdtemp(), "m.tflite")
        with open(path, "wb") as f:
            f.write(b"previous")
        with self.assertRaisesRegex(ValueError, r"blocks of 128.*\(128, 64\).*\[64, 128\].*'int4_block64'"):
            tfopt.export(self.model, path, inputs=self.x, precision="int4_block128")
        self.assertEqual(_read(path), b"previous")

    def test_int8_dynamic_through_the_converter(self):
        report = _export(self.model, "int8_dynamic", inputs=self.x)
        content = _read(report.path)
        self.assertIsNone(report.float_size_bytes)  # (no float file converted)
        self.assertLess(report.size_bytes, 0.35 * self.float_size)
        self.assertGreater(litert.tensor_count(content, np.int8), 0)
        self.assertGreaterEqual(report.top1_agreement, 0.9)

    def test_int8_dynamic_with_weights_too_small_is_refused(self):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        with self.assertRaisesRegex(ValueError, r"left every weight in float.*int8_weight_only"):
            _export(model, "int8_dynamic")

    def test_sparse_true_is_refused_before_converting(self):
        with mock.patch.object(litert, "convert") as convert:
            with self.assertRaisesRegex(ValueError, r"sparse=True.*int4_weight_only"):
                _export(self.model, "int4_weight_only", sparse=True)
        convert.assert_not_called()


class MisuseTest(testing.TestCase):
    def test_unknown_precision_lists_the_valid_ones(self):
        with self.assertRaisesRegex(ValueError, r"int8_weight_only.*int4_block128.*precision='int4'"):
            tfopt.export(_mlp(), os.path.join(tempfile.mkdtemp(), "m.tflite"), precision="int4")

    def test_missing_quantizer_names_the_extra(self):
        with mock.patch.dict("sys.modules", {"litert_quantizer": None}), \
                mock.patch.object(litert, "convert") as convert:
            with self.assertRaisesRegex(ImportError, r"tfopt\[litert-quantizer\]"):
                tfopt.export(_mlp(), os.path.join(tempfile.mkdtemp(), "m.tflite"), precision="int4_weight_only")
        convert.assert_not_called()

    def test_keras_int8_model_exports_its_own_integers(self):
        pytest.importorskip("litert_quantizer")
        from litert_quantizer.utils import tfl_flatbuffer_utils

        model = _keras_quantized("int8")
        x = np.random.default_rng(0).standard_normal((32, 64)).astype("float32")
        report = _export(model, "int8_weight_only", inputs=x)
        self.assertEqual(report.top1_agreement, 1.0)  # (against Keras's int8 model; measured max diff 0.02)
        flat = tfl_flatbuffer_utils.read_model(_read(report.path))
        stored = [tfl_flatbuffer_utils.get_tensor_data(t, flat.buffers) for t in flat.subgraphs[0].tensors
                  if t.type == INT8]
        for layer in model.layers:  # Keras's integers, bit for bit (FULLY_CONNECTED keeps (outputs, inputs))
            self.assertTrue(any(np.array_equal(s, np.asarray(layer._kernel).T) for s in stored), layer.name)
        self.assertEqual(_export(model, "float32", inputs=x).top1_agreement, 1.0)  # dequantized, in float

    def test_keras_quantized_model_that_cannot_be_written_is_refused(self):
        for mode, precision, message in [
                ("int8", "int4_weight_only", r"quantized by Keras.*would quantize its int8 weights again.*"
                                             r"precision='int8_weight_only'"),
                ("int4", "float32", r"quantized by Keras \(`model.quantize\('int4'\)`.*int8_weight_only")]:
            path = os.path.join(tempfile.mkdtemp(), "m.tflite")
            with mock.patch.object(litert, "convert") as convert:
                with self.assertRaisesRegex(ValueError, message):
                    tfopt.export(_keras_quantized(mode), path, precision=precision)
            convert.assert_not_called()
            self.assertFalse(os.path.exists(path))


def _lookup_table_types(content):
    """The TensorType of each EMBEDDING_LOOKUP table in the file (through the DEQUANTIZE of a weight-only
    recipe), and the number of GATHERs of a constant float table left."""
    from litert_quantizer.utils import tfl_flatbuffer_utils

    model = tfl_flatbuffer_utils.read_model(content)
    subgraph = model.subgraphs[0]
    code = [max(c.builtinCode, c.deprecatedBuiltinCode) for c in model.operatorCodes]
    producer = {out: op for op in subgraph.operators for out in op.outputs}
    types, gathers = [], 0
    for op in subgraph.operators:
        if code[op.opcodeIndex] == weight_only.EMBEDDING_LOOKUP:
            table = op.inputs[1]
            if table in producer and code[producer[table].opcodeIndex] == 6:  # DEQUANTIZE
                table = producer[table].inputs[0]
            types.append(subgraph.tensors[table].type)
        elif code[op.opcodeIndex] == 36:  # GATHER
            params = subgraph.tensors[op.inputs[0]]
            data = model.buffers[params.buffer].data
            gathers += params.type == 0 and data is not None and len(data) > 0
    return types, gathers


class EmbeddingLookupTest(testing.TestCase):
    """The embedding lookup table is integer in every weight-quantized file (GATHER rewritten as
    EMBEDDING_LOOKUP, see tfopt/_export/weight_only.py), runs in the default interpreter, matches Keras."""

    @classmethod
    def setUpClass(cls):
        pytest.importorskip("litert_quantizer")
        keras.utils.set_random_seed(0)
        cls.model = keras.Sequential([keras.Input((8,), dtype="int32"), keras.layers.Embedding(200, 64),
                                      keras.layers.Dense(32)])
        cls.x = np.random.default_rng(0).integers(0, 200, (16, 8)).astype("int32")

    def test_rewrite_is_exact_in_float(self):
        float_file = _read(_export(self.model, "float32", inputs=self.x).path)
        rewritten, count = weight_only.gathers_to_embedding_lookups(float_file)
        self.assertEqual(count, 1)
        self.assertEqual(_lookup_table_types(rewritten), ([0], 0))
        self.assertIsNone(litert.litert_load_error(rewritten))
        for x in (self.x, self.x[:3, :5]):  # (a dynamic batch and length)
            self.assertAllClose(litert.run_litert(rewritten, [x])[0], litert.run_litert(float_file, [x])[0],
                                atol=0, rtol=0)
        mlp = _read(_export(_mlp(), "float32").path)
        self.assertEqual(weight_only.gathers_to_embedding_lookups(mlp), (mlp, 0))  # (nothing to rewrite)

    def test_lookup_table_is_integer_in_the_file(self):
        keras_out = np.asarray(self.model(self.x))
        for precision, int_type, most in [("int8_weight_only", INT8, 0.01), ("int4_weight_only", INT4, 0.1),
                                          ("int4_dynamic", INT4, 0.1), ("int4_block32", INT4, 0.1)]:
            report = _export(self.model, precision, inputs=self.x)
            content = _read(report.path)
            self.assertEqual(_lookup_table_types(content), ([int_type], 0), precision)
            self.assertIsNone(litert.litert_load_error(content), precision)
            got = np.asarray(litert.run_litert(content, [self.x])[0])
            self.assertLess(np.abs(got - keras_out).max(), most, precision)  # measured 7e-4 / 0.011-0.013
            # The float32 table (200 x 64, 51,200 bytes) is gone: int8 saves 3/4 of it, int4 7/8.
            self.assertLess(report.size_bytes, report.float_size_bytes - 0.7 * 51200, precision)

    def test_int8_dynamic_keeps_the_converters_gather(self):
        content = _read(_export(self.model, "int8_dynamic", inputs=self.x).path)
        self.assertEqual(_lookup_table_types(content)[0], [])


def _keras_quantized(mode):
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (InputLayer has no quantize method)
        model.quantize(mode)
    return model


@pytest.mark.slow
class Gpt2Test(testing.TestCase):
    @classmethod
    def setUpClass(cls):
        pytest.importorskip("litert_quantizer")
        keras_hub = pytest.importorskip("keras_hub")
        keras.utils.set_random_seed(0)
        cls.lm = keras_hub.models.GPT2CausalLM(keras_hub.models.GPT2Backbone(
            vocabulary_size=64, num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64,
            max_sequence_length=16), preprocessor=None)
        ids = np.random.default_rng(0).integers(0, 64, (4, 16)).astype("int32")
        cls.inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
        cls.logits = np.asarray(cls.lm(cls.inputs))
        cls.float_size = _export(cls.lm, "float32", inputs=cls.inputs).size_bytes

    def _token_agreement(self, content):
        got = litert.run_litert(content, [self.inputs["padding_mask"], self.inputs["token_ids"]],
                                ["padding_mask", "token_ids"])[0]
        return float(np.mean(np.argmax(got, -1) == np.argmax(self.logits, -1)))

    def test_precisions(self):
        # (expected share of the float file, int tensor type, lowest token top-1 agreement). Measured on
        # 8x16 tokens, before the lookup tables were quantized: 0.67x / 0.98, 0.62x / 0.99, 0.60x / 0.85,
        # 0.58x / 0.85, 0.56x / 0.86 (the op graph and the position table stay float, so the share is well
        # above the MLP's).
        for precision, most, int_type, agreement in [("int8_weight_only", 0.75, INT8, 0.9),
                                                      ("int8_dynamic", 0.7, INT8, 0.9),
                                                      ("int4_weight_only", 0.65, INT4, 0.6),
                                                      ("int4_dynamic", 0.65, INT4, 0.6),
                                                      ("int4_block32", 0.6, INT4, 0.6)]:
            report = _export(self.lm, precision, inputs=self.inputs)
            content = _read(report.path)
            self.assertIsNone(litert.litert_load_error(content), precision)
            self.assertLess(report.size_bytes, most * self.float_size, precision)
            self.assertGreater(weight_only.tensor_types(content).get(int_type, 0), 0, precision)
            self.assertGreaterEqual(self._token_agreement(content), agreement, precision)
            if precision != "int8_dynamic":  # (the tied table: one integer tensor for the lookup and the head)
                self.assertEqual(_lookup_table_types(content), ([int_type], 0), precision)

    def test_block_larger_than_the_hidden_width_is_refused(self):
        with self.assertRaisesRegex(ValueError, r"blocks of 64.*'int4_block32'"):
            _export(self.lm, "int4_block64", inputs=self.inputs)
