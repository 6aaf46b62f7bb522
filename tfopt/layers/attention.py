"""tfopt twin of Keras's MultiHeadAttention, quantization-aware.

Under quantization-aware training the twin computes attention itself, from
the kernels of Keras's own EinsumDense sublayers (same weights, same names,
same order), in the ops the LiteRT converter makes int8:

    q, k, v = x @ W + b                    FULLY_CONNECTED (kernels per tensor, as (in, heads * dim))
                                           ranges "query", "key", "value"
    q = q * 1 / sqrt(key_dim)              MUL, range "scaled_query"
    scores = q . k                         BATCH_MATMUL, range "scores"
    probabilities = softmax(scores)        SOFTMAX, LiteRT's fixed int8 range [0, 255/256]
    context = probabilities . v            BATCH_MATMUL, range "context"
    output = context @ W_out + b_out       FULLY_CONNECTED, the layer's output range

Measured (TF 2.21): projections written as Keras writes them (an einsum to
`(batch, steps, heads, dim)`) leave the bias ADD in float, and several
projections of one input tensor (self-attention: query, key and value all
read it) are fused by the converter into one float FULLY_CONNECTED. So each
kernel is read as a 2-D `(in, heads * dim)` matrix, and projections of the
same input run as one matrix product of their kernels side by side (one
per-tensor weight range, one output range spanning the three tracked
ones), split after it. A fake-quant after the softmax with any range other
than LiteRT's fixed output scale (1/256, zero point -128) adds a requantize
op; the twin uses that range.

The math is `IntegerAttention`'s, which the twins of keras-hub's Llama and
Mistral attention layers share (`tfopt/adapters/keras_hub_quantization.py`:
rotary position embeddings and grouped-query heads added to it).

With quantization off the twin is exactly `keras.layers.MultiHeadAttention`.
The quantization-aware form supports what transformer encoders use: inputs
`(batch, steps, features)`, attention over the steps (default
`attention_axes`), `attention_mask=` and `use_causal_mask=`, dropout on the
attention probabilities, `return_attention_scores=`; `use_gate=True`,
`sliding_window`, other attention axes and a multi-axis `output_shape` are
refused when the layer builds (`tfopt.quantize_model` leaves such layers
float, with a warning). Keras masks carried by the inputs (an
`Embedding(mask_zero=True)` before the layer) apply as in Keras.
"""

import math

import keras
from keras import ops

from tfopt import _keras_internal, geometry, quantizers
from tfopt.layers import _weight_quantization
from tfopt.layers.base import twin
from tfopt.layers.core import times_kernel
from tfopt.layers.quantize_activation import add_range_weights, track_and_quantize, when_started

__all__ = ["MultiHeadAttention", "IntegerAttention", "unsupported_reason"]

# TFLite's int8 SOFTMAX writes scale 1/256, zero point -128: [0, 255/256] on 8 bits.
_SOFTMAX_RANGE = (0.0, 255.0 / 256.0)
_PARTS = ("query", "key", "value")


def unsupported_reason(layer):
    """Why the quantization-aware form cannot compute `layer` (a Keras
    MultiHeadAttention), or None: from its arguments, and from the shapes of
    its inputs where it was called in a graph."""
    try:
        ranks = {len(t.shape) for t in keras.tree.flatten(layer.input)}
    except (AttributeError, ValueError):  # not called in a graph, or called more than once
        ranks = set()
    if ranks - {3}:
        return f"inputs of rank {sorted(ranks)} (only (batch, steps, features))"
    if getattr(layer, "use_gate", False) or layer.get_config().get("use_gate"):
        return "use_gate=True (a gated attention output)"
    if layer.get_config().get("sliding_window") is not None:
        return f"sliding_window={layer.get_config()['sliding_window']!r}"
    axes = layer.get_config().get("attention_axes")
    if axes is not None and tuple(axes) not in ((1,), (-2,)):
        return f"attention_axes={axes!r} (only attention over the steps of (batch, steps, features) inputs)"
    shape = layer.get_config().get("output_shape")
    if shape is not None and not isinstance(shape, int) and len(tuple(shape)) != 1:
        return f"output_shape={shape!r} (only one output axis)"
    return None


