"""tfopt.quantize_weights: int4/int8 weight-only QAT whose LiteRT file computes what the model trained."""

import json
import os
import tempfile
import warnings
import zipfile

import keras
import numpy as np
import pytest

import tfopt
from tfopt import _keras_internal, litert, testing
from tfopt.transforms import weight_quantization

pytest.importorskip("litert_quantizer")
keras_hub = pytest.importorskip("keras_hub")


def _lm(seed=0):
    keras.utils.set_random_seed(seed)
    return keras_hub.models.GPT2CausalLM(keras_hub.models.GPT2Backbone(
        vocabulary_size=64, num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64,
        max_sequence_length=16), preprocessor=None)


def _data(n=32, seed=0):
    # Token t + 1 = token t + 1 (mod 64): something a tiny LM learns in a few steps.
    start = np.random.default_rng(seed).integers(0, 64, (n, 1))
    ids = ((start + np.arange(17)) % 64).astype("int32")
    return {"token_ids": ids[:, :-1], "padding_mask": np.ones((n, 16), "int32")}, ids[:, 1:]


def _fit(model, x, y, epochs=2):
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model.fit(x, y, batch_size=8, epochs=epochs, verbose=0).history["loss"]


def _export(model, precision, inputs):
    path = os.path.join(tempfile.mkdtemp(), f"{precision}.tflite")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a tiny LM in int4: the agreement warning)
        return tfopt.export(model, path, precision=precision, inputs=inputs)


def _file_logits(report, inputs):
    with open(report.path, "rb") as f:
        content = f.read()
    return np.asarray(litert.run_litert(content, [inputs["padding_mask"], inputs["token_ids"]],
                                        ["padding_mask", "token_ids"])[0])


def _matrices(model):
    """Every quantized weight of a (stripped) GPT-2 as the (inputs, outputs) matrix the file stores."""
    out = []
    for layer in _keras_internal.all_layers(model):
        kind = _keras_internal.weight_quantizable_kind(layer)
        if kind == "reversible_embedding":
            out.append((layer.name, np.asarray(layer.embeddings).T))
        elif kind is not None:
            k = np.asarray(layer.kernel)
            rows = k.shape[0] * (k.shape[1] if k.ndim == 3 and "abcd" in layer.equation else 1)
            out.append((layer.name, k.reshape(rows, -1)))
    return out


