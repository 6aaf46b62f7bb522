"""tfopt.shrink of keras-hub transformers: blocks, feed-forward units and heads removed, exactly,
into the same keras-hub class (saved and loaded without tfopt's classes); hidden channels removed,
exactly where they carried nothing under RMSNorm, closely under LayerNorm."""

import json
import os
import tempfile
import warnings
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


_DEAD = [1, 6, 7, 12, 17, 20, 25, 30]  # residual-stream channels made to carry nothing
_DEAD_HEAD_DIMS = np.arange(12, 16)  # GPT-2/BERT: the head dimensions made to contribute nothing


def _kill_channels(backbone, channels, head_dims=None):
    """Makes residual-stream `channels` carry nothing: nothing writes them (embedding columns, attention
    and feed-forward output columns) and every norm outputs zero there (Gemma's scale -1: 1 + scale = 0).
    With `head_dims`, those dimensions of every head are zero in the query, key, value and output too."""
    for v in backbone.weights:
        parent, name = v.path.split("/")[-2:]
        value = keras.ops.convert_to_numpy(v).copy()
        if name == "embeddings":
            value[:, channels] = 0.0
        elif parent in ("attention_output", "feedforward_output_dense", "ffw_linear"):
            value[..., channels] = 0.0
            if head_dims is not None and parent == "attention_output" and name == "kernel":
                value[:, head_dims] = 0.0
        elif value.ndim == 1 and "norm" in parent:
            gemma = type(backbone).__name__ == "GemmaBackbone"
            value[channels] = -1.0 if gemma and name == "scale" else 0.0
        elif head_dims is not None and parent in ("query", "key", "value"):
            value[..., head_dims] = 0.0
        v.assign(value)


def _dead_models():
    """GPT-2, BERT, Mistral and Gemma with `_DEAD` channels (and, where the head size follows hidden_dim,
    `_DEAD_HEAD_DIMS`) carrying nothing."""
    keras.utils.set_random_seed(5)
    models = {
        "gpt2": M.GPT2CausalLM(M.GPT2Backbone(num_heads=2, max_sequence_length=16, dropout=0.0, **_SMALL)),
        "bert": M.BertBackbone(num_heads=2, max_sequence_length=16, dropout=0.0, **_SMALL),
        "mistral": M.MistralCausalLM(M.MistralBackbone(**_GQA, **_SMALL)),
        "gemma": M.GemmaCausalLM(M.GemmaBackbone(head_dim=8, **_GQA, **_SMALL)),
    }
    for name, model in models.items():
        _kill_channels(getattr(model, "backbone", model), _DEAD, _DEAD_HEAD_DIMS if name in ("gpt2", "bert") else None)
    return models


def _outputs(model, batch, keep=None):
    """Logits of a causal LM, or a BERT backbone's sequence output (its channels `keep` only)."""
    if isinstance(model, M.BertBackbone):
        out = keras.ops.convert_to_numpy(model(dict(batch, segment_ids=np.zeros_like(batch["token_ids"])))
                                         ["sequence_output"])
        return out if keep is None else out[..., keep]
    return _logits(model, batch)


