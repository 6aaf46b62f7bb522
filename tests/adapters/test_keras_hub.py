"""tfopt.shrink of keras-hub transformers: blocks, feed-forward units and heads removed, exactly,
into the same keras-hub class (saved and loaded without tfopt's classes)."""

import json
import os
import tempfile
import zipfile

import keras
import numpy as np
import pytest

import tfopt
from tfopt import testing

keras_hub = pytest.importorskip("keras_hub")
M = keras_hub.models if keras_hub else None

_SMALL = dict(vocabulary_size=64, num_layers=4, hidden_dim=32, intermediate_dim=64)
_GQA = dict(num_query_heads=4, num_key_value_heads=2)


def _causal_lms():
    """One tiny causal LM per architecture, built from configs (nothing downloaded)."""
    keras.utils.set_random_seed(1)
    return {
        "gpt2": M.GPT2CausalLM(M.GPT2Backbone(num_heads=2, max_sequence_length=16, dropout=0.0, **_SMALL)),
        "llama": M.LlamaCausalLM(M.LlamaBackbone(**_GQA, **_SMALL)),
        "mistral": M.MistralCausalLM(M.MistralBackbone(**_GQA, **_SMALL)),
        "gemma": M.GemmaCausalLM(M.GemmaBackbone(head_dim=8, **_GQA, **_SMALL)),
    }


