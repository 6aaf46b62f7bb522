"""keras-hub encoder layers for `tfopt.quantize_model`: quantization-aware forms.

`tfopt.quantize_model` registers these the first time it is handed a model
with keras-hub layers (`register()`); keras-hub stays optional.

- `keras_hub.layers.TransformerEncoder` (BERT, RoBERTa, ... blocks) becomes
  `QuantizedTransformerEncoder`: the same math and weights, computed with
  tfopt's quantization-aware MultiHeadAttention, LayerNormalization and Dense
  twins, each residual sum with a tracked range of its own (the converter
  gives a tensor int8 parameters only where a fake-quant op gives it a
  range), and the feed-forward activation (GELU in BERT) as an op of its own
  between two ranges, as LiteRT runs it.
- keras-hub's `ReversibleEmbedding` (the token embedding) gets the Embedding
  geometry and a twin: its lookup table is fake-quantized per tensor.
- `keras_hub.layers.PositionEmbedding` gets a geometry (its position table,
  quantized, never pruned) and a twin: the table is fake-quantized, so the
  slice of it the converter writes is an int8 constant.

Only what a BERT-style encoder uses is covered; keras-hub's other blocks
(decoders, rotary attention, ...) are still refused by `quantize_model`.
"""

import keras

from tfopt import geometry, layers as tfopt_layers
from tfopt.layers.base import twin
from tfopt.layers.quantize_activation import QuantizeActivation, QuantizingLayer

__all__ = ["register", "QuantizedTransformerEncoder"]

_TWINS = {}  # keras-hub class name -> tfopt twin (made once)


def register():
    """Registers the geometry and quantization-aware twins of keras-hub's encoder layers
    (idempotent); returns `{keras-hub class: twin}`. `tfopt.quantize_model` calls it when
    it is handed a model holding keras-hub layers.

    Example:
    >>> import keras_hub
    >>> from tfopt.adapters import keras_hub_quantization
    >>> keras_hub_quantization.register()[keras_hub.layers.TransformerEncoder].__name__
    'QuantizedTransformerEncoder'
    """
    if _TWINS:
        return _TWINS
    import keras_hub  # lazy: keras-hub is an optional dependency

    position = keras_hub.layers.PositionEmbedding
    encoder = keras_hub.layers.TransformerEncoder
    # (prune=False: `tfopt.prune` keeps refusing keras-hub models, as before.) BertBackbone
    # builds Keras's own ReversibleEmbedding; other keras-hub models, keras-hub's subclass of it.
    for reversible in {keras.layers.ReversibleEmbedding, keras_hub.layers.ReversibleEmbedding}:
        geometry.register(reversible, [geometry.WeightSpec("embeddings", in_axis=-1, out_axis=-1, prune=False)])
        _TWINS[reversible] = twin(reversible, module=__name__, doc=(
            "`ReversibleEmbedding`, quantization-aware (its lookup table fake-quantized per tensor)."))
    geometry.register(position, [geometry.WeightSpec("position_embeddings", in_axis=-1, out_axis=-1, prune=False)])
    _TWINS[position] = twin(position, module=__name__, doc=(
        "keras-hub's `PositionEmbedding`, quantization-aware (its position table fake-quantized per tensor)."))
    # A block: no weight of its own (its sublayers hold them), so `tfopt.prune` does not select it.
    geometry.register(encoder, [])
    _TWINS[encoder] = geometry.register_twin(encoder)(_encoder_twin(encoder))
    return _TWINS


