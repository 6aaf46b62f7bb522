"""keras-hub encoder and decoder layers for `tfopt.quantize_model`: quantization-aware forms.

`tfopt.quantize_model` registers these the first time it is handed a model
with keras-hub layers (`register()`); keras-hub stays optional.

- `keras_hub.layers.TransformerEncoder` (BERT, RoBERTa, ... blocks) becomes
  `QuantizedTransformerEncoder`: the same math and weights, computed with
  tfopt's quantization-aware MultiHeadAttention, LayerNormalization and Dense
  twins, each residual sum with a tracked range of its own (the converter
  gives a tensor int8 parameters only where a fake-quant op gives it a
  range), and the feed-forward activation (GELU in BERT) as an op of its own
  between two ranges, as LiteRT runs it.
- `keras_hub.layers.TransformerDecoder` without cross-attention (GPT-2's
  block) becomes `QuantizedTransformerDecoder`, the same way, with its causal
  and padding masks; it computes whole sequences (training, an exported
  file), not keras-hub's cached step-by-step generation.
- keras-hub's `ReversibleEmbedding` (the token embedding) gets the Embedding
  geometry and a twin: its lookup table is fake-quantized per tensor, and the
  language-model head it computes with `reverse=True` (`hidden @ table.T`)
  has a range of its own.
- `keras_hub.layers.PositionEmbedding` gets a geometry (its position table,
  quantized, never pruned) and a twin: the table is fake-quantized, so the
  slice of it the converter writes is an int8 constant.

Only what BERT-style encoders and GPT-2-style decoders use is covered;
keras-hub's other blocks (Llama, Mistral and Gemma decoders with rotary
attention and RMS norms, encoder-decoder blocks, ...) are still refused by
`quantize_model` (with `unsupported="float"` they stay float).
"""

import keras

from tfopt import _keras_internal, geometry, layers as tfopt_layers
from tfopt.layers.base import twin
from tfopt.layers.quantize_activation import QuantizeActivation, QuantizingLayer

__all__ = ["register", "QuantizedTransformerEncoder", "QuantizedTransformerDecoder"]

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
        _TWINS[reversible] = twin(reversible, module=__name__, mixin=_ReversibleLogits, doc=(
            "`ReversibleEmbedding`, quantization-aware (its lookup table fake-quantized per tensor; "
            "the logits of `reverse=True` with a range of their own)."))
    geometry.register(position, [geometry.WeightSpec("position_embeddings", in_axis=-1, out_axis=-1, prune=False)])
    _TWINS[position] = twin(position, module=__name__, doc=(
        "keras-hub's `PositionEmbedding`, quantization-aware (its position table fake-quantized per tensor)."))
    # Blocks: no weight of their own (their sublayers hold them), so `tfopt.prune` does not select them.
    decoder = keras_hub.layers.TransformerDecoder
    for block, make in ((encoder, _encoder_twin), (decoder, _decoder_twin)):
        geometry.register(block, [])
        _TWINS[block] = geometry.register_twin(block)(make(block))
    return _TWINS


class _ReversibleLogits:
    """Mixin of the ReversibleEmbedding twins: a lookup and its reverse (`reverse=True`, the
    language-model head `hidden @ table.T`) make outputs of different kinds, each with its
    own tracked range (the lookup's `output_range_*`, the logits' `logits_range_*`)."""

    INTERMEDIATE_RANGES = ("logits",)

    def output_range(self, call_kwargs):
        if call_kwargs.get("reverse"):
            return self._intermediate_ranges["logits"]
        return super().output_range(call_kwargs)


