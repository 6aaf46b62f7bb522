"""Misuses of quantization-aware training and what tfopt says."""

import keras

import tfopt
from tests.misuse.harness import Misuse, MisuseTestCase


class FixedBlock(keras.layers.Layer):
    """A custom layer holding a LayerNormalization, whose `__init__` takes no
    `**kwargs`: Keras cannot re-create it from its config."""

    def __init__(self):
        super().__init__(name="fixed")
        self.norm = keras.layers.LayerNormalization(name="inner_norm")

    def call(self, x):
        return self.norm(x)


def _norm_in_a_fixed_layer():
    from tfopt.layers import litert_forms

    layer = FixedBlock()
    layer(keras.ops.ones((1, 4)))
    return litert_forms.export_copy(layer, calibrating=True)


def _mlp(built=True):
    return keras.Sequential(([keras.Input((4,))] if built else []) + [
        keras.layers.Dense(8, activation="relu", name="hidden"), keras.layers.Dense(2, name="head")], name="mlp")


TABLE = [
    Misuse(
        "quantize_model of a model that is already quantization-aware",
        lambda: tfopt.quantize_model(tfopt.quantize_model(_mlp())),
        raises=ValueError, match=r"model 'mlp' is already quantization-aware \(layers \[.*Quantize the float"),
    Misuse(
        "quantize_model of a model that was never built",
        lambda: tfopt.quantize_model(_mlp(built=False)),
        raises=ValueError, match=r"`tfopt.quantize_model` needs a built model.*'mlp' was never built.*Fix"),
    Misuse(
        "quantization_aware='float16' on a tfopt layer",
        lambda: tfopt.layers.Dense(2, quantization_aware="float16", name="head"),
        raises=ValueError, match=r"Layer 'head'.*'float16' quantizes nothing.*precision='float16'"),
    Misuse(
        "quantize_model with the export-only float16 precision",
        lambda: tfopt.quantize_model(_mlp(), "float16"),
        raises=ValueError, match=r"numerical_precision.*'float16' quantizes nothing.*Fix"),
    Misuse(
        "quantization_aware on a layer type tfopt does not quantize yet",
        lambda: tfopt.layers.SimpleRNN(2, quantization_aware="int8", name="rnn"),
        raises=ValueError, match=r"Layer 'rnn' \(SimpleRNN\) got `quantization_aware`.*not quantize this layer type"),
    Misuse(
        "a LayerNormalization inside a custom layer that cannot be re-created from its config",
        _norm_in_a_fixed_layer,
        warns=UserWarning, match=r"\['inner_norm \(LayerNormalization\)'\] inside layer 'fixed' \(FixedBlock\).*NEG.*"
                                 r"Fix: let FixedBlock.__init__ take \*\*kwargs"),
]


class QuantizationMisuseTest(MisuseTestCase):
    def test_table(self):
        # Every row raised, warned or logged what it says (a failing row fails its subtest).
        self.assertEqual(self.run_table(TABLE), len(TABLE))
