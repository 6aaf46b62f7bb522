"""Quantization-aware LSTM and GRU twins (tfopt/layers/recurrent.py)."""

import os
import tempfile

import keras
import numpy as np
from absl.testing import parameterized

import tfopt
from tfopt import testing

L = keras.layers

# (twin, Keras class, arguments): each Keras argument the quantization-aware recurrence honours.
_CASES = [
    ("lstm", tfopt.layers.LSTM, L.LSTM, {}),
    ("lstm_sequences_backwards", tfopt.layers.LSTM, L.LSTM, {"return_sequences": True, "go_backwards": True}),
    ("lstm_no_bias", tfopt.layers.LSTM, L.LSTM, {"use_bias": False}),
    ("lstm_swapped_activations", tfopt.layers.LSTM, L.LSTM, {"activation": "sigmoid", "recurrent_activation": "tanh"}),
    ("gru", tfopt.layers.GRU, L.GRU, {}),
    ("gru_reset_before", tfopt.layers.GRU, L.GRU, {"reset_after": False, "return_sequences": True}),
    ("gru_no_bias", tfopt.layers.GRU, L.GRU, {"use_bias": False}),
    ("gru_backwards", tfopt.layers.GRU, L.GRU, {"go_backwards": True, "return_sequences": True}),
]


def _pair(twin, keras_cls, kwargs, **twin_kwargs):
    """A Keras layer and its twin with the same weights, both built on (2, 6, 3) inputs."""
    x = np.random.default_rng(0).uniform(-1, 1, (2, 6, 3)).astype("float32")
    base = keras_cls(5, **kwargs)
    base(x)
    layer = twin(5, **kwargs, **twin_kwargs)
    layer(x)
    layer.cell.set_weights(base.cell.get_weights())
    return base, layer, x


class RecurrentQuantizationTest(testing.TestCase, parameterized.TestCase):
    @parameterized.named_parameters(_CASES)
    def test_off_is_keras_exactly(self, twin, keras_cls, kwargs):
        base, layer, x = _pair(twin, keras_cls, kwargs)
        self.assertAllEqual(layer(x), base(x))

    @parameterized.named_parameters(_CASES)
    def test_on_is_close_to_keras(self, twin, keras_cls, kwargs):
        # Its own unrolled recurrence computes Keras's function, to int8 rounding.
        base, layer, x = _pair(twin, keras_cls, kwargs, quantization_aware="int8")
        for _ in range(3):  # ranges from training batches
            layer(x, training=True)
        out, expected = np.asarray(layer(x)), np.asarray(base(x))
        self.assertEqual(out.shape, expected.shape)
        self.assertLess(float(np.max(np.abs(out - expected))), 0.05)
        self.assertGreater(float(np.max(np.abs(expected))), 0.05)

    @parameterized.named_parameters(_CASES[:1] + _CASES[4:6])
    def test_trains_and_saves(self, twin, keras_cls, kwargs):
        rng = np.random.default_rng(0)
        x = rng.uniform(0, 1, (128, 6, 3)).astype("float32")
        y = (x[:, -1, 0] > 0.5).astype("int32")
        layer = twin(8, **kwargs, quantization_aware="int8")
        model = keras.Sequential([keras.Input((6, 3)), tfopt.layers.QuantizeActivation(), layer,
                                  L.Flatten(), tfopt.layers.Dense(2, quantization_aware="int8")])
        model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(x, y, batch_size=32, epochs=10, verbose=0)
        self.assertLess(history.history["loss"][-1], 0.9 * history.history["loss"][0])
        self.assertNotEqual(float(dict(layer.tfopt_variables())["gates_range_max"].numpy()), 6.0)  # ranges track
        path = os.path.join(tempfile.mkdtemp(), "model.keras")
        model.save(path)
        loaded = keras.models.load_model(path)
        self.assertIsInstance(loaded.layers[1], twin)
        self.assertAllEqual(loaded(x[:4]), model(x[:4]))

    @parameterized.named_parameters(_CASES)
    def test_config_round_trip(self, twin, keras_cls, kwargs):
        layer = twin(5, **kwargs, quantization_aware="int4")
        revived = twin.from_config(layer.get_config())
        self.assertEqual(revived.get_config(), layer.get_config())
        self.assertEqual(revived.weight_quant_spec, layer.weight_quant_spec)
        self.assertEqual(revived.output_quant_spec, layer.output_quant_spec)

    def test_quantize_model_keeps_the_activations_in_the_layer(self):
        model = keras.Sequential([keras.Input((6, 3)), L.LSTM(4), L.Dense(2)])
        qat = tfopt.quantize_model(model)
        self.assertEqual([type(layer).__name__ for layer in qat.layers],
                         ["InputLayer", "QuantizeActivation", "LSTM", "Dense"])
        self.assertEqual(qat.layers[2].get_config()["activation"], "tanh")
        self.assertEqual(qat.layers[2].quantization_aware, "int8")

    @parameterized.parameters(
        ({"dropout": 0.1}, r"dropout=0.1.*expected 0"),
        ({"stateful": True}, r"stateful=True"),
        ({"return_state": True}, r"return_state=True"),
        ({"activation": "relu"}, r"activation='relu'.*'sigmoid' or 'tanh'"),
    )
    def test_unsupported_arguments_are_refused(self, kwargs, message):
        for twin in (tfopt.layers.LSTM, tfopt.layers.GRU):
            with self.assertRaisesRegex(ValueError, message + r".*Fix: leave `quantization_aware` off"):
                twin(4, **kwargs, quantization_aware="int8", name="rnn")

    def test_binary_weights_and_folding_are_refused(self):
        with self.assertRaisesRegex(ValueError, r"weight mode 'binary'"):
            tfopt.layers.LSTM(4, quantization_aware="binary")
        with self.assertRaisesRegex(ValueError, r"folded_batch_norm.*not supported for recurrent"):
            tfopt.layers.GRU(4, quantization_aware="int8", folded_batch_norm={"epsilon": 1e-3})

    def test_mask_is_refused_at_call(self):
        layer = tfopt.layers.LSTM(4, quantization_aware="int8", name="rnn")
        x = np.ones((2, 5, 3), "float32")
        with self.assertRaisesRegex(ValueError, r"'rnn'.*got a mask.*overrides"):
            layer(x, mask=np.ones((2, 5), bool))

    def test_pruning_still_works_without_quantization(self):
        layer = tfopt.layers.LSTM(4, pruning_schedule="baseline")
        layer(np.ones((2, 5, 3), "float32"))
        self.assertIsNone(layer.output_quant_spec)
        self.assertEqual([w.name for w in layer.weights if "mask" in w.name],
                         ["kernel_mask", "recurrent_kernel_mask"])
