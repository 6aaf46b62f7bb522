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

- keras-hub's `LlamaTransformerDecoder` (Llama's block) becomes
  `QuantizedLlamaDecoder`: its RMS norms (`LlamaLayerNorm`, with a twin
  of its own, also for the backbone's last norm), its grouped-query
  attention with rotary position embeddings (a `LlamaAttention` twin that
  extends `tfopt.layers.MultiHeadAttention`'s integer attention: key and
  value heads repeated in the kernels, int8 cos/sin tables sliced at the
  sequence length), the SwiGLU feed-forward (SiLU and the gated product
  each with a range) and its residual sums. Whole sequences only, as the
  GPT-2 twin.

Only what BERT-style encoders and GPT-2- and Llama-style decoders use is
covered; keras-hub's other blocks (Mistral's decoder, whose attention has a
sliding window and private attribute names of its own, Gemma's, encoder-decoder
blocks, ...) are still refused by `quantize_model` (with `unsupported="float"`
they stay float).
"""

import functools
import inspect
import itertools

import keras
import numpy as np
from keras import ops

from tfopt import _keras_internal, geometry, layers as tfopt_layers
from tfopt.layers import _weight_quantization, normalization
from tfopt.layers.attention import IntegerAttention
from tfopt.layers.base import twin
from tfopt.layers.quantize_activation import QuantizeActivation, QuantizingLayer, track_and_quantize

__all__ = ["register", "QuantizedTransformerEncoder", "QuantizedTransformerDecoder", "QuantizedLlamaDecoder",
           "QuantizedMistralDecoder"]

#: Positions the rotary tables of a quantization-aware Llama attention hold: longer sequences are
#: refused (a static length when the layer is called, a dynamic one by the SLICE op at run time).
ROTARY_POSITIONS = 1024
_TABLE_IDS = itertools.count()  # makes each rotary layer's tables a constant of its own

_TWINS = {}  # keras-hub class -> tfopt twin (made once)


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
    _register_llama()
    return _TWINS


def _register_llama():
    """Llama's and Mistral's RMS norms, attentions (quantize_model reaches them inside their
    decoder blocks only) and decoder blocks: the same math (Mistral's attention may add a
    sliding window)."""
    from keras_hub.src.models.llama.llama_attention import LlamaAttention
    from keras_hub.src.models.llama.llama_decoder import LlamaTransformerDecoder
    from keras_hub.src.models.llama.llama_layernorm import LlamaLayerNorm
    from keras_hub.src.models.mistral.mistral_attention import CachedMistralAttention
    from keras_hub.src.models.mistral.mistral_layer_norm import MistralLayerNormalization
    from keras_hub.src.models.mistral.mistral_transformer_decoder import MistralTransformerDecoder

    for decoder, attention, norm in ((LlamaTransformerDecoder, LlamaAttention, LlamaLayerNorm),
                                     (MistralTransformerDecoder, CachedMistralAttention, MistralLayerNormalization)):
        geometry.register(norm, [geometry.WeightSpec("scale", in_axis=None, out_axis=-1, prune=False)])
        _TWINS[norm] = twin(norm, module=__name__, mixin=_RMSNormCall, doc=(
            f"keras-hub's `{norm.__name__}` (an RMS normalization), quantization-aware: computed in "
            "LiteRT's integer ops, each with a range (`_RMSNormCall`), its `scale` 8-bit per tensor."))
        # As MultiHeadAttention's: its EinsumDense projections, read by the twin in the 2-D layout
        # of the FULLY_CONNECTED ops LiteRT runs.
        geometry.register(attention, [
            geometry.WeightSpec(f"{part}_dense.kernel", in_axis=0, out_axis=1 if part != "output" else -1,
                                prune=False,
                                holder=functools.partial(_keras_internal.attention_projection, part=part))
            for part in ("query", "key", "value", "output")])
        _TWINS[attention] = twin(attention, module=__name__, mixin=_RotaryAttentionCall, doc=(
            f"keras-hub's `{attention.__name__}` (grouped-query attention with rotary position "
            "embeddings), quantization-aware (`_RotaryAttentionCall`)."))
        geometry.register(decoder, [])
        _TWINS[decoder] = geometry.register_twin(decoder)(
            _rotary_decoder_twin(decoder, _TWINS[attention], _TWINS[norm]))


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


class _RMSNormCall:
    """Mixin of the LlamaLayerNorm twin: `x * rsqrt(mean(x ** 2) + epsilon) * scale` in
    LiteRT's integer ops (MUL, MEAN, ADD, RSQRT, MUL, MUL), each result with a range
    (`tfopt.layers.normalization.inverse_deviation` for the first four), `scale` 8-bit per
    tensor as a LayerNormalization's gamma. Without quantization, keras-hub's own call."""

    INTERMEDIATE_RANGES = ("squared", "variance", "variance_epsilon", "inverse", "normalized")

    def call(self, inputs, training=None):
        if self.output_quant_spec is None:
            return self.keras_class.call(self, inputs)
        step = ops.convert_to_tensor(self.output_range_updates)  # before this call's update
        times = self.quantization_times()

        def ranged(name, tensor):
            return self.intermediate(name, tensor, training, step, times)

        x = ops.cast(inputs, "float32")
        normalized = ranged("normalized", x * normalization.inverse_deviation(x, [-1], self.epsilon, ranged))
        scale = _weight_quantization.quantized_tensor(
            self, lambda: ops.cast(ops.convert_to_tensor(self.scale), "float32"), normalization.PARAMETER_SPEC,
            step, times)
        outputs = track_and_quantize(
            normalized * ops.cast(scale, "float32"),
            (self.output_range_min, self.output_range_max, self.output_range_updates),
            self.output_quant_spec, momentum=0.99, update=bool(training), times=times, step=step)
        return ops.cast(outputs, self.compute_dtype)


class _RotaryAttentionCall(IntegerAttention):
    """Mixin of the twins of keras-hub's `LlamaAttention` and `CachedMistralAttention`:
    `tfopt.layers.MultiHeadAttention`'s integer
    attention (`tfopt.layers.attention.IntegerAttention`: one FULLY_CONNECTED for the
    three projections, a range per product, LiteRT's softmax range) with

    - grouped-query heads: the key and value kernels are repeated per query head group
      (keras-hub repeats the projected keys and values; the product is the same), so the
      file has no op for it;
    - rotary position embeddings from integer positions: `x * cos + swap(x) * sin`, the
      halves of `x` swapped by SPLIT + CONCATENATION and the sign of rotate-half folded
      into the sin table. The cos and sin tables (`ROTARY_POSITIONS` rows when the layer
      builds, from keras-hub's own rotary layer) are constants fake-quantized as weights
      are (8-bit symmetric per tensor), sliced at the sequence length, so the file holds int8 tables and a SLICE: no float RANGE,
      COS or SIN (measured, TF 2.21: computed in the graph from the sequence length,
      RANGE's float products, COS and SIN stay float; each table is fake-quantized once
      for the query and the key together, as a second fake-quant op of the same
      constant left both tables float, and so does one table sliced in two layers:
      each layer's tables are a few rows longer than the last's, so that the converter
      does not merge them); ranges `<part>_cos`, `<part>_sin`, `rotary_<part>` for the
      query and the key;
    - dropout on the context, where keras-hub applies it;
    - Mistral's sliding window: a band mask from integer positions (`sliding_window=`,
      passed by the decoder twin).

    It computes whole sequences: keras-hub's key/value cache is refused."""

    INTERMEDIATE_RANGES = IntegerAttention.INTERMEDIATE_RANGES + (
        "query_cos", "query_sin", "rotary_query", "key_cos", "key_sin", "rotary_key")
    use_bias = False  # keras-hub's Llama projections have no bias

    def build(self, inputs_shape):
        self.keras_class.build(self, inputs_shape)
        if self.output_quant_spec is not None:
            self.add_quantization_ranges()
            dim = int(self.projection_kernel("query").shape[-1])
            # Each layer's tables differ in length (a few rows more): the converter merges equal
            # constants, and a fake-quantized table sliced in two layers stays float (measured).
            self._rotary_positions = ROTARY_POSITIONS
            rows = ROTARY_POSITIONS + next(_TABLE_IDS) % 256
            cos, sin = _keras_internal.rotary_cos_sin(self.rotary_embedding_layer, rows, dim)
            sin = np.concatenate([-sin[:, : dim // 2], sin[:, dim // 2:]], axis=-1)  # rotate-half's sign
            self._rotary_tables = {"cos": cos, "sin": sin}

    def projection_kernel(self, part):
        kernel = _keras_internal.attention_projection(self, part).kernel
        groups, _ = _keras_internal.grouped_query_attention(self)
        if part in ("key", "value") and groups > 1:
            return ops.repeat(kernel, groups, axis=1)  # as keras-hub repeats the heads
        return kernel

    def project(self, inputs, training, step, times):
        projected = super().project(inputs, training, step, times)
        steps, positions = projected["query"].shape[1], self._rotary_positions
        if steps is not None and steps > positions:
            raise ValueError(
                f"Layer '{self.name}' ({type(self).__name__}) holds rotary tables for {positions} "
                f"positions; it got a sequence of {steps}. Fix: set "
                "tfopt.adapters.keras_hub_quantization.ROTARY_POSITIONS to at least the longest sequence "
                "before tfopt.quantize_model, or compute longer sequences with the float model.")
        steps = ops.shape(projected["query"])[1] if steps is None else steps
        dim = int(projected["query"].shape[-1])

        def table(name):
            # Quantized as a norm's scale is; once for the query and the key (module docstring).
            full = _weight_quantization.quantized_tensor(
                self, lambda: ops.convert_to_tensor(self._rotary_tables[name]), normalization.PARAMETER_SPEC,
                step, times)
            return ops.reshape(ops.slice(full, (0, 0), (steps, dim)), (1, steps, 1, dim))

        cos, sin = table("cos"), table("sin")
        for part in ("query", "key"):
            first, second = ops.split(projected[part], 2, axis=-1)
            swapped = ops.concatenate([second, first], axis=-1)
            rotated = (self.intermediate(f"{part}_cos", projected[part] * cos, training, step, times)
                       + self.intermediate(f"{part}_sin", swapped * sin, training, step, times))
            projected[part] = self.intermediate(f"rotary_{part}", rotated, training, step, times)
        return projected

    def call(self, hidden_states, attention_mask=None, cache=None, cache_update_index=None, training=None,
             use_causal_mask=False, sliding_window=None):
        if self.output_quant_spec is None:
            return self.keras_class.call(self, hidden_states, attention_mask=attention_mask, cache=cache,
                                         cache_update_index=cache_update_index, training=training)
        if cache is not None or cache_update_index is not None:
            raise ValueError(
                f"Layer '{self.name}' ({type(self).__name__}) computes whole sequences; it got a key/value "
                f"cache (cache={'a tensor' if cache is not None else None}, "
                f"cache_update_index={cache_update_index!r}). Fix: generate step by step with the float "
                "model (tfopt.strip(model)), or export it (tfopt.export / tfopt.export_generator).")
        step = ops.convert_to_tensor(self.output_range_updates)  # before this call's update
        times = self.quantization_times()
        x = hidden_states
        projected = self.project({"query": x, "key": x, "value": x}, training, step, times)
        mask = self._mask(x, x, attention_mask, use_causal_mask, (None, None))
        if sliding_window is not None:
            # Mistral's band: query i sees keys j with i - j < window (integer positions).
            steps = ops.shape(x)[1]
            gap = ops.expand_dims(ops.arange(steps), -1) - ops.expand_dims(ops.arange(steps), 0)
            band = ops.expand_dims(ops.expand_dims(ops.less(gap, sliding_window), 0), 0)
            mask = band if mask is None else ops.logical_and(mask, band)
        dropout = None
        if _keras_internal.grouped_query_attention(self)[1] > 0.0:
            dropout = next(sub for sub in _keras_internal.all_layers(self)
                           if geometry.role(sub) == geometry.PASS_THROUGH)
        output, _ = self.attend(projected, mask, training, step, times, context_dropout=dropout)
        return output


_LLAMA_DECODER_ARGUMENTS = (
    "intermediate_dim", "num_query_heads", "num_key_value_heads", "rope_max_wavelength",
    "rope_position_scaling_factor", "rope_frequency_adjustment_factor", "rope_low_freq_factor",
    "rope_high_freq_factor", "rope_pretraining_sequence_length", "layer_norm_epsilon", "dropout")


def _llama_decoder_config(layer):
    """The `__init__` arguments of keras-hub's LlamaTransformerDecoder `layer`, from its
    attributes (its own `get_config` raises: it reads `rope_scaling_factor`, which it
    never sets)."""
    config = keras.layers.Layer.get_config(layer)
    config.update({key: getattr(layer, key) for key in _LLAMA_DECODER_ARGUMENTS})
    config["activation"] = keras.activations.serialize(layer.activation)
    config["kernel_initializer"] = keras.initializers.serialize(layer.kernel_initializer)
    return config


def _rotary_decoder_twin(decoder, attention_type, norm_type):
    """The quantization-aware twin of keras-hub's Llama or Mistral decoder block `decoder`,
    built from the twins of its attention and RMS norm."""
    from keras_hub.src.layers.modeling.transformer_layer_utils import merge_padding_and_attention_mask

    # The attention's arguments the block holds under the same names (rope settings, heads,
    # Mistral's sliding window and head size).
    attention_arguments = [name for name in inspect.signature(attention_type.keras_class.__init__).parameters
                           if name not in ("self", "kwargs", "kernel_initializer")]
    family = decoder.__name__[: -len("TransformerDecoder")]

    class QuantizedRotaryDecoder(_QuantizedBlock, QuantizingLayer, decoder):
        __doc__ = f"""keras-hub's `{decoder.__name__}` ({family}'s block), quantization-aware.

        Takes {decoder.__name__}'s arguments plus `quantization_aware=`
        (required). Its sublayers are twins under keras-hub's names, in its
        order: the RMS norms, the attention (grouped-query, rotary; causal
        mask, and Mistral's sliding window, from integer positions;
        `_RotaryAttentionCall`), the SwiGLU feed-forward's three Dense layers;
        ranges on the residual sums, the SiLU of the gate and the gated
        product. It computes whole sequences: the key/value cache of
        step-by-step generation is refused.
        """

        RANGES = ("self_attention_residual", "feedforward_activation", "feedforward_gated",
                  "feedforward_residual")

        def build(self, decoder_sequence_shape):
            self._decoder_sequence_shape = decoder_sequence_shape
            self.hidden_dim = hidden = decoder_sequence_shape[-1]
            q = self.quantization_aware
            initializer = keras.initializers.get(keras.initializers.serialize(self.kernel_initializer))
            self._self_attention_layer = attention_type(
                **{name: getattr(self, name) for name in attention_arguments if hasattr(self, name)},
                kernel_initializer=initializer, dtype=self.dtype_policy, quantization_aware=q,
                name="self_attention")
            self._self_attention_layer.build(decoder_sequence_shape)
            self._self_attention_layernorm = norm_type(
                epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, quantization_aware=q,
                name="self_attention_layernorm")
            self._self_attention_layernorm.build(decoder_sequence_shape)
            self._self_attention_dropout = keras.layers.Dropout(self.dropout, name="self_attention_dropout")
            wide = tuple(decoder_sequence_shape[:-1]) + (self.intermediate_dim,)
            for attr, units, shape, name in (
                    ("_feedforward_intermediate_dense", self.intermediate_dim, decoder_sequence_shape,
                     "feedforward_intermediate_dense"),
                    ("_feedforward_gate_dense", self.intermediate_dim, decoder_sequence_shape,
                     "feedforward_gate_dense"),
                    ("_feedforward_output_dense", hidden, wide, "feedforward_output_dense")):
                dense = tfopt_layers.Dense(units, name=name, kernel_initializer=initializer, use_bias=False,
                                           dtype=self.dtype_policy, quantization_aware=q)
                dense.build(shape)
                setattr(self, attr, dense)
            self._feedforward_layernorm = norm_type(
                epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, quantization_aware=q,
                name="feedforward_layernorm")
            self._feedforward_layernorm.build(decoder_sequence_shape)
            self.ranges = {name: QuantizeActivation(name=f"{name}_quantize") for name in self.RANGES}
            for layer in self.ranges.values():
                layer.build(decoder_sequence_shape)
            self.built = True

        def call(self, decoder_sequence, decoder_padding_mask=None, decoder_attention_mask=None,
                 self_attention_cache=None, self_attention_cache_update_index=None, training=None):
            if self_attention_cache is not None or self_attention_cache_update_index is not None:
                raise ValueError(
                    f"Layer '{self.name}' ({type(self).__name__}) computes whole sequences; it got a "
                    "self_attention_cache. Fix: generate step by step with the float model "
                    "(tfopt.strip(model)), or export it (tfopt.export / tfopt.export_generator).")
            # The causal part (and Mistral's band) is the attention twin's, from integer positions
            # (keras-hub's, from a float RANGE, would stay float in the file).
            mask = merge_padding_and_attention_mask(decoder_sequence, decoder_padding_mask, decoder_attention_mask)
            ranges = self.ranges
            residual = decoder_sequence
            x = self._self_attention_layernorm(decoder_sequence, training=training)
            x = self._self_attention_layer(x, attention_mask=mask, training=training, use_causal_mask=True,
                                           sliding_window=getattr(self, "sliding_window", None))
            x = self._self_attention_dropout(x, training=training)
            x = ranges["self_attention_residual"](x + residual, training=training)
            residual = x
            x = self._feedforward_layernorm(x, training=training)
            # The activation (SiLU) as ops of its own, between two ranges.
            gate = ranges["feedforward_activation"](
                self.activation(self._feedforward_gate_dense(x, training=training)), training=training)
            x = ranges["feedforward_gated"](self._feedforward_intermediate_dense(x, training=training) * gate,
                                             training=training)
            x = self._feedforward_output_dense(x, training=training)
            return ranges["feedforward_residual"](x + residual, training=training)

        def _quantized_sublayers(self):
            # The parent's order: attention, its norm, the three Dense, the last norm.
            return [self._self_attention_layer, self._self_attention_layernorm,
                    self._feedforward_intermediate_dense, self._feedforward_gate_dense,
                    self._feedforward_output_dense, self._feedforward_layernorm]

    if family == "Llama":
        # keras-hub's LlamaTransformerDecoder.get_config raises (it reads attributes it never sets).
        QuantizedRotaryDecoder.source_config = staticmethod(_llama_decoder_config)
        QuantizedRotaryDecoder.get_config = lambda self: {**_llama_decoder_config(self),
                                                          "quantization_aware": self.quantization_aware}
    QuantizedRotaryDecoder.__name__ = QuantizedRotaryDecoder.__qualname__ = f"Quantized{family}Decoder"
    QuantizedRotaryDecoder.__module__ = __name__
    return keras.saving.register_keras_serializable(package="tfopt")(QuantizedRotaryDecoder)


def __getattr__(name):
    if name in ("QuantizedTransformerEncoder", "QuantizedTransformerDecoder"):
        import keras_hub  # lazy: keras-hub is an optional dependency

        block = name[len("Quantized"):]
        return register()[getattr(keras_hub.layers, block)]
    if name in ("QuantizedLlamaDecoder", "QuantizedMistralDecoder"):
        return next(t for t in register().values() if t.__name__ == name)
    raise AttributeError(name)
