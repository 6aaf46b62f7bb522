"""tfopt.quantize_model of keras-hub BERT-style encoders and GPT-2-style decoders (built from
configs, nothing downloaded):
the same output structure and, stripped, the same float model; an int8 export without
representative_data is full integer and agrees with the Keras QAT model.

The token task: 64 token ids in [0, 17); in a sequence of class c, each token is c + 1 with
probability 1/4, else uniform (a task a one-block encoder learns in a few epochs; the digits'
pixels as tokens take a one-block BERT tens of epochs)."""

import os
import tempfile

import keras
import numpy as np
import pytest

import tfopt
from tfopt import testing
from tfopt.demo.data import compile_classifier
from tfopt.layers.quantize_activation import QuantizingLayer

keras_hub = pytest.importorskip("keras_hub")

_BERT = dict(vocabulary_size=17, num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32,
             max_sequence_length=64, dropout=0.0)


def _features(tokens, padded=0):
    """BERT's inputs for `(batch, 64)` token ids; the last `padded` positions of every other row padded."""
    mask = np.ones_like(tokens)
    if padded:
        mask[::2, -padded:] = 0
    return {"token_ids": tokens, "segment_ids": np.zeros_like(tokens), "padding_mask": mask}


def _token_task(count, rng):
    labels = rng.integers(0, 10, count)
    tokens = rng.integers(0, 17, (count, 64))
    tokens = np.where(rng.random((count, 64)) < 0.25, labels[:, None] + 1, tokens)
    return tokens.astype("int32"), labels.astype("int32")


def _classifier(backbone):
    """A Dense(10) on the mean of the backbone's sequence output."""
    pooled = keras.layers.GlobalAveragePooling1D()(backbone.output["sequence_output"])
    return keras.Model(backbone.input, keras.layers.Dense(10)(pooled))


class KerasHubQuantizationTest(testing.TestCase):

    def test_backbone_keeps_its_outputs_and_strips_to_the_float_model(self):
        backbone = keras_hub.models.BertBackbone(**_BERT)
        qat = tfopt.quantize_model(backbone)
        self.assertEqual(sorted(qat.output), ["pooled_output", "sequence_output"])
        kinds = {type(layer).__name__ for layer in qat.layers}
        self.assertIn("QuantizedTransformerEncoder", kinds)
        self.assertTrue(all(isinstance(layer, QuantizingLayer) for layer in qat.layers
                            if type(layer).__name__ in ("ReversibleEmbedding", "PositionEmbedding", "Embedding")))
        # The three embeddings are summed in two ADD ops: each partial sum gets a range.
        self.assertIn("embeddings_add_partial_0_quantize", [layer.name for layer in qat.layers])
        batch = _features(np.random.default_rng(0).integers(0, 17, (4, 64)).astype("int32"), padded=8)
        stripped = tfopt.strip(qat)
        for key in ("sequence_output", "pooled_output"):
            self.assertAllClose(stripped(batch)[key], backbone(batch)[key], atol=1e-5)

    def test_encoder_needs_a_precision(self):
        tfopt.quantize_model(keras_hub.models.BertBackbone(**_BERT))  # registers the twins
        from tfopt.adapters import keras_hub_quantization

        with self.assertRaisesRegex(ValueError, "needs `quantization_aware`"):
            keras_hub_quantization.QuantizedTransformerEncoder(intermediate_dim=8, num_heads=2)

    # The encoder classifier's int8 row (full integer, >= 99% agreement) is in tests/test_int8_coverage.py.

    def test_pooled_output_classifier_exports_full_integer(self):
        # The [CLS] slice and the tanh pooler are integer ops too (measured: 98.8% agreement
        # after 6 epochs, 43% accuracy; one epoch here, for the ops only).
        rng = np.random.default_rng(0)
        (x_train, y_train), (x_test, _) = _token_task(256, rng), _token_task(64, rng)
        backbone = keras_hub.models.BertBackbone(**_BERT)
        model = tfopt.quantize_model(keras.Model(backbone.input,
                                                 keras.layers.Dense(10)(backbone.output["pooled_output"])))
        compile_classifier(model, 3e-3)
        model.fit(_features(x_train), y_train, batch_size=64, epochs=1, verbose=0)
        report = tfopt.export(model, os.path.join(tempfile.mkdtemp(), "bert.tflite"),
                              inputs=_features(x_test, padded=4), precision="int8")
        self.assertEqual(report.float_ops, [])


_GPT2 = dict(vocabulary_size=17, num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32,
             max_sequence_length=16, dropout=0.0)


def _lm_features(count, padded=0):
    tokens = np.random.default_rng(0).integers(0, 17, (count, 16)).astype("int32")
    mask = np.ones_like(tokens)
    if padded:
        mask[::2, -padded:] = 0
    return {"token_ids": tokens, "padding_mask": mask}


def _check_strip_and_keras_file(test, lm, qat):
    """`qat` strips to `lm`'s outputs; fitted, its .keras file (optimizer too) loads, computes the same
    and trains on."""
    batch = _lm_features(4, padded=3)
    test.assertAllClose(tfopt.strip(qat)(batch), lm(batch), atol=1e-5)
    qat.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(batch, batch["token_ids"], epochs=2, verbose=0)
    path = os.path.join(tempfile.mkdtemp(), "qat.keras")
    qat.save(path)
    loaded = keras.saving.load_model(path)
    test.assertAllClose(loaded(batch), qat(batch), atol=1e-6)
    loaded.fit(batch, batch["token_ids"], epochs=1, verbose=0)