def _tokens(seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((4, 16), "int32")
    mask[0, 11:] = 0  # a padded sequence: its padding counts for no score
    return {"token_ids": rng.integers(1, 64, (4, 16)).astype("int32"), "padding_mask": mask}


def _skipped(lm, batch, removed):
    """`lm`'s logits with the blocks `removed` skipped, run layer by layer here."""
    backbone = lm.backbone
    blocks = backbone.transformer_layers
    first = blocks[0].input[0]
    hidden = keras.Model(backbone.input, first)(batch)
    for i, block in enumerate(blocks):
        if i not in removed:
            keyword = "padding_mask" if type(block).__name__ == "GemmaDecoderBlock" else "decoder_padding_mask"
            hidden = block(hidden, **{keyword: batch["padding_mask"]})
    hidden = backbone.layers[-1](hidden)  # the final norm
    return keras.ops.convert_to_numpy(backbone.token_embedding(hidden, reverse=True))


def _logits(lm, batch):
    return keras.ops.convert_to_numpy(lm(batch))


def _make_identity(lm, index):
    """Zero block `index`'s attention and feed-forward output projections: a pre-norm block then
    passes its input through unchanged (its hidden state turns by nothing)."""
    block = lm.backbone.transformer_layers[index]
    for v in block.weights:
        parent = v.path.split("/")[-2]
        if parent in ("attention_output", "feedforward_output_dense", "ffw_linear"):
            v.assign(np.zeros(v.shape, v.dtype))


class KerasHubShrinkTest(testing.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.lms = _causal_lms()
        cls.batch = _tokens()

    def check_depth(self, name):
        lm = self.lms[name]
        plan = tfopt.plan_shrink(lm, depth=2, data=self.batch)
        self.assertEqual(len(plan.removed_blocks), 2)
        self.assertEqual(sorted(np.argsort(plan.block_scores, kind="stable")[:2].tolist()), plan.removed_blocks)
        small = plan.apply()
        self.assertIs(type(small), type(lm))
        self.assertEqual(small.backbone.num_layers, 2)
        self.assertLess(small.count_params(), lm.count_params())
        self.assertAllClose(_logits(small, self.batch), _skipped(lm, self.batch, plan.removed_blocks), atol=1e-5)

    def check_width(self, name, data):
        lm = self.lms[name]
        plan = tfopt.plan_shrink(lm, 0.25, data=self.batch if data else None)
        small = plan.apply()
        self.assertIs(type(small), type(lm))
        per_dim = 2 if name == "gemma" else 1  # Gemma's intermediate_dim counts its gate and up units
        self.assertEqual(small.backbone.intermediate_dim, (64 // per_dim) * 3 // 4 * per_dim)
        self.assertEqual(small.backbone.num_layers, 4)
        masked = _logits(plan.masked(), self.batch)
        self.assertGreater(np.abs(masked - _logits(lm, self.batch)).max(), 1e-4)  # something was removed
        self.assertAllClose(_logits(small, self.batch), masked, atol=1e-5)

    def test_gpt2_depth(self):
        self.check_depth("gpt2")

    def test_llama_depth(self):
        self.check_depth("llama")

    def test_mistral_depth(self):
        self.check_depth("mistral")

    def test_gemma_depth(self):
        self.check_depth("gemma")

    def test_gpt2_width_from_data(self):
        self.check_width("gpt2", data=True)

    def test_llama_width_from_data(self):
        self.check_width("llama", data=True)

    def test_mistral_width_from_weights(self):
        self.check_width("mistral", data=False)

    def test_gemma_width_from_data(self):
        self.check_width("gemma", data=True)

    def test_mistral_and_gemma_heads_whole_key_value_groups(self):
        for name in ("mistral", "gemma"):
            lm = self.lms[name]
            plan = tfopt.plan_shrink(lm, heads=1)
            small = plan.apply()
            config = small.backbone.get_config()
            self.assertEqual((config["num_query_heads"], config["num_key_value_heads"], config["head_dim"]),
                             (2, 1, 8), name)
            self.assertAllClose(_logits(small, self.batch), _logits(plan.masked(), self.batch), atol=1e-5)

    def test_the_block_that_changes_nothing_goes_first(self):
        keras.utils.set_random_seed(2)
        lm = M.LlamaCausalLM(M.LlamaBackbone(**_GQA, **_SMALL))
        _make_identity(lm, 2)
        plan = tfopt.plan_shrink(lm, depth=1, data=self.batch)
        self.assertEqual(plan.removed_blocks, [2])
        self.assertAllClose(plan.block_scores[2], 0.0, atol=1e-6)
        # An identity block removed: the shrunk model computes exactly what the model computes.
        self.assertAllClose(_logits(plan.apply(), self.batch), _logits(lm, self.batch), atol=1e-5)

    def test_units_scored_by_activation_with_data_by_weights_without(self):
        keras.utils.set_random_seed(3)
        backbone = M.GPT2Backbone(num_heads=2, max_sequence_length=16, dropout=0.0, **_SMALL)
        quiet = np.arange(8)  # units that never fire (gelu(-20) = 0) but whose weights are large
        for block in backbone.transformer_layers:
            up = block.weights[[v.path.split("/")[-2:] for v in block.weights].index(
                ["feedforward_intermediate_dense", "kernel"])]
            bias = block.weights[[v.path.split("/")[-2:] for v in block.weights].index(
                ["feedforward_intermediate_dense", "bias"])]
            value, b = up.numpy(), bias.numpy()
            value[:, quiet] = 0.0
            b[quiet] = -20.0
            up.assign(value)
            bias.assign(b)
        from_data = tfopt.plan_shrink(backbone, 0.125, data=self.batch)
        from_weights = tfopt.plan_shrink(backbone, 0.125)
        for i in range(4):
            self.assertEqual(np.flatnonzero(~from_data._unit_keep[i]).tolist(), quiet.tolist())
            self.assertFalse(set(np.flatnonzero(~from_weights._unit_keep[i])) >= set(quiet.tolist()))

    def test_bert_backbone_depth_and_width(self):
        keras.utils.set_random_seed(4)
        bert = M.BertBackbone(num_heads=2, max_sequence_length=16, dropout=0.0, **_SMALL)
        batch = dict(self.batch, segment_ids=np.zeros((4, 16), "int32"))
        plan = tfopt.plan_shrink(bert, 0.5, data=batch)
        small = plan.apply()
        self.assertIs(type(small), M.BertBackbone)
        self.assertEqual(small.intermediate_dim, 32)
        out, masked = small(batch), plan.masked()(batch)
        self.assertEqual(set(out), {"sequence_output", "pooled_output"})
        for key in out:
            self.assertAllClose(out[key], masked[key], atol=1e-5)
        self.assertEqual(tfopt.shrink(bert, depth=0.5, data=batch).num_layers, 2)
        self.assertEqual(tfopt.shrink(bert, depth=0.99, data=batch).num_layers, 1)  # a share keeps one block

    def test_saved_and_loaded_as_the_keras_hub_class_tied_embeddings_included(self):
        for name in ("gpt2", "gemma"):  # tied ReversibleEmbedding, and Gemma's halved intermediate_dim
            lm = self.lms[name]
            small = tfopt.shrink(lm, 0.5, depth=1, data=self.batch)
            embedding = small.backbone.token_embedding
            self.assertTrue(embedding.tie_weights)
            self.assertEqual(len(embedding.weights), 1)
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "small.keras")
                small.save(path)
                with zipfile.ZipFile(path) as archive:
                    config = archive.read("config.json").decode()
                self.assertNotIn("tfopt", config)
                self.assertEqual(json.loads(config)["class_name"], type(lm).__name__)
                loaded = keras.saving.load_model(path)
            self.assertIs(type(loaded), type(lm))
            self.assertAllClose(_logits(loaded, self.batch), _logits(small, self.batch), atol=1e-6)
            self.assertEqual(set(small.input), set(lm.input))

    def test_calibration_batches_in_any_of_their_forms(self):
        lm = self.lms["gpt2"]
        ids = self.batch["token_ids"]
        as_array = tfopt.plan_shrink(lm, depth=1, data=ids)
        as_list = tfopt.plan_shrink(lm, depth=1, data=[{"token_ids": ids}, (dict(token_ids=ids), ids[:, 1:])])
        self.assertAllClose(as_array.block_scores, as_list.block_scores, atol=1e-6)

    def test_the_original_is_untouched(self):
        lm = self.lms["llama"]
        before = [w.copy() for w in lm.get_weights()]
        block = lm.backbone.transformer_layers[0]
        attributes = dict(vars(block))  # the recording stand-ins are gone again
        tfopt.shrink(lm, 0.5, depth=1, data=self.batch)
        self.assertEqual({k: id(v) for k, v in vars(block).items()}, {k: id(v) for k, v in attributes.items()})
        for a, b in zip(before, lm.get_weights()):
            np.testing.assert_array_equal(a, b)