class IntegerAttention:
    """The attention math of the quantization-aware twins (module docstring), for
    a layer whose projections are EinsumDense sublayers read through
    `_keras_internal.attention_projection` (kernels `(in, heads, dim)` and
    `(heads, dim, out)`): Keras's MultiHeadAttention (`IntegerAttentionCall`)
    and keras-hub's Llama attention (`tfopt/adapters/keras_hub_quantization.py`).
    The layer provides `use_bias`, `output_quant_spec`, the ranges named in
    `INTERMEDIATE_RANGES` and its output range; it may override
    `projection_kernel` (grouped-query attention repeats the key and value
    heads there) and `project` (rotary position embeddings), and calls
    `project` then `attend`."""

    INTERMEDIATE_RANGES = ("query", "key", "value", "scaled_query", "scores", "context")

    def add_quantization_ranges(self):
        """Adds the output range and `INTERMEDIATE_RANGES`, held by a sublayer
        `quantization_ranges`: call it after the projections are built, so that
        `weights` lists the parent's own first, in its order, then the ranges.
        (Attributes of this layer would be tracked as its own variables, listed first.)"""
        holder = keras.layers.Layer(name="quantization_ranges")
        holder.output_ranges = add_range_weights(holder, prefix="output_")
        holder.intermediate_ranges = {name: add_range_weights(holder, prefix=f"{name}_")
                                      for name in self.INTERMEDIATE_RANGES}
        holder.built = True
        self.quantization_ranges = holder

    # The ranges `tfopt.layers.Prunable` reads, held by `quantization_ranges`.
    output_range_min = property(lambda self: self.quantization_ranges.output_ranges[0])
    output_range_max = property(lambda self: self.quantization_ranges.output_ranges[1])
    output_range_updates = property(lambda self: self.quantization_ranges.output_ranges[2])
    _intermediate_ranges = property(lambda self: self.quantization_ranges.intermediate_ranges)

    def project(self, inputs, training, step, times):
        """`{part: (batch, steps, heads, dim)}` for the "query", "key" and "value"
        tensors of `inputs`. Projections of one input tensor run as one product
        (module docstring). (Rotary position embeddings extend this.)"""
        groups = []
        for part in _PARTS:
            for group in groups:
                if inputs[group[0]] is inputs[part]:
                    group.append(part)
                    break
            else:
                groups.append([part])
        projected = {}
        for group in groups:
            projected.update(self._project(group, inputs[group[0]], training, step, times))
        return projected

    def attend(self, projected, mask, training, step, times, probabilities_dropout=None, context_dropout=None):
        """`(output, probabilities)`: scaled dot-product attention over `projected`
        (from `project`) with the boolean `mask` (None, or broadcastable to
        `(batch, heads, steps_q, steps_v)`), then the output projection and the
        layer's output range. The dropouts (layers or None) apply to the
        probabilities, as Keras does, or to the context, as keras-hub's Llama does."""
        head_dim = int(self.projection_kernel("query").shape[-1])
        scale = 1.0 / math.sqrt(float(head_dim))
        q = self.intermediate("scaled_query", projected["query"] * ops.cast(scale, projected["query"].dtype),
                              training, step, times)
        k, v = projected["key"], projected["value"]
        scores = self.intermediate("scores", ops.einsum("aecd,abcd->acbe", k, q), training, step, times)
        if mask is not None:
            scores = ops.where(mask, scores, ops.cast(-1e9, scores.dtype))
        probabilities = ops.softmax(scores, axis=-1)
        probabilities = when_started(step, times, lambda: quantizers.quantize_activation(
            probabilities, *_SOFTMAX_RANGE, quantizers.QuantSpec(8)), probabilities)
        kept = probabilities if probabilities_dropout is None else probabilities_dropout(
            probabilities, training=training)
        context = self.intermediate("context", ops.einsum("acbe,aecd->abcd", kept, v), training, step, times)
        if context_dropout is not None:
            context = context_dropout(context, training=training)
        output = self._output(context, step, times)
        output = track_and_quantize(
            output, (self.output_range_min, self.output_range_max, self.output_range_updates),
            self.output_quant_spec, momentum=0.99, update=bool(training), times=times, step=step)
        return output, probabilities

    def projection_kernel(self, part):
        """The kernel of projection `part`: `(in, heads, dim)`, or `(heads, dim, out)`
        for "output"."""
        return _keras_internal.attention_projection(self, part).kernel
    # --- the parts ------------------------------------------------------------------
    def _float_kernel(self, part):
        """The kernel of projection `part` as a 2-D float32 matrix: `(in, heads * dim)`,
        or `(heads * dim, out)` for the output projection."""
        kernel = self.projection_kernel(part)
        rows = kernel.shape[0] if part != "output" else kernel.shape[0] * kernel.shape[1]
        return ops.reshape(ops.cast(ops.convert_to_tensor(kernel), "float32"), (int(rows), -1))

    def _kernel(self, parts, step, times):
        """The kernels of projections `parts` side by side, fake-quantized per tensor."""
        spec = quantizers.QuantSpec(**{**self.weight_quant_spec.get_config(), "per_channel": False})
        return _weight_quantization.quantized_tensor(
            self, lambda: ops.concatenate([self._float_kernel(p) for p in parts], axis=-1), spec, step, times)

    def _bias(self, part):
        """The bias of projection `part`, flat, or zeros where it has none."""
        dense = _keras_internal.attention_projection(self, part)
        bias = getattr(dense, "bias", None)
        if bias is None:
            return ops.zeros((int(self._float_kernel(part).shape[-1]),), self.compute_dtype)
        return ops.reshape(ops.cast(ops.convert_to_tensor(bias), self.compute_dtype), (-1,))

    def _project(self, parts, x, training, step, times):
        """`{part: (batch, steps, heads, dim)}` for projections `parts` of the one input `x`."""
        heads_dims = [tuple(self.projection_kernel(p).shape)[1:] for p in parts]
        widths = [heads * dim for heads, dim in heads_dims]
        splits = [sum(widths[:i + 1]) for i in range(len(widths) - 1)]
        y = times_kernel(x, self._kernel(parts, step, times))
        if self.use_bias:
            y = y + ops.concatenate([self._bias(part) for part in parts], axis=-1)
        if len(parts) == 1:
            pieces = [self.intermediate(parts[0], y, training, step, times)]
        else:
            y = self._quantize_together(y, ops.split(y, splits, axis=-1), parts, training, step, times)
            pieces = ops.split(y, splits, axis=-1)
        steps = x.shape[1] if x.shape[1] is not None else ops.shape(x)[1]
        return {part: ops.reshape(piece, (-1, steps, heads, dim))
                for part, piece, (heads, dim) in zip(parts, pieces, heads_dims)}

    def _quantize_together(self, y, pieces, parts, training, step, times):
        """`y` fake-quantized to the union of the ranges of `parts` (each
        tracked on its own piece), as one tensor needs one range."""
        ranges = [self._intermediate_ranges[part] for part in parts]
        lo, hi = ops.convert_to_tensor(0.0), ops.convert_to_tensor(1e-6)  # TFLite needs 0 inside the range
        for range_min, range_max, _ in ranges:
            lo, hi = ops.minimum(lo, ops.convert_to_tensor(range_min)), ops.maximum(hi, ops.convert_to_tensor(range_max))
        first = ops.equal(ops.convert_to_tensor(ranges[0][2]), 0)
        spec = self.output_quant_spec
        out = when_started(step, times, lambda: quantizers.quantize_activation(y, lo, hi, spec), y)
        if training:
            out = ops.cond(first, lambda: y, lambda: out)  # the first batch sets the ranges
            for part, piece in zip(parts, pieces):
                self.intermediate(part, piece, training, step, times)  # the range updates only
        return out

    def _output(self, context, step, times):
        steps = context.shape[1] if context.shape[1] is not None else ops.shape(context)[1]
        flat = ops.reshape(context, (-1, steps, int(context.shape[2]) * int(context.shape[3])))
        y = times_kernel(flat, self._kernel(["output"], step, times))
        return y + self._bias("output") if self.use_bias else y

    def _mask(self, query, value, attention_mask, use_causal_mask, step_masks, query_mask=None):
        """A boolean `(batch, heads, steps_q, steps_v)`-broadcastable mask, or None,
        as Keras's: `value_mask`/`key_mask` `(batch, steps_v)`, the query's Keras
        mask `(batch, steps_q)`, `attention_mask`, the causal mask."""
        mask = None if attention_mask is None else ops.cast(attention_mask, "bool")
        if query_mask is not None:
            query_mask = ops.expand_dims(ops.cast(query_mask, "bool"), -1)  # (batch, steps_q, 1)
            mask = query_mask if mask is None else ops.logical_and(mask, query_mask)
        for step_mask in step_masks:
            if step_mask is not None:
                step_mask = ops.expand_dims(ops.cast(step_mask, "bool"), 1)  # (batch, 1, steps_v)
                mask = step_mask if mask is None else ops.logical_and(mask, step_mask)
        if use_causal_mask:
            steps_q, steps_v = ops.shape(query)[1], ops.shape(value)[1]
            row = ops.expand_dims(ops.arange(steps_q), -1)
            col = ops.expand_dims(ops.arange(steps_v), 0)
            causal = ops.expand_dims(ops.greater_equal(row, col), 0)
            mask = causal if mask is None else ops.logical_and(mask, causal)
        return None if mask is None else ops.expand_dims(mask, 1)  # the heads axis



