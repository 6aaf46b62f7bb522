"""Distillation of sequence models (language models): per-position KL over (batch, seq, vocab) logits.

Before, `Distiller` and `DistillationLoss` refused `(batch, seq, vocab)` outputs ("Flatten it"), and
`attach_teacher` flattened them into one softmax over `seq * vocab` values.
"""

import keras
import numpy as np
import pytest

from tfopt import distillation as D
from tfopt import testing
from tfopt.distillation import sequence as S

keras_hub = pytest.importorskip("keras_hub")

VOCAB, SEQ = 64, 16


def _lm(layers, hidden, name, seed=0):
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB, num_layers=layers, num_heads=2, hidden_dim=hidden, intermediate_dim=2 * hidden,
        max_sequence_length=SEQ, name=f"{name}_backbone")
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None, name=name)


def _data(n=64, seed=0):
    """Arithmetic sequences modulo the vocabulary (learnable: the step is in the first two tokens)."""
    rng = np.random.default_rng(seed)
    start, step = rng.integers(0, VOCAB, (n, 1)), rng.integers(1, 4, (n, 1))
    tokens = ((start + step * np.arange(SEQ + 1)) % VOCAB).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((n, SEQ), "int32")}
    return x, tokens[:, 1:]


def _mean(per_position):
    return float(np.mean(np.asarray(per_position)))


class TopKMathTest(testing.TestCase):
    """The loss math on arrays: no model."""

    def setUp(self):
        rng = np.random.default_rng(0)
        self.teacher = (3.0 * rng.standard_normal((4, 5, 11))).astype("float32")
        self.student = rng.standard_normal((4, 5, 11)).astype("float32")

    def test_top_k_with_the_whole_vocabulary_is_the_full_loss(self):
        values, indices = S.top_k_numpy(self.teacher, 11)
        for method in ("kd", "reverse_kl", "mse"):
            full = S.sequence_term(self.teacher, self.student, 2.0, method)
            top_k = S.top_k_term(values, indices, self.student, 2.0, method)
            np.testing.assert_allclose(np.asarray(top_k), np.asarray(full), atol=1e-5, err_msg=method)

    def test_distillation_loss_on_packed_targets_with_k_vocab_equals_full_kl(self):
        x = np.zeros((4, 5), "int32")
        _, y_fit = D.attach_teacher(x, self.teacher, top_k=11)  # cached outputs given as an array
        self.assertEqual(y_fit.shape, (4, 5, 2, 12))
        loss = D.DistillationLoss(temperature=2.0, alpha=0.0)
        expected = _mean(S.sequence_term(self.teacher, self.student, 2.0, "kd"))
        self.assertAllClose(float(loss(y_fit, self.student)), expected, atol=1e-5)

    def test_top_k_keeps_the_largest_logits_and_is_a_divergence(self):
        values, indices = S.top_k_numpy(self.teacher, 3)
        np.testing.assert_array_equal(values[..., 0], self.teacher.max(axis=-1))
        np.testing.assert_array_equal(indices[..., 0], self.teacher.argmax(axis=-1))
        self.assertTrue(np.all(np.diff(values, axis=-1) <= 0))
        term = np.asarray(S.top_k_term(values, indices, self.student, 1.0, "kd"))
        self.assertTrue(np.all(term >= -1e-6))
        # A student equal to the teacher has zero reverse KL on the support, and small forward KL (its tail mass).
        self.assertAllClose(S.top_k_term(values, indices, self.teacher, 1.0, "reverse_kl"), np.zeros((4, 5)),
                            atol=1e-5)

    def test_reverse_kl_differs_from_kl(self):
        forward = _mean(S.sequence_term(self.teacher, self.student, 1.0, "kd"))
        reverse = _mean(S.sequence_term(self.teacher, self.student, 1.0, "reverse_kl"))
        self.assertGreater(abs(forward - reverse), 1e-2)

    def test_masked_positions_do_not_count_in_cached_targets(self):
        labels = np.arange(20).reshape(4, 5) % 11
        x = {"token_ids": np.zeros((4, 5), "int32"), "padding_mask": np.ones((4, 5), "int32")}
        x["padding_mask"][:, 3:] = 0
        _, packed = D.attach_teacher((x, labels), self.teacher, top_k=4)
        self.assertAllClose(packed[:, :, 1, 0], x["padding_mask"])
        garbage = self.student.copy()
        garbage[:, 3:] = 1e3 * np.random.default_rng(1).standard_normal((4, 2, 11))
        _, short = D.attach_teacher(({"token_ids": x["token_ids"][:, :3]}, labels[:, :3]), self.teacher[:, :3],
                                    top_k=4)
        loss = D.DistillationLoss(temperature=2.0, alpha=0.5)
        self.assertAllClose(float(loss(packed, garbage)), float(loss(short, self.student[:, :3])), atol=1e-5)
        # The same with fit's sample_weight instead of a padding mask.
        _, unmasked = D.attach_teacher(({"token_ids": x["token_ids"]}, labels), self.teacher, top_k=4)
        self.assertAllClose(float(loss(unmasked, garbage, sample_weight=x["padding_mask"])),
                            float(loss(short, self.student[:, :3])), atol=1e-5)

    def test_label_accuracy_counts_only_the_positions_that_count(self):
        labels = np.array([[1, 2, 3, -1]])
        logits = np.eye(11, dtype="float32")[[[1, 5, 3, 0]]]
        metric = D.LabelAccuracy()
        metric.update_state(labels, logits)  # -1 skipped: 2 of 3
        self.assertAllClose(float(metric.result()), 2 / 3)
        metric.reset_state()
        metric.update_state(labels, logits, sample_weight=np.array([[1, 0, 1, 1]]))
        self.assertAllClose(float(metric.result()), 1.0)