class _QuantizedBlock:
    """What the quantization-aware keras-hub blocks share: the arguments they add to their
    parent's (`quantization_aware=`, required; tfopt's other layer arguments refused), their
    sublayers made as tfopt twins under the parent's names, the ranges of their residual
    sums and feed-forward activation, and `weights` in the parent's order."""

    quantization_composite = True  # its sublayers quantize (for `quantize_model`)
    computes_own_activations = True  # its feed-forward activation is inside it
    RANGES = ("self_attention_residual", "feedforward_activation", "feedforward_residual")

    BUILD_SHAPES = ()  # config keys with which the parent builds itself in `__init__`

    def __init__(self, *args, quantization_aware=None, pruning_schedule=None, structure=None,
                 folded_batch_norm=None, **kwargs):
        shapes = [kwargs.pop(key, None) for key in self.BUILD_SHAPES]  # built below, once checked
        super().__init__(*args, **kwargs)
        where = f"Layer '{self.name}' ({type(self).__name__})"
        parent = next(c for c in type(self).__mro__ if c.__module__.startswith("keras_hub")).__name__
        if not quantization_aware:
            raise ValueError(f"{where} needs `quantization_aware` (a precision such as 'int8'). Received: "
                             f"quantization_aware={quantization_aware!r}. Fix: use "
                             f"keras_hub.layers.{parent} for the float block.")
        if pruning_schedule is not None or structure is not None or folded_batch_norm is not None:
            raise ValueError(f"{where} only quantizes; it got pruning_schedule={pruning_schedule!r}, "
                             f"structure={structure!r}, folded_batch_norm={folded_batch_norm!r}. Fix: "
                             "prune keras-hub blocks with tfopt.callbacks.Pruning during fit.")
        self.quantization_aware = quantization_aware
        if shapes and shapes[0] is not None:
            self.build(*shapes)

    def _build_parts(self, inputs_shape, names):
        """The sublayers, as tfopt twins named as the parent names them: `names` maps
        attention, attention_norm, feedforward_norm, intermediate, output to those names.
        Returns them in that order."""
        hidden = inputs_shape[-1]
        q = self.quantization_aware
        common = dict(kernel_initializer=keras.initializers.get(keras.initializers.serialize(
            self.kernel_initializer)), bias_initializer=keras.initializers.get(
            keras.initializers.serialize(self.bias_initializer)), dtype=self.dtype_policy,
            quantization_aware=q)
        attention = tfopt_layers.MultiHeadAttention(
            num_heads=self.num_heads, key_dim=int(hidden // self.num_heads), dropout=self.dropout,
            name=names["attention"], **common)
        attention.build(inputs_shape, inputs_shape)
        norms = [tfopt_layers.LayerNormalization(epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy,
                                                 quantization_aware=q, name=names[key])
                 for key in ("attention_norm", "feedforward_norm")]
        for norm in norms:
            norm.build(inputs_shape)
        # The activation runs as an op of its own (LiteRT fuses only ReLU into a FULLY_CONNECTED).
        intermediate = tfopt_layers.Dense(self.intermediate_dim, name=names["intermediate"], **common)
        intermediate.build(inputs_shape)
        output = tfopt_layers.Dense(hidden, name=names["output"], **common)
        output.build(tuple(inputs_shape[:-1]) + (self.intermediate_dim,))
        self.ranges = {name: QuantizeActivation(name=f"{name}_quantize") for name in self.RANGES}
        for layer in self.ranges.values():
            layer.build(inputs_shape)
        return attention, norms[0], norms[1], intermediate, output

    def _block(self, x, attend, attention_norm, feedforward_norm, intermediate, output, attention_dropout,
               feedforward_dropout, training):
        """The block's math, as keras-hub's encoder and decoder write it (pre- or post-norm),
        with a range on each residual sum and after the feed-forward activation.
        `attend(x)` is the attention; returns `(output, what attend returned besides)`."""
        residual = x
        if self.normalize_first:
            x = attention_norm(x, training=training)
        x, extra = attend(x)
        x = attention_dropout(x, training=training)
        x = self.ranges["self_attention_residual"](x + residual, training=training)
        if not self.normalize_first:
            x = attention_norm(x, training=training)
        residual = x
        if self.normalize_first:
            x = feedforward_norm(x, training=training)
        x = intermediate(x, training=training)
        if self.activation is not None and self.activation is not keras.activations.linear:
            x = self.ranges["feedforward_activation"](self.activation(x), training=training)
        x = output(x, training=training)
        x = feedforward_dropout(x, training=training)
        x = self.ranges["feedforward_residual"](x + residual, training=training)
        if not self.normalize_first:
            x = feedforward_norm(x, training=training)
        return x, extra

    @property
    def weights(self):
        """The parent block's weights first, in its order (so that weights copy in order between
        the float block and this one: `quantize_model`, `tfopt.strip`), then the ranges."""
        if not self.built:
            return super().weights
        ranges = {id(v) for sub in self._quantized_sublayers() for _, v in sub.tfopt_variables()}
        keras_order = [v for sub in self._quantized_sublayers() for v in sub.weights if id(v) not in ranges]
        seen = {id(v) for v in keras_order}
        return keras_order + [v for v in super().weights if id(v) not in seen]

    def get_config(self):
        return {**super().get_config(), "quantization_aware": self.quantization_aware}


def _encoder_twin(encoder):
    from keras_hub.src.layers.modeling.transformer_layer_utils import merge_padding_and_attention_mask

    @keras.saving.register_keras_serializable(package="tfopt")
    class QuantizedTransformerEncoder(_QuantizedBlock, QuantizingLayer, encoder):
        """`keras_hub.layers.TransformerEncoder`, quantization-aware (module docstring).

        Takes TransformerEncoder's arguments plus `quantization_aware=` (a
        precision, as `tfopt.quantize_model` takes; required). Sublayers have
        TransformerEncoder's names, in its order; ranges of the residual sums
        are `self_attention_residual_quantize` and `feedforward_residual_quantize`.
        """

        def build(self, inputs_shape):
            (self.self_attention, self.self_attention_norm, self.feedforward_norm, self.feedforward_intermediate,
             self.feedforward_output) = self._build_parts(inputs_shape, dict(
                attention="self_attention_layer", attention_norm="self_attention_layer_norm",
                feedforward_norm="feedforward_layer_norm", intermediate="feedforward_intermediate_dense",
                output="feedforward_output_dense"))
            self.self_attention_dropout = keras.layers.Dropout(self.dropout, name="self_attention_dropout")
            self.feedforward_dropout = keras.layers.Dropout(self.dropout, name="feedforward_dropout")
            self.built = True

        def call(self, inputs, padding_mask=None, attention_mask=None, training=None,
                 return_attention_scores=False):
            mask = merge_padding_and_attention_mask(inputs, padding_mask, attention_mask)

            def attend(x):
                out = self.self_attention(query=x, value=x, attention_mask=mask, training=training,
                                          return_attention_scores=return_attention_scores)
                return out if return_attention_scores else (out, None)

            x, scores = self._block(inputs, attend, self.self_attention_norm, self.feedforward_norm,
                                    self.feedforward_intermediate, self.feedforward_output,
                                    self.self_attention_dropout, self.feedforward_dropout, training)
            return (x, scores) if return_attention_scores else x

        def _quantized_sublayers(self):
            # TransformerEncoder's order: attention, its norm, the feed-forward norm, the two Dense.
            return [self.self_attention, self.self_attention_norm, self.feedforward_norm,
                    self.feedforward_intermediate, self.feedforward_output]

    QuantizedTransformerEncoder.__module__ = __name__
    return QuantizedTransformerEncoder


def _decoder_twin(decoder):
    from keras_hub.src.layers.modeling.transformer_layer_utils import merge_padding_and_attention_mask
    @keras.saving.register_keras_serializable(package="tfopt")
    class QuantizedTransformerDecoder(_QuantizedBlock, QuantizingLayer, decoder):
        """`keras_hub.layers.TransformerDecoder` without cross-attention (GPT-2's block),
        quantization-aware (module docstring).

        Takes TransformerDecoder's arguments plus `quantization_aware=` (required).
        It computes whole sequences, as training and an exported file do: the
        key/value cache of step-by-step generation is refused (`tfopt.strip`
        the model to generate with keras-hub). Sublayers have TransformerDecoder's
        names, in its order.
        """

        BUILD_SHAPES = ("decoder_sequence_shape", "encoder_sequence_shape")

        @staticmethod
        def quantization_unsupported(layer):
            """Why this twin cannot quantize `layer` (a TransformerDecoder), or None."""
            if _keras_internal.has_cross_attention(layer):
                return "cross-attention (an encoder-decoder block)"
            return None

        def build(self, decoder_sequence_shape, encoder_sequence_shape=None):
            if encoder_sequence_shape is not None:
                raise ValueError(
                    f"Layer '{self.name}' ({type(self).__name__}) computes decoder-only blocks; it got an "
                    f"encoder sequence of shape {tuple(encoder_sequence_shape)}. Fix: leave encoder-decoder "
                    "blocks float (tfopt.quantize_model(..., unsupported='float')).")
            self._decoder_sequence_shape, self._encoder_sequence_shape = decoder_sequence_shape, None
            attention, attention_norm, feedforward_norm, intermediate, output = self._build_parts(
                decoder_sequence_shape, dict(
                    attention="self_attention", attention_norm="self_attention_layer_norm",
                    feedforward_norm="feedforward_layer_norm", intermediate="feedforward_intermediate_dense",
                    output="feedforward_output_dense"))
            # Tracked in TransformerDecoder's order (the order of `trainable_variables`, which an
            # optimizer's saved slots follow).
            self.self_attention, self.self_attention_norm = attention, attention_norm
            self.feedforward_intermediate, self.feedforward_output = intermediate, output
            self.feedforward_norm = feedforward_norm
            self.self_attention_dropout = keras.layers.Dropout(self.dropout, name="self_attention_dropout")
            self.feedforward_dropout = keras.layers.Dropout(self.dropout, name="feedforward_dropout")
            _keras_internal.set_no_cross_attention(self)
            self.built = True

        def call(self, decoder_sequence, encoder_sequence=None, decoder_padding_mask=None,
                 decoder_attention_mask=None, encoder_padding_mask=None, encoder_attention_mask=None,
                 self_attention_cache=None, self_attention_cache_update_index=None, cross_attention_cache=None,
                 cross_attention_cache_update_index=None, use_causal_mask=True, training=None):
            if self_attention_cache is not None or encoder_sequence is not None:
                raise ValueError(
                    f"Layer '{self.name}' ({type(self).__name__}) computes whole sequences without an encoder "
                    f"sequence; it got self_attention_cache of shape "
                    f"{None if self_attention_cache is None else tuple(self_attention_cache.shape)} and "
                    f"encoder_sequence={'a tensor' if encoder_sequence is not None else None}. Fix: generate "
                    "step by step with the float model (tfopt.strip(model)), or export it "
                    "(tfopt.export / tfopt.export_generator).")
            # The causal part is the attention twin's, from integer positions: keras-hub's own,
            # from a float RANGE, leaves RANGE, GREATER_EQUAL and EXPAND_DIMS float in the file.
            mask = merge_padding_and_attention_mask(decoder_sequence, decoder_padding_mask, decoder_attention_mask)

            def attend(x):
                return self.self_attention(query=x, value=x, attention_mask=mask, use_causal_mask=use_causal_mask,
                                           training=training), None

            x, _ = self._block(decoder_sequence, attend, self.self_attention_norm, self.feedforward_norm,
                               self.feedforward_intermediate, self.feedforward_output,
                               self.self_attention_dropout, self.feedforward_dropout, training)
            return x

        def _quantized_sublayers(self):
            # TransformerDecoder's order: attention, its norm, the two Dense, the feed-forward norm.
            return [self.self_attention, self.self_attention_norm, self.feedforward_intermediate,
                    self.feedforward_output, self.feedforward_norm]

    QuantizedTransformerDecoder.__module__ = __name__
    return QuantizedTransformerDecoder


def __getattr__(name):
    if name in ("QuantizedTransformerEncoder", "QuantizedTransformerDecoder"):
        import keras_hub  # lazy: keras-hub is an optional dependency

        block = name[len("Quantized"):]
        return register()[getattr(keras_hub.layers, block)]
    raise AttributeError(name)