class IntegerAttentionCall(IntegerAttention):
    """Mixin of the MultiHeadAttention twin: the quantization-aware forward
    pass in the ops LiteRT runs in int8 (module docstring)."""

    @staticmethod
    def quantization_unsupported(layer):
        """Why this twin cannot quantize `layer`, or None (read by `tfopt.quantize_model`)."""
        return unsupported_reason(layer)

    def build(self, query_shape, value_shape, key_shape=None):
        where = f"Layer '{self.name}' ({type(self).__name__})"
        if self.pruning_schedule is not None:
            raise ValueError(
                f"{where} got pruning_schedule={self.pruning_schedule!r}, but MultiHeadAttention is pruned "
                "through its projections (EinsumDense layers): `tfopt.prune` prunes them, and "
                "`tfopt.shrink` removes whole heads. Fix: leave pruning_schedule off for this layer.")
        if self.output_quant_spec is not None:
            reason = unsupported_reason(self)
            if reason is None and len(query_shape) != 3:
                reason = f"inputs of shape {tuple(query_shape)} (only (batch, steps, features))"
            if reason is not None:
                raise ValueError(
                    f"{where} got quantization_aware={self.quantization_aware!r}, but its quantization-aware "
                    f"form does not compute {reason}. Fix: leave quantization_aware off for it (with "
                    "`tfopt.quantize_model`, such a layer stays float with a range after it).")
        keras.layers.MultiHeadAttention.build(self, query_shape, value_shape, key_shape)
        if self.output_quant_spec is not None:
            self.add_quantization_ranges()

    def call(self, query, value, key=None, query_mask=None, value_mask=None, key_mask=None, attention_mask=None,
             return_attention_scores=False, training=None, use_causal_mask=False):
        if self.output_quant_spec is None:
            return keras.layers.MultiHeadAttention.call(
                self, query, value, key=key, query_mask=query_mask, value_mask=value_mask, key_mask=key_mask,
                attention_mask=attention_mask, return_attention_scores=return_attention_scores,
                training=training, use_causal_mask=use_causal_mask)
        step = ops.convert_to_tensor(self.output_range_updates)  # before this call's update
        times = self.quantization_times()
        key = value if key is None else key
        projected = self.project({"query": query, "key": key, "value": value}, training, step, times)
        # Keras reads the query's mask from the tensor (the argument is overwritten).
        query_mask = _keras_internal.keras_mask(query)
        mask = self._mask(query, value, attention_mask, use_causal_mask, (value_mask, key_mask), query_mask)
        dropout = None
        if self.dropout > 0.0:
            dropout = next(sub for sub in _keras_internal.all_layers(self)
                           if geometry.role(sub) == geometry.PASS_THROUGH)
        output, probabilities = self.attend(projected, mask, training, step, times, probabilities_dropout=dropout)
        if return_attention_scores:
            return output, probabilities
        return output