class SequenceDistillationTest(testing.TestCase):
    """Tiny GPT-2 causal LMs built from configs: a teacher trained on arithmetic sequences, a smaller student."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.x, cls.y = _data()
        cls.teacher = _lm(2, 32, "teacher")
        cls.teacher.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                            weighted_metrics=[])
        cls.teacher.fit(cls.x, cls.y, epochs=6, batch_size=16, verbose=0)
        cls.teacher.trainable = False

    def _distiller(self, **kwargs):
        return D.Distiller(self.teacher, _lm(1, 16, "student", seed=1), **kwargs)

    def test_padding_holding_garbage_counts_for_nothing_online(self):
        distiller = self._distiller(temperature=2.0, alpha=0.5)
        x, y = {k: v[:8] for k, v in self.x.items()}, self.y[:8]
        short = {"token_ids": x["token_ids"][:, :12], "padding_mask": x["padding_mask"][:, :12]}
        padded = {"token_ids": x["token_ids"].copy(), "padding_mask": x["padding_mask"].copy()}
        padded["token_ids"][:, 12:] = np.random.default_rng(2).integers(0, VOCAB, (8, 4))
        padded["padding_mask"][:, 12:] = 0
        garbage_y = y.copy()
        garbage_y[:, 12:] = 7
        expected = float(distiller.compute_loss(short, y[:, :12], training=False))
        self.assertAllClose(float(distiller.compute_loss(padded, garbage_y, training=False)), expected, atol=1e-5)
        # fit's sample_weight masks positions the same way.
        weight = np.concatenate([np.ones((8, 12)), np.zeros((8, 4))], axis=1)
        unmasked = {"token_ids": padded["token_ids"], "padding_mask": np.ones((8, 16), "int32")}
        self.assertAllClose(float(distiller.compute_loss(unmasked, garbage_y, sample_weight=weight, training=False)),
                            expected, atol=1e-5)

    @pytest.mark.slow
    def test_online_distillation_loss_falls_for_kl_and_reverse_kl(self):
        losses = {}
        for method in ("kd", "reverse_kl"):
            distiller = self._distiller(temperature=1.0, alpha=0.0, method=method)
            distiller.compile(keras.optimizers.Adam(3e-3))
            history = distiller.fit(self.x, self.y, sample_weight=self.x["padding_mask"], epochs=4, batch_size=16,
                                    verbose=0)
            losses[method] = history.history["loss"]
            self.assertLess(losses[method][-1], 0.8 * losses[method][0], msg=method)
        self.assertNotAlmostEqual(losses["kd"][0], losses["reverse_kl"][0], places=3)

    @pytest.mark.slow
    def test_cached_top_k_distillation_loss_falls(self):
        x_fit, y_fit = D.attach_teacher((self.x, self.y), self.teacher, top_k=8, batch_size=32)
        self.assertEqual(y_fit.shape, (64, SEQ, 2, 9))
        np.testing.assert_array_equal(y_fit[:, :, 0, 0], self.y)
        student = _lm(1, 16, "student", seed=1)
        student.compile(keras.optimizers.Adam(3e-3), D.DistillationLoss(temperature=1.0, alpha=0.0),
                        weighted_metrics=[D.LabelAccuracy()])
        history = student.fit(x_fit, y_fit, epochs=4, batch_size=16, verbose=0).history
        self.assertLess(history["loss"][-1], 0.8 * history["loss"][0])
        self.assertGreater(history["label_accuracy"][-1], history["label_accuracy"][0])
        student.evaluate(self.x, self.y, verbose=0)  # plain next-token labels work too

    def test_cached_top_k_of_the_whole_vocabulary_is_the_online_loss(self):
        x, y = {k: v[:8] for k, v in self.x.items()}, self.y[:8]
        distiller = self._distiller(temperature=2.0, alpha=0.3)
        _, y_fit = D.attach_teacher((x, y), self.teacher, top_k=VOCAB)
        cached = D.DistillationLoss(temperature=2.0, alpha=0.3)(y_fit, distiller.student(x))
        self.assertAllClose(float(cached), float(distiller.compute_loss(x, y, training=False)), atol=1e-5)

    def test_hidden_state_loss_between_blocks_with_a_learned_projection(self):
        hint = D.FeatureHint("teacher_backbone/transformer_layer_1", "student_backbone/transformer_layer_0",
                             weight=0.5)
        distiller = self._distiller(temperature=1.0, alpha=0.5, losses=[hint])
        self.assertEqual(distiller.projections[0].units, 32)  # student width 16 -> teacher width 32
        distiller.compile(keras.optimizers.Adam(3e-3))
        x, y = {k: v[:16] for k, v in self.x.items()}, self.y[:16]
        before = float(distiller.compute_loss(x, y, training=True))
        distiller.fit(x, y, epochs=2, batch_size=8, verbose=0)
        self.assertLess(float(distiller.compute_loss(x, y, training=True)), before)