class KerasHubDecoderQuantizationTest(testing.TestCase):

    def test_causal_lm_strips_to_the_float_model_and_round_trips_a_keras_file(self):
        lm = keras_hub.models.GPT2CausalLM(keras_hub.models.GPT2Backbone(**_GPT2))
        qat = tfopt.quantize_model(lm)
        kinds = [type(layer).__name__ for layer in qat.layers]
        self.assertIn("QuantizedTransformerDecoder", kinds)
        # The backbone is inlined: its token embedding is the head too, and Keras cannot keep a
        # layer shared between a nested model and its parent in a .keras file.
        self.assertNotIn("Functional", kinds)
        self.assertIn("logits_range_min", [w.name for w in qat.get_layer("token_embedding").weights])
        _check_strip_and_keras_file(self, lm, qat)

    def test_decoder_refuses_a_cache_and_an_encoder_sequence(self):
        tfopt.quantize_model(keras_hub.models.GPT2Backbone(**_GPT2))  # registers the twins
        from tfopt.adapters import keras_hub_quantization

        block = keras_hub_quantization.QuantizedTransformerDecoder(
            intermediate_dim=8, num_heads=2, quantization_aware="int8")
        x = np.zeros((1, 4, 8), "float32")
        block(x)
        with self.assertRaisesRegex(ValueError, "computes whole sequences.*Fix: generate"):
            block(x, self_attention_cache=np.zeros((1, 2, 4, 2, 4), "float32"), self_attention_cache_update_index=0)

    def test_encoder_decoder_block_stays_float_with_a_warning(self):
        decoder_in, encoder_in = keras.Input((4, 8)), keras.Input((6, 8))
        x = keras_hub.layers.TransformerDecoder(intermediate_dim=8, num_heads=2, name="cross")(decoder_in, encoder_in)
        model = keras.Model([decoder_in, encoder_in], keras.layers.Dense(3)(x))
        with self.assertWarnsRegex(UserWarning, "cross-attention"):
            qat = tfopt.quantize_model(model, unsupported="float")
        self.assertEqual(type(qat.get_layer("cross")).__name__, "TransformerDecoder")


_LLAMA = dict(vocabulary_size=17, num_layers=2, num_query_heads=2, num_key_value_heads=1, hidden_dim=16,
              intermediate_dim=32, dropout=0.0)


class KerasHubLlamaQuantizationTest(testing.TestCase):
    """keras-hub's Llama and Mistral decoders (RMS norms, grouped-query attention with rotary
    position embeddings, SwiGLU feed-forward): their int8 rows are in tests/test_int8_coverage.py."""

    def test_causal_lm_strips_to_the_float_model_and_round_trips_a_keras_file(self):
        lm = keras_hub.models.LlamaCausalLM(keras_hub.models.LlamaBackbone(**_LLAMA))
        qat = tfopt.quantize_model(lm)
        kinds = [type(layer).__name__ for layer in qat.layers]
        self.assertEqual(kinds.count("QuantizedLlamaDecoder"), 2)
        self.assertIsInstance(qat.get_layer("sequence_output_layernorm"), QuantizingLayer)
        _check_strip_and_keras_file(self, lm, qat)

    def test_quantization_aware_block_computes_what_the_float_block_computes(self):
        # Rotary embeddings, repeated key/value heads, the RMS norms and Mistral's sliding window
        # as keras-hub computes them: once the first batch has set the ranges, the fake-quantized
        # logits are close (a wrong rotation, head order or band is off by the logits' size).
        small = {**_LLAMA, "num_layers": 1}
        models = {
            "llama, 1 key/value head": lambda: keras_hub.models.LlamaCausalLM(keras_hub.models.LlamaBackbone(**small)),
            "llama, 2 key/value heads": lambda: keras_hub.models.LlamaCausalLM(
                keras_hub.models.LlamaBackbone(**{**small, "num_key_value_heads": 2})),
            "mistral, window 4": lambda: keras_hub.models.MistralCausalLM(
                keras_hub.models.MistralBackbone(**small, sliding_window=4)),
        }
        for name, build in models.items():
            lm = build()
            qat = tfopt.quantize_model(lm)
            self.assertEqual(type(qat.get_layer("transformer_layer_0")).__name__,
                             f"Quantized{name.split(',')[0].title()}Decoder")
            batch = _lm_features(8, padded=3)
            self.assertAllClose(tfopt.strip(qat)(batch), lm(batch), atol=1e-5)
            qat(batch, training=True)
            expected = keras.ops.convert_to_numpy(lm(batch))
            got = keras.ops.convert_to_numpy(qat(batch))
            self.assertLess(np.abs(got - expected).max(), 0.05 * np.abs(expected).max(), name)
            self.assertGreater((got.argmax(-1) == expected.argmax(-1)).mean(), 0.9, name)

    def test_block_refuses_a_cache_and_positions_beyond_its_rotary_tables(self):
        from tfopt.adapters import keras_hub_quantization

        lm = keras_hub.models.LlamaCausalLM(keras_hub.models.LlamaBackbone(**_LLAMA))
        block = tfopt.quantize_model(lm).get_layer("transformer_layer_0")
        x = np.zeros((1, 4, 16), "float32")
        with self.assertRaisesRegex(ValueError, "computes whole sequences.*Fix: generate"):
            block(x, self_attention_cache=np.zeros((1, 2, 4, 1, 8), "float32"), self_attention_cache_update_index=0)
        too_long = np.zeros((1, keras_hub_quantization.ROTARY_POSITIONS + 1, 16), "float32")
        with self.assertRaisesRegex(ValueError, "rotary tables for 1024 positions.*ROTARY_POSITIONS"):
            block(too_long)