MultiHeadAttention = twin(keras.layers.MultiHeadAttention, doc="""Drop-in `keras.layers.MultiHeadAttention` that is quantization-aware.

    Takes every argument of `keras.layers.MultiHeadAttention`, plus
    `quantization_aware=` (see `tfopt.layers.Prunable`). With
    `quantization_aware` it computes attention in the ops LiteRT runs in
    int8, from the kernels of its own projection sublayers (fake-quantized
    per tensor) with a range tracked in training for each product
    (`tfopt/layers/attention.py` says which, and what it supports), so that
    `tfopt.export(..., precision="int8")` writes it full integer without
    `representative_data`. `tfopt.quantize_model` puts it in place of
    MultiHeadAttention. Without `quantization_aware` it computes exactly what
    Keras computes. Its projections are pruned as EinsumDense layers
    (`tfopt.prune`), not through `pruning_schedule=`.

    Example:
    >>> import keras, numpy as np, tfopt
    >>> x = np.random.default_rng(0).normal(size=(4, 5, 8)).astype("float32")
    >>> layer = tfopt.layers.MultiHeadAttention(2, 4, quantization_aware="int8")
    >>> _ = layer(x, x, training=True)  # the first batch sets the ranges
    >>> tuple(layer(x, x).shape)
    (4, 5, 8)
    >>> [w.name for w in layer.weights][:3]
    ['kernel', 'bias', 'kernel']
    """, module=__name__, mixin=IntegerAttentionCall)