def _encoder_twin(encoder):
    from keras_hub.src.layers.modeling.transformer_layer_utils import merge_padding_and_attention_mask

    @keras.saving.register_keras_serializable(package="tfopt")
    class QuantizedTransformerEncoder(QuantizingLayer, encoder):
        """`keras_hub.layers.TransformerEncoder`, quantization-aware (module docstring).

        Takes TransformerEncoder's arguments plus `quantization_aware=` (a
        precision, as `tfopt.quantize_model` takes; required). Sublayers have
        TransformerEncoder's names, in its order; ranges of the residual sums
        are `self_attention_residual_quantize` and `feedforward_residual_quantize`.
        """

        quantization_composite = True  # its sublayers quantize (for `quantize_model`)
        computes_own_activations = True  # its feed-forward activation is inside it

        def __init__(self, *args, quantization_aware=None, pruning_schedule=None, structure=None,
                     folded_batch_norm=None, **kwargs):
            super().__init__(*args, **kwargs)
            where = f"Layer '{self.name}' ({type(self).__name__})"
            if not quantization_aware:
                raise ValueError(f"{where} needs `quantization_aware` (a precision such as 'int8'). Received: "
                                 f"quantization_aware={quantization_aware!r}. Fix: use "
                                 "keras_hub.layers.TransformerEncoder for the float block.")
            if pruning_schedule is not None or structure is not None or folded_batch_norm is not None:
                raise ValueError(f"{where} only quantizes; it got pruning_schedule={pruning_schedule!r}, "
                                 f"structure={structure!r}, folded_batch_norm={folded_batch_norm!r}. Fix: "
                                 "prune keras-hub blocks with tfopt.callbacks.Pruning during fit.")
            self.quantization_aware = quantization_aware

        def build(self, inputs_shape):
            hidden = inputs_shape[-1]
            q = self.quantization_aware
            common = dict(kernel_initializer=keras.initializers.get(keras.initializers.serialize(
                self.kernel_initializer)), bias_initializer=keras.initializers.get(
                keras.initializers.serialize(self.bias_initializer)), dtype=self.dtype_policy,
                quantization_aware=q)
            self.self_attention = tfopt_layers.MultiHeadAttention(
                num_heads=self.num_heads, key_dim=int(hidden // self.num_heads), dropout=self.dropout,
                name="self_attention_layer", **common)
            self.self_attention.build(inputs_shape, inputs_shape)
            self.self_attention_norm = tfopt_layers.LayerNormalization(
                epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, quantization_aware=q,
                name="self_attention_layer_norm")
            self.self_attention_norm.build(inputs_shape)
            self.self_attention_dropout = keras.layers.Dropout(self.dropout, name="self_attention_dropout")
            self.feedforward_norm = tfopt_layers.LayerNormalization(
                epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, quantization_aware=q,
                name="feedforward_layer_norm")
            self.feedforward_norm.build(inputs_shape)
            # The activation runs as an op of its own (LiteRT fuses only ReLU into a FULLY_CONNECTED).
            self.feedforward_intermediate = tfopt_layers.Dense(
                self.intermediate_dim, name="feedforward_intermediate_dense", **common)
            self.feedforward_intermediate.build(inputs_shape)
            self.feedforward_output = tfopt_layers.Dense(hidden, name="feedforward_output_dense", **common)
            self.feedforward_output.build(tuple(inputs_shape[:-1]) + (self.intermediate_dim,))
            self.feedforward_dropout = keras.layers.Dropout(self.dropout, name="feedforward_dropout")
            self.ranges = {name: QuantizeActivation(name=f"{name}_quantize") for name in (
                "self_attention_residual", "feedforward_activation", "feedforward_residual")}
            for layer in self.ranges.values():
                layer.build(inputs_shape)
            self.built = True

        def call(self, inputs, padding_mask=None, attention_mask=None, training=None,
                 return_attention_scores=False):
            x = inputs
            mask = merge_padding_and_attention_mask(inputs, padding_mask, attention_mask)
            residual = x
            if self.normalize_first:
                x = self.self_attention_norm(x, training=training)
            attended = self.self_attention(query=x, value=x, attention_mask=mask, training=training,
                                           return_attention_scores=return_attention_scores)
            if return_attention_scores:
                attended, scores = attended
            x = self.self_attention_dropout(attended, training=training)
            x = self.ranges["self_attention_residual"](x + residual, training=training)
            if not self.normalize_first:
                x = self.self_attention_norm(x, training=training)
            residual = x
            if self.normalize_first:
                x = self.feedforward_norm(x, training=training)
            x = self.feedforward_intermediate(x, training=training)
            if self.activation is not None and self.activation is not keras.activations.linear:
                x = self.ranges["feedforward_activation"](self.activation(x), training=training)
            x = self.feedforward_output(x, training=training)
            x = self.feedforward_dropout(x, training=training)
            x = self.ranges["feedforward_residual"](x + residual, training=training)
            if not self.normalize_first:
                x = self.feedforward_norm(x, training=training)
            return (x, scores) if return_attention_scores else x

        @property
        def weights(self):
            """TransformerEncoder's weights first, in its order (so that weights copy in order between
            the float block and this one: `quantize_model`, `tfopt.strip`), then the ranges."""
            if not self.built:
                return super().weights
            ranges = {id(v) for sub in self._quantized_sublayers() for _, v in sub.tfopt_variables()}
            keras_order = [v for sub in self._quantized_sublayers() for v in sub.weights if id(v) not in ranges]
            seen = {id(v) for v in keras_order}
            return keras_order + [v for v in super().weights if id(v) not in seen]

        def _quantized_sublayers(self):
            # TransformerEncoder's order: attention, its norm, the feed-forward norm, the two Dense.
            return [self.self_attention, self.self_attention_norm, self.feedforward_norm,
                    self.feedforward_intermediate, self.feedforward_output]

        def get_config(self):
            return {**super().get_config(), "quantization_aware": self.quantization_aware}

    QuantizedTransformerEncoder.__module__ = __name__
    return QuantizedTransformerEncoder


def __getattr__(name):
    if name == "QuantizedTransformerEncoder":
        import keras_hub  # lazy: keras-hub is an optional dependency

        return register()[keras_hub.layers.TransformerEncoder]
    raise AttributeError(name)