@pytest.mark.slow
class QuantizeWeightsGpt2Test(testing.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.x, cls.y = _data()
        cls.check = {k: v[:4] for k, v in cls.x.items()}
        cls.float_lm = _lm()
        _fit(cls.float_lm, cls.x, cls.y)
        cls.float_logits = np.asarray(cls.float_lm(cls.check))
        cls.qat = _lm()
        cls.qat.set_weights(cls.float_lm.get_weights())
        cls.num_weights = len(cls.qat.weights)
        tfopt.quantize_weights(cls.qat, "int4_block32")
        cls.losses = _fit(cls.qat, cls.x, cls.y, epochs=1)
        cls.qat_logits = np.asarray(cls.qat(cls.check))

    def test_the_model_stays_a_keras_hub_model_with_the_same_weights(self):
        self.assertIsInstance(self.qat, keras_hub.models.GPT2CausalLM)
        self.assertEqual(len(self.qat.weights), self.num_weights)
        # 2 blocks x (q, k, v, o, two feed-forward) + the tied LM head.
        self.assertEqual(len(weight_quantization.weight_quantized_layers(self.qat)), 13)
        self.assertTrue(np.all(np.isfinite(self.losses)))
        self.assertGreater(np.abs(self.qat_logits - self.float_logits).max(), 0.0)

    def test_strip_puts_weights_on_the_int4_grid_and_keeps_the_outputs(self):
        stripped = _lm()
        stripped.set_weights(self.qat.get_weights())
        tfopt.quantize_weights(stripped, "int4_block32")
        stripped = tfopt.strip(stripped)
        self.assertEqual(weight_quantization.weight_quantized_layers(stripped), [])
        self.assertAllClose(np.asarray(stripped(self.check)), self.qat_logits, atol=1e-5)
        for name, matrix in _matrices(stripped):
            blocks = matrix.reshape(-1, 32, matrix.shape[1])
            scale = np.abs(blocks).max(axis=1, keepdims=True) / 7
            codes = blocks / scale
            self.assertAllClose(codes, np.round(codes), atol=0.05, msg=name)  # (scales are rounded to bfloat16)
            self.assertLessEqual(len(np.unique(np.round(codes[:, :, 0]))), 16, name)

    def test_int4_block32_file_matches_the_qat_model_far_closer_than_ptq(self):
        qat = _export(self.qat, "int4_block32", self.check)
        ptq = _export(self.float_lm, "int4_block32", self.check)
        qat_gap = np.abs(_file_logits(qat, self.check) - self.qat_logits).max()
        ptq_gap = np.abs(_file_logits(ptq, self.check) - self.float_logits).max()
        # (activations are quantized to int8 at run time in the blockwise file: the QAT gap is that alone)
        self.assertLess(qat_gap, ptq_gap / 4)
        self.assertAllClose(qat.max_abs_diff, qat_gap, atol=1e-6)
        # The export bakes the grid in for the conversion only: the model is still in QAT form.
        self.assertEqual(len(weight_quantization.weight_quantized_layers(self.qat)), 13)
        self.assertAllClose(np.asarray(self.qat(self.check)), self.qat_logits)
        self.assertAlmostEqual(qat.perplexity, qat.keras_perplexity, delta=0.02 * qat.keras_perplexity)

    def test_weight_only_file_computes_exactly_what_the_model_computes(self):
        lm = _lm()
        lm.set_weights(self.float_lm.get_weights())
        tfopt.quantize_weights(lm, "int4_weight_only")
        logits = np.asarray(lm(self.check))
        report = _export(lm, "int4_weight_only", self.check)
        self.assertLess(np.abs(_file_logits(report, self.check) - logits).max(), 1e-4)

    def test_export_with_another_grid_warns(self):
        with self.assertWarnsRegex(UserWarning, r"trained with tfopt.quantize_weights for precision 'int4_block32'"):
            tfopt.export(self.qat, os.path.join(tempfile.mkdtemp(), "m.tflite"), precision="int4_weight_only",
                         inputs=self.check)

    def test_keras_file_round_trip(self):
        path = os.path.join(tempfile.mkdtemp(), "qat.keras")
        self.qat.save(path)
        back = keras.models.load_model(path)
        # keras-hub rebuilds its layers from the backbone's config: the weights come back, in float form.
        for got, want in zip(back.get_weights(), self.qat.get_weights()):
            self.assertAllClose(got, want)
        tfopt.quantize_weights(back, "int4_block32")
        self.assertAllClose(np.asarray(back(self.check)), self.qat_logits, atol=1e-5)
        stripped = tfopt.strip(back)
        stripped.save(path)
        with zipfile.ZipFile(path) as z:
            self.assertNotIn("tfopt", z.read("config.json").decode())
        self.assertAllClose(np.asarray(keras.models.load_model(path)(self.check)), self.qat_logits, atol=1e-5)

    def test_distiller_student(self):
        student = _lm(1)
        tfopt.quantize_weights(student, "int4_block32")
        distiller = tfopt.distillation.Distiller(teacher=self.float_lm, student=student, temperature=1.0, alpha=0.0)
        distiller.compile(keras.optimizers.Adam(1e-3))
        before = [np.asarray(w) for w in student.weights]
        distiller.fit(self.x, self.y, batch_size=8, epochs=1, verbose=0)
        self.assertTrue(any(np.abs(np.asarray(w) - b).max() > 0 for w, b in zip(student.weights, before)))
        self.assertEqual(len(weight_quantization.weight_quantized_layers(student)), 13)

    def test_float_report_has_perplexity_from_the_file(self):
        report = _export(self.float_lm, "float32", self.check)
        ids = self.check["token_ids"]
        expected = tfopt.exporting.next_token_perplexity(self.float_logits, ids, self.check["padding_mask"])
        self.assertAlmostEqual(report.keras_perplexity, expected, places=3)
        self.assertAlmostEqual(report.perplexity, expected, delta=1e-3 * expected)
        self.assertIn("perplexity", str(report))


class QuantizeWeightsTest(testing.TestCase):
    def _mlp(self, inputs=64):
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((inputs,)), keras.layers.Dense(32, activation="relu"),
                                 keras.layers.Dense(4)])

    def test_functional_model_round_trips_in_qat_form(self):
        model = tfopt.quantize_weights(self._mlp(), "int4_block32")
        x = np.random.default_rng(0).standard_normal((8, 64)).astype("float32")
        expected = np.asarray(model(x))
        path = os.path.join(tempfile.mkdtemp(), "m.keras")
        model.save(path)
        with zipfile.ZipFile(path) as z:
            self.assertIn("tfopt>WeightQuantizedDense", z.read("config.json").decode())
        back = keras.models.load_model(path)
        self.assertEqual([layer.weight_precision for layer in back.layers], ["int4_block32"] * 2)
        self.assertAllClose(np.asarray(back(x)), expected)
        stripped = tfopt.strip(back)
        self.assertNotIn("tfopt", json.dumps(stripped.get_config()))
        self.assertAllClose(np.asarray(stripped(x)), expected, atol=1e-6)
        self.assertEqual(len(weight_quantization.weight_quantized_layers(back)), 2)  # (strip copied it)

    def test_pruning_callback_combines(self):
        model = tfopt.quantize_weights(self._mlp(), "int4_block32")
        x = np.random.default_rng(0).standard_normal((64, 64)).astype("float32")
        model.compile("adam", "mse")
        model.fit(x, np.zeros((64, 4), "float32"), batch_size=16, epochs=2, verbose=0, callbacks=[
            tfopt.callbacks.Pruning(tfopt.schedules.ConstantSparsity(0.5, frequency=1))])
        kernel = np.asarray(tfopt.strip(model).layers[0].kernel)
        self.assertGreaterEqual(float(np.mean(kernel == 0)), 0.5)
        blocks = kernel.reshape(2, 32, -1)
        codes = blocks / (np.abs(blocks).max(axis=1, keepdims=True) / 7)
        self.assertAllClose(codes, np.round(codes), atol=0.05)

    def test_report_of_a_classifier_has_no_perplexity(self):
        report = tfopt.export(self._mlp(), os.path.join(tempfile.mkdtemp(), "m.tflite"))
        self.assertIsNone(report.perplexity)

    def test_unknown_precision_is_refused(self):
        with self.assertRaisesRegex(ValueError, r"precision='int3'.*'int4_block32'"):
            tfopt.quantize_weights(self._mlp(), "int3")
        with self.assertRaisesRegex(ValueError, r"precision='int8_dynamic'"):
            tfopt.quantize_weights(self._mlp(), "int8_dynamic")

    def test_model_with_nothing_to_quantize_is_refused(self):
        model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3)])
        with self.assertRaisesRegex(ValueError, r"no Dense, EinsumDense, ReversibleEmbedding or Embedding.*"
                                                r"tfopt.quantize_model"):
            tfopt.quantize_weights(model)

    def test_block_that_does_not_divide_the_inputs_names_the_layer_and_the_fix(self):
        model = self._mlp(inputs=48)
        with self.assertRaisesRegex(ValueError, r"layer 'dense' \(Dense\) has 48 inputs.*'int4_weight_only'"):
            tfopt.quantize_weights(model, "int4_block32")
        self.assertEqual(weight_quantization.weight_quantized_layers(model), [])  # (nothing changed)

    def test_embedding_lookups_are_on_the_grid_the_file_stores(self):
        # The file stores lookup tables as integer EMBEDDING_LOOKUP tables (per row, blocks along the row), so a
        # plain Embedding and an untied ReversibleEmbedding's lookup are quantized too, and the file computes
        # exactly what the QAT model computes (measured 0 to 6e-8).
        keras.utils.set_random_seed(0)
        ids = keras.Input((8,), dtype="int32")
        h = keras.layers.Embedding(64, 32)(ids)
        head = keras.layers.ReversibleEmbedding(64, 32, tie_weights=False)
        h = head(keras.layers.Dense(32)(h))
        model = keras.Model(ids, head(h, reverse=True))
        x = np.random.default_rng(0).integers(0, 64, (4, 8)).astype("int32")
        for precision in ("int4_weight_only", "int8_weight_only"):
            qat = keras.models.clone_model(model)
            qat.set_weights(model.get_weights())
            tfopt.quantize_weights(qat, precision)
            forms = {type(layer).__qualname__ for layer in weight_quantization.weight_quantized_layers(qat)}
            self.assertEqual(forms, {"WeightQuantizedEmbedding", "WeightQuantizedReversibleEmbedding",
                                     "WeightQuantizedDense"})
            table = np.asarray(tfopt.strip(qat).layers[1].embeddings)
            codes = table / (np.abs(table).max(axis=1, keepdims=True) / (7 if "int4" in precision else 127))
            self.assertAllClose(codes, np.round(codes), atol=0.05)  # (per row)
            expected = np.asarray(qat(x))
            report = _export(qat, precision, x)
            with open(report.path, "rb") as f:
                got = litert.run_litert(f.read(), [x])[0]
            self.assertLess(np.abs(np.asarray(got) - expected).max(), 1e-5, precision)
        self.assertEqual(len(weight_quantization.weight_quantized_layers(
            tfopt.quantize_weights(keras.models.clone_model(model), embeddings=False))), 1)  # (the Dense only)

    def test_twice_is_refused(self):
        model = tfopt.quantize_weights(self._mlp(), "int4_block32")
        with self.assertRaisesRegex(ValueError, r"already has 2 weight-quantized layer\(s\).*tfopt.strip"):
            tfopt.quantize_weights(model, "int4_weight_only")
