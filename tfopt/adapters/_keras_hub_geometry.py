"""keras-hub's layers for `tfopt.macs` / `tfopt.summary`, and the width groups of their blocks.

`tfopt.adapters.keras_hub` knows keras-hub's transformer blocks for
`tfopt.shrink`; this module reads the same knowledge for the rest of tfopt:

- multiply-adds (registered with `tfopt.geometry.register_macs` the first time
  a keras-hub model is counted): a block counts every projection kernel once
  per token (query, key and value with their real shapes, grouped-query
  attention included; the output projection; the feed-forward up, gate and down
  kernels), the attention scores and weighted sum (`2 x query heads x head size
  x tokens^2`, as `MultiHeadAttention` counts them) and its norms (their scale
  once per token, as `LayerNormalization` counts); embeddings are lookups (0);
  `ReversibleEmbedding(reverse=True)`, the tied LM head, `hidden x vocabulary`
  per token. The sequence axis of a keras-hub model is open (None), so counts
  need `tfopt.macs(model, sequence_length=...)`.
- the feed-forward units and key-value head groups of each block, as
  `(variable, axis)` slices, for `tfopt.callbacks.WidthPruning`.
"""

import keras
import numpy as np

from tfopt import _keras_internal, geometry
from tfopt.adapters import keras_hub as _hub

__all__ = ["register_model", "block_macs", "width_groups"]

_REGISTERED = set()  # layer types registered here


def _positions(shape):
    """Tokens (positions) of a shape `(batch, ..., features)`, or None if one is open."""
    return geometry._product(shape[1:-1])


def _kernel(layer):
    """The projection kernel of `layer` (a Dense, an EinsumDense: its geometry's "kernel"), or None."""
    return next((v for spec, v in geometry.weights_of(layer) if spec.path == "kernel"), None)


def _kernels(layer):
    """The sublayers of `layer` holding a projection kernel, in its own order."""
    return [sub for sub in _keras_internal.all_layers(layer) if _kernel(sub) is not None]


def _norm_scale(layer):
    """For a normalization layer (only vector weights: scale, gamma, beta), the size of its scale; else None."""
    weights = layer.weights
    if not weights or any(len(v.shape) != 1 for v in weights):
        return None
    scales = [v for v in weights if v.name in ("scale", "gamma")]
    return int(scales[0].shape[0]) if scales else None


def _attention_parts(block):
    """`[(attention layer, query heads, key head size, value head size)]` of `block`: each
    attention sublayer, read from its query and output projections (the output kernel
    is `(heads, head size, hidden)` in every keras-hub block)."""
    out = []
    for sub in _keras_internal.all_layers(block):
        children = {c.name: _kernel(c) for c in _keras_internal.all_layers(sub)}
        if children.get("attention_output") is not None and children.get("query") is not None:
            heads, value_size = tuple(children["attention_output"].shape)[:2]
            key_size = tuple(children["query"].shape)[-1]
            out.append((sub, int(heads), int(key_size), int(value_size)))
    return out


def block_macs(block, input_shapes, output_shapes):
    """`[(block, count), (sublayer, count), ...]`: the multiply-adds of one call of a
    keras-hub transformer block on one example (see the module docstring); `[(block, None)]`
    when its sequence length is open."""
    tokens = _positions(input_shapes[0])
    if tokens is None:
        return [(block, None)]
    parts = []
    for sub in _kernels(block):
        parts.append((sub, tokens * int(np.prod(_kernel(sub).shape))))
    for attention, heads, key_size, value_size in _attention_parts(block):
        parts.append((attention, heads * tokens * tokens * (key_size + value_size)))
    for sub in _keras_internal.all_layers(block):
        scale = None if _kernels(sub) else _norm_scale(sub)
        if scale is not None:
            parts.append((sub, tokens * scale))
    return [(block, sum(count for _, count in parts))] + parts


def _reversible_embedding_macs(layer, input_shapes, output_shapes):
    """A lookup (0), or with `reverse=True` (its input holds features, not ids) the
    projection of each position's hidden state on every embedding: hidden x vocabulary."""
    shape = input_shapes[0]
    if len(shape) != len(output_shapes[0]):  # (batch, seq) ids -> (batch, seq, hidden): a lookup
        return 0
    positions = _positions(shape)
    return None if positions is None else positions * int(shape[-1]) * int(output_shapes[0][-1])


def _norm_macs(layer, input_shapes, output_shapes):
    positions, scale = _positions(input_shapes[0]), _norm_scale(layer)
    return None if positions is None or scale is None else positions * scale


def _zero(layer, input_shapes, output_shapes):
    return 0


def register_model(model):
    """Registers the multiply-add counts of the keras-hub layer types in `model` that tfopt's
    table does not know: transformer blocks, reversible and position embeddings, norms."""
    for layer in _keras_internal.all_layers(model):
        kind = type(layer)
        name = kind.__name__
        if kind in _REGISTERED or isinstance(layer, keras.Model):
            continue
        if name == "ReversibleEmbedding":  # keras-hub's, now keras.layers' (Keras 3.15)
            geometry.register_macs(kind, _reversible_embedding_macs)
        elif not _hub.handles(layer):
            continue
        elif name in _hub._BLOCKS:
            geometry.register_macs(kind, block_macs)
        elif name.endswith("Embedding") and not any(len(v.shape) > 2 for v in layer.weights):
            geometry.register_macs(kind, _zero)  # PositionEmbedding, TokenAndPositionEmbedding, rotary: lookups
        elif _norm_scale(layer) is not None and geometry.of(layer) is None:
            geometry.register_macs(kind, _norm_macs)  # LlamaLayerNorm, RMSNormalization, ...
        else:
            continue
        _REGISTERED.add(kind)


def width_groups(model):
    """The units `WidthPruning` prunes in a keras-hub model, per block: `[(kind, units, slices, per_block)]`
    with `kind` "units" (feed-forward units: up/gate kernel columns and biases, down kernel rows) or
    "heads" (key-value head groups, Mistral and Gemma: the query heads of a group, its key and value
    heads, the output rows of its query heads), `units` their number per block, and `slices` per block
    `[(variable, axis, index)]` where `index[i]` is the unit slice `i` of that axis belongs to.

    Raises TypeError (naming what is supported) for keras-hub models `tfopt.shrink` does not know."""
    backbone, blocks, spec = _hub._backbone(model)
    config = backbone.get_config()
    groups = []
    units = config["intermediate_dim"] // spec.units_per_dim
    per_block = []
    for block in blocks:
        slices = []
        for v, axis in _hub._ffn_cuts(block, spec):
            slices.append((v, axis, np.arange(units)))
        per_block.append(slices)
    groups.append(("units", units, per_block))
    if spec.heads is None and config.get("query_head_dim_normalize") is not False:  # else fewer heads can't be
        kv = config[spec.attention.kv_key]  # written in the config (`spec.heads` says why)
        query = config[spec.attention.query_key]
        per_group = query // kv
        per_block = []
        for block in blocks:
            slices = []
            for v, axis in _hub._head_cuts(block, spec):
                heads = v.shape[axis]
                index = np.arange(heads) // per_group if heads == query else np.arange(heads)
                slices.append((v, axis, index))
            per_block.append(slices)
        groups.append(("heads", kv, per_block))
    return groups
