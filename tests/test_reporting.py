"""tfopt.reporting: multiply-adds per layer and the summary table, against hand-computed figures."""

import contextlib
import io
import os
import tempfile

import keras
import numpy as np
import pytest

import tfopt
from tfopt import geometry, reporting, testing

pytestmark = pytest.mark.backend_neutral

L = keras.layers


def _sequential(shape, *layers):
    return keras.Sequential([keras.Input(shape), *layers])


def _summary(model):
    """`(rows, printed text)` of `tfopt.summary(model)`."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rows = tfopt.summary(model)
    return rows, out.getvalue()


def _macs_of(rows):
    """`{layer: macs}` from a summary's rows (each layer's first row), the total under "total"."""
    out = {}
    for row in rows:
        out.setdefault(row["layer"], row["macs"])
    return out


class RecurrentMacsTest(testing.TestCase):
    """Recurrent layers count their input and recurrent kernels once per timestep;
    gate products, activations and biases are not counted (as for every layer)."""

    def test_bidirectional_lstm_counts_both_directions_every_timestep(self):
        model = _sequential((10, 4), L.Bidirectional(L.LSTM(8, name="lstm"), name="bi"), L.Dense(2, name="head"))
        # One direction, one timestep: input kernel 4 x 32 + recurrent kernel 8 x 32 = 384; 10 timesteps.
        self.assertEqual(reporting.macs(model), {"bi": 2 * 10 * 384, "head": 16 * 2})  # concat: 16 features
        rows, _ = _summary(model)
        figures = _macs_of(rows)
        self.assertEqual((figures["forward_lstm"], figures["backward_lstm"]), (3840, 3840))
        self.assertEqual(figures["total"], 7680 + 32)
        self.assertEqual([(r["layer"], r["weight"]) for r in rows if "lstm" in r["layer"]],
                         [(f"{d}_lstm", w) for d in ("backward", "forward") for w in ("kernel", "recurrent_kernel")])

    def test_each_recurrent_type(self):
        cases = [
            # (input shape, layer, hand-computed multiply-adds)
            ((7, 4), L.SimpleRNN(6), 7 * (4 * 6 + 6 * 6)),
            ((10, 4), L.LSTM(8), 10 * (4 * 32 + 8 * 32)),
            ((10, 3), L.GRU(5), 10 * (3 * 15 + 5 * 15)),
            ((10, 3), L.GRU(5, reset_after=False), 10 * (3 * 15 + 5 * 15)),
            ((10, 4), L.LSTM(8, return_sequences=True), 10 * (4 * 32 + 8 * 32)),
            ((10, 4), L.RNN(L.LSTMCell(8)), 10 * (4 * 32 + 8 * 32)),
            # stacked cells: LSTMCell(4) on 2 features, then GRUCell(3) on its 4 outputs
            ((5, 2), L.RNN([L.LSTMCell(4), L.GRUCell(3)]), 5 * ((2 * 16 + 4 * 16) + (4 * 9 + 3 * 9))),
            ((6, 3), L.Bidirectional(L.GRU(4, return_sequences=True)), 2 * 6 * (3 * 12 + 4 * 12)),
            # each kernel entry once per output position per timestep: 6 x 6 positions ("same")
            ((5, 6, 6, 1), L.ConvLSTM2D(2, 3, padding="same"), 5 * 36 * (3 * 3 * 1 * 8 + 3 * 3 * 2 * 8)),
            ((5, 6, 6, 1), L.ConvLSTM2D(2, 3, padding="same", return_sequences=True),
             5 * 36 * (3 * 3 * 1 * 8 + 3 * 3 * 2 * 8)),
            # "valid": 10 - 3 + 1 = 8 positions
            ((4, 10, 2), L.ConvLSTM1D(3, 3), 4 * 8 * (3 * 2 * 12 + 3 * 3 * 12)),
            ((10, 4), L.TimeDistributed(L.Dense(3)), 10 * 4 * 3),
            ((5, 6, 6, 1), L.TimeDistributed(L.Conv2D(2, 3, padding="same")), 5 * 36 * (3 * 3 * 1 * 2)),
        ]
        for shape, layer, expected in cases:
            with self.subTest(layer=type(layer).__name__, shape=shape):
                model = _sequential(shape, layer)
                self.assertEqual(reporting.macs(model), {layer.name: expected})
                self.assertEqual(tfopt.summary(model, print_fn=None)[-1]["macs"], expected)

    def test_wrapped_layers_have_their_share_in_the_summary(self):
        model = _sequential((10, 4), L.TimeDistributed(L.Dense(3, name="inner"), name="td"),
                            L.Bidirectional(L.SimpleRNN(2, name="rnn"), name="bi"))
        rows, _ = _summary(model)
        figures = _macs_of(rows)
        self.assertEqual(figures["inner"], 10 * 12)
        self.assertEqual(figures["forward_rnn"], 10 * (3 * 2 + 2 * 2))
        self.assertEqual(figures["backward_rnn"], 10 * (3 * 2 + 2 * 2))
        self.assertEqual(figures["total"], 120 + 200)
        self.assertEqual(geometry.macs(model.get_layer("bi"), [(None, 10, 3)], [(None, 4)], parts=True)[1:],
                         [(model.get_layer("bi").forward_layer, 100), (model.get_layer("bi").backward_layer, 100)])

    def test_each_weight_is_listed_once(self):
        # An LSTM's kernel is also its cell's: listed twice, the pruned zeros counted twice in the total.
        model = _sequential((6, 4), L.LSTM(8, name="lstm"), L.Dense(2, name="head"))
        model.compile("adam", "mse")
        model.fit(np.ones((8, 6, 4)), np.ones((8, 2)), verbose=0,
                  callbacks=[tfopt.callbacks.Pruning(tfopt.schedules.ConstantSparsity(0.5, frequency=1))])
        rows = tfopt.summary(model, print_fn=None)
        self.assertEqual([(r["layer"], r["weight"]) for r in rows[:-1]],
                         [("lstm", "kernel"), ("lstm", "recurrent_kernel"), ("head", "kernel")])
        zeros = sum(int(np.sum(w == 0)) for w in (keras.ops.convert_to_numpy(model.get_layer("lstm").cell.kernel),
                                                  keras.ops.convert_to_numpy(model.get_layer("lstm").cell.recurrent_kernel),
                                                  keras.ops.convert_to_numpy(model.get_layer("head").kernel)))
        self.assertEqual(rows[-1]["nonzeros"], model.count_params() - zeros)


class ElementWiseTest(testing.TestCase):
    def test_layers_whose_weights_act_element_wise_count_zero(self):
        # Like biases and activations; they were unknown, so every CNN summary left them out of the total.
        model = _sequential((6, 6, 2), L.Conv2D(3, 3, name="conv"), L.BatchNormalization(name="bn"),
                            L.PReLU(name="prelu"))
        self.assertEqual(reporting.macs(model), {"conv": 16 * 3 * 3 * 2 * 3, "bn": 0, "prelu": 0})
        rows, printed = _summary(model)
        self.assertEqual(rows[-1]["macs"], 864)
        self.assertNotIn("macs:", printed)


class UnknownSizesTest(testing.TestCase):
    def test_unknown_number_of_timesteps_gives_a_count_per_timestep(self):
        model = _sequential((None, 4), L.LSTM(8, name="lstm"), L.Dense(2, name="head"))
        self.assertEqual(reporting.macs(model), {"lstm": None, "head": 16})
        rows, printed = _summary(model)
        self.assertEqual(_macs_of(rows)["lstm"], "384 per timestep")
        self.assertEqual(rows[-1]["macs"], "16 + 384 per timestep")
        self.assertIn("macs: layers ['lstm'] run over a time axis of unknown length (input shape (None, None, 4))",
                      printed)
        self.assertIn("keras.Input((steps, features))", printed)
        bi = _sequential((None, 4), L.Bidirectional(L.LSTM(8), name="bi"))
        self.assertEqual(tfopt.summary(bi, print_fn=None)[-1]["macs"], "768 per timestep")

    def test_open_sizes_are_unknown_not_wrong(self):
        # Before: a TypeError for the convolution and the attention, and 1/7 of the count for the EinsumDense.
        cases = [
            ((None, None, 3), L.Conv2D(2, 3, name="layer")),
            ((None, 4), L.Dense(3, name="layer")),
            ((None, 4), L.EinsumDense("abc,cd->abd", output_shape=(None, 5), name="layer")),
        ]
        for shape, layer in cases:
            with self.subTest(type(layer).__name__):
                model = _sequential(shape, layer)
                self.assertEqual(reporting.macs(model), {"layer": None})
                rows, printed = _summary(model)
                self.assertEqual(rows[-1]["macs"], 0)
                self.assertIn("macs: unknown for layers ['layer (", printed)
        inputs = keras.Input((None, 6))
        attention = keras.Model(inputs, L.MultiHeadAttention(2, 3, name="layer")(inputs, inputs))
        self.assertEqual(reporting.macs(attention), {"layer": None})

    def test_einsum_counts_the_axes_an_ellipsis_stands_for(self):
        model = _sequential((7, 4), L.EinsumDense("...b,bc->...c", output_shape=5, name="e"))
        self.assertEqual(reporting.macs(model), {"e": 7 * 4 * 5})
        model = _sequential((7, 4), L.EinsumDense("abc,cd->abd", output_shape=(7, 5), name="e"))
        self.assertEqual(reporting.macs(model), {"e": 7 * 4 * 5})


class DictOutputsTest(testing.TestCase):
    def test_a_model_that_indexes_a_nested_model_s_dict_of_outputs(self):
        # keras-hub's structure: a backbone slicing its sequence (`x[:, 0, :]`, a Keras operation in the
        # graph, not a layer) and returning a dict; the outer model takes one entry. Before: AttributeError.
        inputs = keras.Input((6, 4))
        sequence = L.Dense(3, name="x")(inputs)  # 6 positions x 4 x 3
        pooled = L.Dense(2, name="y")(sequence[:, 0, :] + 1.0)  # 3 x 2
        inner = keras.Model(inputs, {"sequence": sequence, "pooled": pooled}, name="inner")
        outer_in = keras.Input((6, 4))
        model = keras.Model(outer_in, L.Dense(5, name="head")(inner(outer_in)["pooled"]))
        self.assertEqual(reporting.macs(model), {"x": 72, "y": 6, "head": 10})
        self.assertEqual(tfopt.summary(model, print_fn=None)[-1]["macs"], 88)

    def test_keras_hub_backbone(self):
        keras_hub = pytest.importorskip("keras_hub")
        backbone = keras_hub.models.BertBackbone(vocabulary_size=100, num_layers=1, num_heads=2, hidden_dim=8,
                                                 intermediate_dim=16, max_sequence_length=16)
        inputs = {name: keras.Input((None,), dtype="int32", name=name)
                  for name in ("token_ids", "segment_ids", "padding_mask")}
        model = keras.Model(inputs, L.Dense(2, name="head")(backbone(inputs)["pooled_output"]))
        rows, printed = _summary(model)
        self.assertEqual(_macs_of(rows)["head"], 16)
        self.assertEqual(_macs_of(rows)["pooled_dense"], 64)
        self.assertIn("transformer_layer_0 (TransformerEncoder)", printed)  # named as unknown


class SummaryArgumentTest(testing.TestCase):
    def test_summary_of_a_keras_file(self):
        model = _sequential((10, 4), tfopt.layers.LSTM(8, pruning_schedule="baseline", name="lstm"),
                            L.Dense(2, name="head"))
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "m.keras")
            model.save(path)
            from_file = tfopt.summary(path, print_fn=None)
            from pathlib import Path

            self.assertEqual(tfopt.summary(Path(path), print_fn=None), from_file)
        self.assertEqual(from_file, tfopt.summary(model, print_fn=None))
        self.assertEqual(from_file[0]["structure"], "unstructured")


class AttentionGeometryTest(testing.TestCase):
    def test_projections_are_read_through_keras_internal(self):
        paths = [spec.path for spec in geometry.of(L.MultiHeadAttention).weights]
        self.assertEqual(paths, ["query_dense.kernel", "key_dense.kernel", "value_dense.kernel", "output_dense.kernel"])
        mha = L.MultiHeadAttention(num_heads=2, key_dim=4, value_dim=3)
        self.assertEqual(geometry.weights_of(mha), [])  # not built: no projections yet
        mha.build((None, 3, 8), (None, 3, 8))
        self.assertEqual([tuple(v.shape) for _, v in geometry.weights_of(mha)],
                         [(8, 2, 4), (8, 2, 4), (8, 2, 3), (2, 3, 8)])
        spec = geometry.of(mha).weights[0]
        self.assertIs(spec.owner(mha), mha.query_dense)
        self.assertIs(spec.variable(mha), mha.query_dense.kernel)