class KerasHubShrinkTest(testing.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.lms = _causal_lms()
        cls.batch = _tokens()
        cls.dead = _dead_models()

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
            self.check_round_trip(small, lm)

    def check_round_trip(self, small, model):
        """`small` saves as `.keras` and loads with no custom objects as `model`'s keras-hub class,
        computing what it computed (a tied embedding still tied)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "small.keras")
            small.save(path)
            with zipfile.ZipFile(path) as archive:
                config = archive.read("config.json").decode()
            self.assertNotIn("tfopt", config)
            self.assertEqual(json.loads(config)["class_name"], type(model).__name__)
            loaded = keras.saving.load_model(path)
        self.assertIs(type(loaded), type(model))
        self.assertAllClose(_outputs(loaded, self.batch), _outputs(small, self.batch), atol=1e-6)
        self.assertEqual(set(small.input), set(model.input))
        backbone, loaded_backbone = getattr(small, "backbone", small), getattr(loaded, "backbone", loaded)
        self.assertEqual(loaded_backbone.token_embedding.tie_weights, backbone.token_embedding.tie_weights)
        self.assertEqual(len(loaded_backbone.token_embedding.weights), len(backbone.token_embedding.weights))
        return loaded

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
        attention = block._self_attention_layer
        attributes = dict(vars(block))  # the recording stand-ins are gone again
        layers = lambda owner: {k: id(v) for k, v in vars(owner).items() if isinstance(v, keras.layers.Layer)}
        attention_layers = layers(attention)  # its output projection was recorded: it is back too
        tfopt.shrink(lm, 0.5, depth=1, data=self.batch)
        self.assertEqual({k: id(v) for k, v in vars(block).items()}, {k: id(v) for k, v in attributes.items()})
        self.assertEqual(layers(attention), attention_layers)
        for a, b in zip(before, lm.get_weights()):
            np.testing.assert_array_equal(a, b)

    def check_hidden(self, name, atol=None, correlation=None):
        """The dead channels (and head dimensions) are the ones `hidden=0.25` removes, scored from data and
        from weights alike; the result is the same class with hidden_dim 24, and computes what the model
        computes: within `atol`, or (LayerNorm over a stream whose mean is not zero) with `correlation`."""
        model = self.dead[name]
        backbone = getattr(model, "backbone", model)
        for data in (self.batch, None):
            plan = tfopt.plan_shrink(model, hidden=0.25, data=data)
            self.assertEqual(plan.removed_channels, _DEAD, data is not None)
            self.assertEqual(plan.removed[backbone.name], {"hidden": (32, 24)})
        small = plan.apply()
        self.assertIs(type(small), type(model))
        small_backbone = getattr(small, "backbone", small)
        self.assertEqual(small_backbone.hidden_dim, 24)
        self.assertLess(small.count_params(), model.count_params())
        keep = np.ones(32, bool)
        keep[_DEAD] = False
        before, after = _outputs(model, self.batch, keep), _outputs(small, self.batch)
        self.assertEqual(before.shape, after.shape)
        if atol is not None:
            self.assertAllClose(after, before, atol=atol)
            self.assertAllClose(after, _outputs(plan.masked(), self.batch, keep), atol=atol)
        if correlation is not None:
            self.assertGreater(np.corrcoef(before.ravel(), after.ravel())[0, 1], correlation)
        return plan, small

    def test_gpt2_hidden_heads_lose_the_dead_dimensions(self):
        plan, small = self.check_hidden("gpt2", correlation=0.99)
        self.assertEqual(plan.removed["transformer_layer_0"], {"head_size": (16, 12)})
        for query_key, value_output in plan._head_dim_keep:
            for keep in (query_key, value_output):
                self.assertEqual([np.flatnonzero(~k).tolist() for k in keep], [_DEAD_HEAD_DIMS.tolist()] * 2)
        self.assertEqual(small.backbone.get_config()["num_heads"], 2)
        self.check_round_trip(small, self.dead["gpt2"])

    def test_bert_backbone_hidden(self):
        # Post-norm: every block's output is centred by its LayerNorm, so the dead channels' zeros move no mean.
        _, small = self.check_hidden("bert", atol=5e-3)
        self.assertEqual(small.get_config()["num_heads"], 2)
        self.check_round_trip(small, self.dead["bert"])

    def test_mistral_hidden(self):
        _, small = self.check_hidden("mistral", atol=1e-5)
        self.assertEqual(small.backbone.get_config()["head_dim"], 8)  # was None: hidden_dim // num_query_heads
        self.assertFalse(small.backbone.token_embedding.tie_weights)  # its untied LM head loses the channels too
        self.check_round_trip(small, self.dead["mistral"])

    def test_gemma_hidden(self):
        # Gemma multiplies the embedding by sqrt(hidden_dim) and ties its LM head: both compensated.
        _, small = self.check_hidden("gemma", atol=1e-5)
        self.assertTrue(small.backbone.token_embedding.tie_weights)
        self.check_round_trip(small, self.dead["gemma"])

    def test_llama_hidden_is_refused_for_its_rotary_embedding(self):
        with self.assertRaisesRegex(ValueError, r"hidden=0.25.*LlamaBackbone derives the head size.*rotary.*"
                                                r"Fix: leave hidden=None"):
            tfopt.plan_shrink(self.lms["llama"], hidden=0.25)

    def test_hidden_with_units_heads_and_depth_in_one_plan(self):
        for name in ("mistral", "gemma"):
            lm = self.lms[name]
            small = tfopt.shrink(lm, 0.5, heads=0.5, hidden=0.25, depth=1, data=self.batch)
            config = small.backbone.get_config()
            self.assertEqual((config["num_layers"], config["hidden_dim"], config["intermediate_dim"],
                              config["num_query_heads"], config["num_key_value_heads"], config["head_dim"]),
                             (3, 24, 32, 2, 1, 8), name)
            self.assertTrue(np.isfinite(_logits(small, self.batch)).all())
            # The same cuts without removing a block: what the masked model computes (RMSNorm compensated).
            plan = tfopt.plan_shrink(lm, 0.5, heads=0.5, hidden=0.25, data=self.batch)
            self.assertAllClose(_logits(plan.apply(), self.batch), _logits(plan.masked(), self.batch), atol=1e-5)
        small = tfopt.shrink(self.lms["gpt2"], 0.5, hidden=0.25, depth=1, data=self.batch)
        self.assertEqual((small.backbone.num_layers, small.backbone.hidden_dim, small.backbone.intermediate_dim),
                         (3, 24, 32))
        with self.assertRaisesRegex(ValueError, "heads=0.5.*GPT2Backbone derives the head size"):
            tfopt.shrink(self.lms["gpt2"], 0.5, heads=0.5, hidden=0.25, data=self.batch)

    def test_hidden_counts_for_gpt2_are_multiples_of_its_heads(self):
        lm = self.lms["gpt2"]
        self.assertEqual(tfopt.plan_shrink(lm, hidden=4).removed["gpt2_backbone"], {"hidden": (32, 28)})
        self.assertEqual(tfopt.plan_shrink(lm, hidden=0.2).removed["gpt2_backbone"], {"hidden": (32, 26)})
        with self.assertRaisesRegex(ValueError, r"hidden=3\).*multiple of 2.*Received: hidden=3\. Fix"):
            tfopt.plan_shrink(lm, hidden=3)
        with self.assertLogs("tfopt", "WARNING") as logs:  # a share that rounds to no channel says so
            self.assertEqual(tfopt.plan_shrink(lm, 0.25, hidden=0.02).removed_channels, [])
        self.assertIn("removes no channel", logs.output[0])

    def test_hidden_exports_to_litert(self):
        for name in ("gpt2", "bert", "mistral", "gemma"):
            small = tfopt.shrink(self.dead[name], hidden=0.25, data=self.batch)
            batch = dict(self.batch, segment_ids=np.zeros((4, 16), "int32")) if name == "bert" else self.batch
            with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
                # Mistral and Gemma convert at the fixed shapes of `inputs` (tfopt.export warns why).
                warnings.simplefilter("ignore")
                path = os.path.join(tmp, "small.tflite")
                report = tfopt.export(small, path, inputs=batch)
                self.assertGreater(os.path.getsize(path), 0)
            self.assertLess(report.max_abs_diff, 1e-4, name)

    def test_heads_scored_by_their_context_with_data_by_weights_without(self):
        keras.utils.set_random_seed(6)
        lm = M.MistralCausalLM(M.MistralBackbone(**_GQA, **_SMALL))
        for block in lm.backbone.transformer_layers:  # group 0 (query heads 0, 1; key-value head 0): large but quiet
            for v in block.weights:
                parent = v.path.split("/")[-2]
                value = v.numpy()
                if parent == "query":  # (hidden, query heads, head size)
                    value[:, :2] *= 10.0
                elif parent == "key":  # (hidden, key-value heads, head size)
                    value[:, 0] *= 10.0
                elif parent == "value":
                    value[:, 0] *= 1e-3
                elif parent == "attention_output":  # (query heads, head size, hidden)
                    value[:2] *= 10.0
                v.assign(value)
        from_data = tfopt.plan_shrink(lm, heads=1, data=self.batch)
        from_weights = tfopt.plan_shrink(lm, heads=1)
        for i in range(4):
            self.assertEqual(from_data._head_keep[i].tolist(), [False, False, True, True])
            self.assertEqual(from_weights._head_keep[i].tolist(), [True, True, False, False])
        self.assertAllClose(_logits(from_data.apply(), self.batch), _logits(from_data.masked(), self.batch), atol=1e-5)

    def test_a_frozen_teacher_gives_a_trainable_student(self):
        keras.utils.set_random_seed(7)
        teacher = M.MistralCausalLM(M.MistralBackbone(**_GQA, **_SMALL))
        teacher.trainable = False  # as for distillation
        student = tfopt.shrink(teacher, 0.5, hidden=0.25, data=self.batch)
        self.assertTrue(student.trainable)
        self.assertEqual(len(student.trainable_weights), len(student.weights))
        self.assertFalse(teacher.trainable)
