"""keras-hub models seen inside by tfopt's reporting and pruning: multiply-adds of their transformer
blocks counted by hand, WidthPruning of feed-forward units and key-value head groups during `fit`,
magnitude pruning of the blocks' nested kernels."""

import os
import tempfile

import keras
import numpy as np
import pytest

import tfopt
from tfopt import testing

keras_hub = pytest.importorskip("keras_hub")
M = keras_hub.models if keras_hub else None

_SMALL = dict(vocabulary_size=64, num_layers=2, hidden_dim=32, intermediate_dim=64)
_GQA = dict(num_query_heads=4, num_key_value_heads=2)
T = 8  # the sequence length counted


def _gpt2():
    return M.GPT2CausalLM(M.GPT2Backbone(num_heads=2, max_sequence_length=16, dropout=0.0, **_SMALL))


def _mistral():
    return M.MistralCausalLM(M.MistralBackbone(**_GQA, **_SMALL))


def _gemma():  # Gemma's intermediate_dim counts gate and up: 64 units, as the others
    return M.GemmaCausalLM(M.GemmaBackbone(head_dim=8, **_GQA, **dict(_SMALL, intermediate_dim=128)))


class KerasHubMacsTest(testing.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        keras.utils.set_random_seed(1)
        cls.lms = {"gpt2": _gpt2(), "mistral": _mistral(), "gemma": _gemma()}

    def test_gpt2_counted_by_hand(self):
        # Per block: q, k, v, o 32x32 each; scores 2 heads x 16 x T^2 x 2; FFN 32x64 twice; 2 LayerNorms.
        block = T * 4 * 32 * 32 + 2 * 16 * T * T * 2 + T * 2 * 32 * 64 + T * 2 * 32
        counts = tfopt.reporting.macs(self.lms["gpt2"], sequence_length=T)
        self.assertEqual(counts["transformer_layer_0"], block)
        self.assertEqual(counts["transformer_layer_1"], block)
        self.assertEqual(counts["position_embedding"], 0)  # a lookup
        self.assertEqual(counts["token_embedding"], T * 32 * 64)  # the lookup 0, the tied head hidden x vocab
        self.assertEqual(counts["layer_norm"], T * 32)
        self.assertEqual(tfopt.reporting.total_macs(counts), 2 * block + T * 32 + T * 32 * 64)

    def test_grouped_query_attention_counted_by_hand(self):
        # Mistral and Gemma alike: q 32x(4x8), k and v 32x(2x8) (two key-value heads), o (4x8)x32;
        # scores 4 heads x 8 x T^2 x 2; a gated FFN: three 32x64 kernels; two RMS norms.
        block = T * (1024 + 512 + 512 + 1024) + 4 * 8 * T * T * 2 + T * 3 * 32 * 64 + T * 2 * 32
        for name, first in (("mistral", "transformer_layer_0"), ("gemma", "decoder_block_0")):
            with self.subTest(name):
                counts = tfopt.reporting.macs(self.lms[name], sequence_length=T)
                self.assertEqual(counts[first], block)
                self.assertEqual(tfopt.reporting.total_macs(counts), 2 * block + T * 32 + T * 32 * 64)

    def test_the_attention_scores_grow_with_the_square_of_the_length(self):
        lm = self.lms["mistral"]
        short, long = (tfopt.reporting.macs(lm, sequence_length=n)["transformer_layer_0"] for n in (T, 2 * T))
        self.assertEqual(long - 2 * short, 4 * 8 * 2 * (4 * T * T - 2 * T * T))

    def test_shrink_removes_the_expected_multiply_adds(self):
        for name, kernels in (("gpt2", 2), ("mistral", 3), ("gemma", 3)):
            with self.subTest(name):
                lm = self.lms[name]
                before = tfopt.reporting.total_macs(tfopt.reporting.macs(lm, sequence_length=T))
                after = tfopt.reporting.total_macs(tfopt.reporting.macs(tfopt.shrink(lm, 0.5), sequence_length=T))
                self.assertEqual(before - after, 2 * T * kernels * 32 * 32)  # 32 of 64 units, in 2 blocks

    def test_shrink_of_heads_removes_their_projections_and_scores(self):
        lm = self.lms["mistral"]
        before = tfopt.reporting.macs(lm, sequence_length=T)["transformer_layer_0"]
        after = tfopt.reporting.macs(tfopt.shrink(lm, heads=1), sequence_length=T)["transformer_layer_0"]
        # One key-value group of two: 2 query heads, 1 key and 1 value head of 8, and their scores.
        self.assertEqual(before - after, T * (2 * 8 * 32 * 2 + 8 * 32 * 2) + 2 * 8 * T * T * 2)

    def test_summary_counts_the_blocks_sublayers_on_their_rows(self):
        lines = []
        rows = tfopt.summary(self.lms["gpt2"], print_fn=lines.append, sequence_length=T)
        total = tfopt.reporting.total_macs(tfopt.reporting.macs(self.lms["gpt2"], sequence_length=T))
        self.assertEqual(rows[-1]["macs"], total)
        query = [r for r in rows if r["layer"] == "query"]
        self.assertEqual([r["macs"] for r in query], [T * 32 * 32] * 2)
        self.assertNotIn("unknown", lines[0])

    def test_without_a_length_the_note_says_how_to_count(self):
        lines = []
        rows = tfopt.summary(self.lms["gpt2"], print_fn=lines.append)
        self.assertEqual(rows[-1]["macs"], 0)  # the lookups: the rest needs a length
        self.assertIn("open sequence axis", lines[0])
        self.assertIn("sequence_length=128", lines[0])
        self.assertIsNone(tfopt.reporting.macs(self.lms["gpt2"])["transformer_layer_0"])

    def test_a_bad_length_is_refused(self):
        with self.assertRaisesRegex(ValueError, r"Received: sequence_length=0\. Fix: e\.g\. sequence_length=128"):
            tfopt.reporting.macs(self.lms["gpt2"], sequence_length=0)


def _data(seed=0):
    """8 sequences of T token ids, next-token targets: x and y for a causal LM's `fit`."""
    ids = np.random.default_rng(seed).integers(1, 64, (8, T + 1)).astype("int32")
    return {"token_ids": ids[:, :-1], "padding_mask": np.ones((8, T), "int32")}, ids[:, 1:]


def _fit(lm, callback):
    x, y = _data()
    lm.compile(optimizer=keras.optimizers.Adam(1e-3),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    lm.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[callback])  # 2 steps
    return x


def _zero_slices(value, axis):
    """Indices along `axis` whose slices are all zero."""
    moved = np.moveaxis(value, axis, 0).reshape(value.shape[axis], -1)
    return np.flatnonzero(~moved.any(axis=1)).tolist()


def _value(variable):
    return keras.ops.convert_to_numpy(variable)


class KerasHubWidthPruningTest(testing.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        keras.utils.set_random_seed(2)
        cls.lm = _mistral()
        schedule = tfopt.schedules.ConstantSparsity(0.5, begin_step=0, frequency=1)
        cls.x = _fit(cls.lm, tfopt.callbacks.WidthPruning(schedule))
        cls.rows = tfopt.summary(cls.lm, print_fn=None)  # before a test strips the masks (in place)

    def test_whole_units_and_key_value_groups_are_zeroed_in_every_block(self):
        for block in self.lm.backbone.transformer_layers:
            weights = {v.path.split("/")[-2]: _value(v) for v in block.weights if v.name == "kernel"}
            units = _zero_slices(weights["feedforward_intermediate_dense"], 1)
            self.assertEqual(len(units), 32)  # half of 64
            self.assertEqual(_zero_slices(weights["feedforward_gate_dense"], 1), units)
            self.assertEqual(_zero_slices(weights["feedforward_output_dense"], 0), units)
            groups = _zero_slices(weights["key"], 1)
            self.assertEqual(len(groups), 1)  # one of two key-value heads
            self.assertEqual(_zero_slices(weights["value"], 1), groups)
            queries = [2 * groups[0], 2 * groups[0] + 1]  # the group's two query heads
            self.assertEqual(_zero_slices(weights["query"], 1), queries)
            self.assertEqual(_zero_slices(weights["attention_output"], 0), queries)

    def test_shrink_removes_them_and_computes_what_the_pruned_model_computes(self):
        stripped = tfopt.strip(self.lm)  # in place: a keras-hub model keeps its class
        self.assertIs(stripped, self.lm)
        small = tfopt.shrink(stripped)  # no fraction: what pruning zeroed
        self.assertIs(type(small), type(self.lm))
        self.assertEqual((small.backbone.intermediate_dim, small.backbone.num_key_value_heads), (32, 1))
        self.assertAllClose(_value(small(self.x)), _value(self.lm(self.x)), atol=1e-5)
        # The same units and group score lowest when asked by share.
        self.assertAllClose(_value(tfopt.shrink(self.lm, 0.5, heads=1)(self.x)), _value(small(self.x)), atol=1e-6)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "lm.keras")
            self.lm.save(path)
            loaded = keras.saving.load_model(path)
        self.assertIs(type(loaded), type(self.lm))
        self.assertAllClose(_value(loaded(self.x)), _value(self.lm(self.x)), atol=1e-6)

    def test_shrink_without_a_share_refuses_blocks_pruned_unevenly(self):
        lm = _mistral()
        lm.set_weights(self.lm.get_weights())
        down = [v for v in lm.backbone.transformer_layers[0].weights
                if v.path.endswith("feedforward_output_dense/kernel")][0]
        up = [v for v in lm.backbone.transformer_layers[0].weights if "feedforward_" in v.path
              and not v.path.endswith("feedforward_output_dense/kernel")]
        alive = np.flatnonzero(_value(down).any(axis=1))[0]
        for v in [down] + up:  # one more unit zeroed in block 0 only
            value = _value(v).copy()
            np.moveaxis(value, 0 if v is down else value.ndim - 1, 0)[alive] = 0
            v.assign(value)
        with self.assertRaisesRegex(ValueError, r"its blocks have \[33, 32\] feed-forward units zeroed"):
            tfopt.shrink(lm)

    def test_summary_names_the_structure(self):
        structures = {r["layer"]: r["structure"] for r in self.rows}
        self.assertEqual(structures["feedforward_gate_dense"], "width (channel groups)")
        self.assertEqual(structures["key"], "width (channel groups)")


class KerasHubPruningTest(testing.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        keras.utils.set_random_seed(3)
        cls.lm = _gpt2()
        with pytest.warns(UserWarning, match="position_embedding"):  # its table: no kernel, named
            cls.x = _fit(cls.lm, tfopt.callbacks.Pruning(
                tfopt.schedules.ConstantSparsity(0.75, begin_step=0, frequency=1)))

    def test_the_blocks_nested_kernels_reach_the_sparsity(self):
        kernels = [v for block in self.lm.backbone.transformer_layers for v in block.weights if v.name == "kernel"]
        self.assertEqual(len(kernels), 12)  # q, k, v, o, up, down in 2 blocks
        for v in kernels:
            self.assertAlmostEqual(float(np.mean(_value(v) == 0)), 0.75, places=6, msg=v.path)
        self.assertAlmostEqual(tfopt.reporting.overall_sparsity(self.lm), 0.75, places=6)

    def test_saved_and_loaded_as_the_keras_hub_class_with_its_zeros(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "lm.keras")
            self.lm.save(path)
            loaded = keras.saving.load_model(path)
        self.assertIs(type(loaded), type(self.lm))
        query = loaded.backbone.transformer_layers[0].weights[0]
        self.assertAlmostEqual(float(np.mean(_value(query) == 0)), 0.75, places=6)
        self.assertAllClose(_value(loaded(self.x)), _value(self.lm(self.x)), atol=1e-6)


class KerasHubGradualWidthPruningTest(testing.TestCase):
    def test_gemma_prunes_gradually_and_pruned_units_stay_pruned(self):
        # Gemma's heads are on the kernels' first axis, and its feed-forward layers are EinsumDense.
        keras.utils.set_random_seed(4)
        lm = _gemma()
        schedule = tfopt.schedules.PolynomialDecay(0.0, 0.5, begin_step=0, end_step=3, power=1, frequency=1)
        x, y = _data()
        lm.compile(optimizer=keras.optimizers.Adam(1e-3),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        seen = []

        class Record(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                gating = lm.backbone.transformer_layers[0].weights
                kernel = [v for v in gating if v.path.endswith("ffw_gating/kernel")][0]
                seen.append(set(_zero_slices(_value(kernel), 1)))

        lm.fit(x, y, batch_size=2, epochs=1, verbose=0,
               callbacks=[tfopt.callbacks.WidthPruning(schedule), Record()])  # 4 steps, the ramp over 3
        counts = [len(s) for s in seen]
        self.assertEqual(counts[-1], 32)  # round(0.5 x 64)
        self.assertTrue(any(0 < n < 32 for n in counts), counts)  # on the way: 11 (1/6) or 21 (1/3)
        self.assertTrue(set(counts[:-1]) <= {0, 11, 21, 32}, counts)
        for before, after in zip(seen, seen[1:]):
            self.assertLessEqual(before, after)
        for block in lm.backbone.transformer_layers:
            weights = {v.path.split("/")[-2]: _value(v) for v in block.weights if v.name == "kernel"}
            groups = _zero_slices(weights["key"], 0)
            self.assertEqual(len(groups), 1)  # round(0.5 x 2)
            self.assertEqual(_zero_slices(weights["query"], 0), [2 * groups[0], 2 * groups[0] + 1])
            self.assertEqual(len(_zero_slices(weights["ffw_linear"], 0)), 32)
        small = tfopt.shrink(lm, 0.5, heads=1)
        self.assertEqual((small.backbone.intermediate_dim, small.backbone.num_key_value_heads), (64, 1))
        self.assertAllClose(_value(small(x)), _value(lm(x)), atol=1e-5)
