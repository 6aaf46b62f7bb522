"""`tfopt.shrink` for keras-hub transformers: whole blocks, feed-forward units, attention heads.

keras-hub's backbones (`GPT2Backbone`, `BertBackbone`, `LlamaBackbone`,
`MistralBackbone`, `GemmaBackbone`) and the causal LMs around them are
Functional models whose transformer blocks are opaque custom layers, so
`tfopt.channel_groups` cannot see through them. This module knows those
blocks (the one place in tfopt that reads their sublayer attributes) and
shrinks the model the way the config can say it: fewer blocks (`num_layers`),
fewer feed-forward units (`intermediate_dim`), fewer attention heads where the
config has a `head_dim` (Mistral, Gemma). The result is the same keras-hub
class built from the smaller config, with the kept weights copied in, so it
saves, loads and generates like any keras-hub model.

Importance:

- a block: 1 - the cosine similarity between its input and output hidden
  states, averaged over the calibration tokens (ShortGPT, Minitron): a block
  that barely turns the hidden state does little. Needs `data`.
- a feed-forward unit: the mean |activation| over the calibration tokens
  (what the down projection reads; Minitron), or, without `data`, the summed
  squares of the weights that make and read it.
- an attention head (a key-value group under grouped-query attention): the
  summed squares of its query, key, value and output weights.

keras-hub stays optional: it is imported only when a keras-hub model arrives.

Example:

>>> import numpy as np, pytest, tfopt
>>> keras_hub = pytest.importorskip("keras_hub")  # keras-hub is optional
>>> lm = keras_hub.models.GPT2CausalLM(keras_hub.models.GPT2Backbone(
...     vocabulary_size=64, num_layers=3, num_heads=2, hidden_dim=32, intermediate_dim=64,
...     max_sequence_length=16))
>>> tokens = np.random.default_rng(0).integers(1, 64, (4, 16))
>>> small = tfopt.shrink(lm, 0.5, depth=1, data=tokens)
>>> type(small).__name__, small.backbone.num_layers, small.backbone.intermediate_dim
('GPT2CausalLM', 2, 32)
"""

import contextlib
import dataclasses
import logging

import keras
import numpy as np
from keras import ops

from tfopt._arguments import python_number
from tfopt.transforms import _graph

__all__ = ["handles", "plan", "KerasHubShrinkPlan"]

log = logging.getLogger("tfopt")


@dataclasses.dataclass(frozen=True)
class _Heads:
    """Where a block's attention heads are: the attention sublayer's name, its
    weights by the name of the layer holding them, each with its head axis; the config keys."""

    attention: str
    axes: tuple  # ((sublayer name, head axis), ...): query, key, value, output
    query_key: str = "num_query_heads"
    kv_key: str = "num_key_value_heads"


@dataclasses.dataclass(frozen=True)
class _Block:
    """A keras-hub block type as `shrink` reads it.

    up: the names of the layers making the feed-forward units (kernel's last axis).
    down: the name of the layer reading them (kernel's first axis); a name ending in "_" is a
        prefix: the one sublayer of that prefix with a kernel that is not in `up` (keras-hub's
        blocks: the output projection of their feed-forward part).
    mask_argument: the keyword the backbone passes the padding mask by.
    units_per_dim: `intermediate_dim` per unit (Gemma's config counts gate and up: 2).
    heads: where its heads are, or the reason the config cannot have fewer.
    """

    up: tuple
    down: str
    mask_argument: str
    units_per_dim: int = 1
    heads: object = None


_NO_HEAD_DIM = ("{backbone} derives the head size as hidden_dim // {key}, so fewer heads of the same size "
                "cannot be written in its config")
_GATED = ("feedforward_intermediate_dense", "feedforward_gate_dense")
_BLOCKS = {  # by the names of the sublayers (their weights' paths say them too)
    "TransformerDecoder": _Block(("feedforward_intermediate_dense",), "feedforward_", "decoder_padding_mask",
                                 heads=_NO_HEAD_DIM),
    "TransformerEncoder": _Block(("feedforward_intermediate_dense",), "feedforward_", "padding_mask",
                                 heads=_NO_HEAD_DIM),
    "LlamaTransformerDecoder": _Block(_GATED, "feedforward_", "decoder_padding_mask", heads=_NO_HEAD_DIM),
    "MistralTransformerDecoder": _Block(_GATED, "feedforward_", "decoder_padding_mask", heads=_Heads(
        "self_attention", (("query", 1), ("key", 1), ("value", 1), ("attention_output", 0)))),
    "GemmaDecoderBlock": _Block(("ffw_gating", "ffw_gating_2"), "ffw_linear", "padding_mask", units_per_dim=2,
                                heads=_Heads("attention", (("query", 0), ("key", 0), ("value", 0),
                                                           ("attention_output", 0)))),
}
_KNOWN = "GPT2Backbone, BertBackbone, LlamaBackbone, MistralBackbone, GemmaBackbone (and their CausalLM)"


def handles(model):
    """Whether `model` is a keras-hub model (its class or a base class comes from keras_hub)."""
    return any(c.__module__.split(".")[0] == "keras_hub" for c in type(model).__mro__)


def _backbone(model):
    import keras_hub  # lazy: keras-hub is an optional dependency, and `model` comes from it

    name = f"'{model.name}' ({type(model).__name__})"
    if isinstance(model, keras_hub.models.CausalLM):
        backbone = model.backbone
    elif isinstance(model, keras_hub.models.Backbone):
        backbone = model
    else:
        raise TypeError(
            f"`tfopt.shrink` takes a keras-hub Backbone or CausalLM, and model {name} is another keras-hub "
            "task, whose head tfopt would not know how to rebuild. Fix: shrink its backbone, "
            "small = tfopt.shrink(model.backbone, ...), and build the task around it again.")
    blocks = list(getattr(backbone, "transformer_layers", None) or [])
    kinds = sorted({type(b).__name__ for b in blocks})
    config = backbone.get_config()
    if (not blocks or any(k not in _BLOCKS for k in kinds)
            or any(not handles(b) for b in blocks) or "num_layers" not in config or "intermediate_dim" not in config):
        raise TypeError(
            f"`tfopt.shrink` knows the transformer blocks of {_KNOWN}, and model {name} has blocks of type "
            f"{kinds or 'none it lists in transformer_layers'}. Fix: shrink one of those architectures; for "
            "another, its blocks' feed-forward layers must be added to tfopt.adapters.keras_hub._BLOCKS.")
    if model is not backbone and len(model.weights) != len(backbone.weights):
        raise TypeError(
            f"`tfopt.shrink`: model {name} holds weights outside its backbone "
            f"({len(model.weights) - len(backbone.weights)} of them), which tfopt would not copy. "
            "Fix: shrink model.backbone and build the task around it again.")
    spec = _BLOCKS[kinds[0]]
    for i, block in enumerate(blocks):
        for sublayer in (*spec.up, spec.down):
            for v in _sublayer(block, sublayer, spec.up).weights:
                if v.name not in ("kernel", "bias"):
                    raise ValueError(
                        f"`tfopt.shrink` cuts float kernels, and layer '{block.name}/{_sublayer(block, sublayer, spec.up).name}' "
                        f"of model {name} holds '{v.name}' (a quantized layer, or LoRA). Fix: shrink the float "
                        "model first, then quantize it or enable LoRA.")
    return backbone, blocks, spec


def _attribute(block, name, up=()):
    """The attribute of `block` holding its sublayer called `name` (keras-hub's attribute names are
    private and differ between blocks; the sublayers' names are what their weights' paths say).
    A `name` ending in "_" is a prefix: the one sublayer of that prefix with a kernel not in `up`."""
    found = [attribute for attribute, value in vars(block).items()
             if isinstance(value, keras.layers.Layer) and (
                 value.name == name or name.endswith("_") and value.name.startswith(name) and value.name not in up
                 and any(v.name == "kernel" for v in value.weights))]
    if len(found) == 1:
        return found[0]
    raise TypeError(
        f"`tfopt.shrink`: block '{block.name}' ({type(block).__name__}) has {len(found)} sublayers called "
        f"'{name}{'*' if name.endswith('_') else ''}' (expected one, as this keras-hub version's block had). "
        "Fix: use the keras-hub version tfopt was checked on (0.32), and report the one you have.")


def _sublayer(block, name, up=()):
    return getattr(block, _attribute(block, name, up))


def _count(value, what, total, keep_one):
    """`value` as a count out of `total`: an int, or a share in [0, 1) rounded."""
    value = python_number(value)
    top = total - 1 if keep_one else total
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        ok = False
    elif isinstance(value, int):
        ok = 0 <= value <= top
    else:
        ok = 0.0 <= value < 1.0
    if not ok:
        raise ValueError(
            f"`tfopt.shrink({what}=...)` is how many of the model's {total} {_what_units(what)} to remove: an int "
            f"from 0 to {top}, or a share in [0, 1). Received: {what}={value!r}. Fix: e.g. {what}={max(top // 4, 1)} "
            f"or {what}=0.25.")
    return value if isinstance(value, int) else min(int(round(value * total)), top)


def _what_units(what):
    return {"depth": "blocks", "heads": "key-value head groups per block"}.get(what, "units")


def _batches(backbone, data, name):
    """`data` as a list of dicts of numpy arrays the backbone takes: token ids (an int array, a dict, or a
    preprocessor's `(x, y, sample_weight)`), with padding masks of ones and segment ids of zeros if absent."""
    if isinstance(data, dict) or hasattr(data, "shape") or (
            isinstance(data, tuple) and data and isinstance(data[0], dict)):
        items = [data]
    else:
        items = list(data)
    if not items:
        raise ValueError(f"`tfopt.shrink`: `data` for model {name} is empty. Fix: pass a few batches of token ids.")
    vocabulary = backbone.get_config().get("vocabulary_size")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, (tuple, list)) and item and isinstance(item[0], dict):
            item = item[0]  # a preprocessor's (x, y, sample_weight)
        if not isinstance(item, dict):
            item = {"token_ids": item}
        ids = np.asarray(item["token_ids"]) if "token_ids" in item else None
        if ids is None or ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            received = ("a dict without 'token_ids'" if ids is None
                        else f"an array of dtype {ids.dtype} and shape {ids.shape}")
            raise ValueError(
                f"`tfopt.shrink`: `data` item {i} for model {name} is not token ids (ints of shape (batch, "
                f"sequence)). Received: {received}. Fix: tokenize first, e.g. data=[model.preprocessor(texts)[0]] "
                "or data={'token_ids': ids, 'padding_mask': mask}.")
        if vocabulary is not None and ids.size and (ids.min() < 0 or ids.max() >= vocabulary):
            raise ValueError(
                f"`tfopt.shrink`: `data` item {i} for model {name} holds token ids from {ids.min()} to {ids.max()}, "
                f"and its vocabulary has {vocabulary} (ids 0 to {vocabulary - 1}). Fix: tokenize with this model's "
                "own tokenizer.")
        batch = {"token_ids": ids, "padding_mask": np.asarray(item.get("padding_mask", np.ones_like(ids)))}
        for key in backbone.input:
            if key not in batch:
                batch[key] = np.asarray(item[key]) if key in item else np.zeros_like(ids)
        out.append({key: batch[key] for key in backbone.input})
    return out


class _Recorder:
    """Stands in for a block's down projection while `_recording` runs: passes its
    input on, adding up |input| per feed-forward unit over the tokens that count."""

    def __init__(self, layer, units):
        self.layer = layer
        self.sums = np.zeros(units)
        self.tokens = 0
        self.mask = None

    def __call__(self, x, *args, **kwargs):
        a = np.abs(ops.convert_to_numpy(x).astype("float64")).reshape(-1, x.shape[-1])
        keep = self.mask.reshape(-1) > 0
        self.sums += a[keep].sum(axis=0)
        self.tokens += int(keep.sum())
        return self.layer(x, *args, **kwargs)


@contextlib.contextmanager
def _recording(blocks, spec, units):
    """Within it, each block's down projection is a `_Recorder` (eager calls only); the
    blocks get their own layer back on exit, whatever happens. (A copy of the block
    would leave the user's model alone, but some keras-hub blocks cannot be re-created
    from their config: LlamaTransformerDecoder.get_config reads an attribute it never sets.)"""
    attributes = [_attribute(block, spec.down, spec.up) for block in blocks]
    recorders = [_Recorder(getattr(block, a), units) for block, a in zip(blocks, attributes)]
    try:
        for block, attribute, recorder in zip(blocks, attributes, recorders):
            setattr(block, attribute, recorder)
        yield recorders
    finally:
        for block, attribute, recorder in zip(blocks, attributes, recorders):
            setattr(block, attribute, recorder.layer)


def _cosine(a, b, mask):
    """Sum over the tokens that count of cos(a, b), and how many there are."""
    a, b = a.astype("float64"), b.astype("float64")
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
    keep = mask > 0
    return float(cos[keep].sum()), int(keep.sum())


def _calibrate(backbone, blocks, spec, batches, units):
    """Runs `batches` through the blocks one by one: each block's 1 - mean cosine similarity
    between its input and output, and (with `units`) each block's mean |activation| per unit."""
    first = blocks[0].input
    embed = keras.Model(backbone.input, first[0] if isinstance(first, (list, tuple)) else first)
    cosines, tokens = np.zeros(len(blocks)), np.zeros(len(blocks))
    with (_recording(blocks, spec, units) if units else contextlib.nullcontext([None] * len(blocks))) as recorders:
        for batch in batches:
            mask = batch["padding_mask"]
            hidden = ops.convert_to_numpy(embed(batch, training=False))
            for i, block in enumerate(blocks):
                if recorders[i] is not None:
                    recorders[i].mask = mask
                out = ops.convert_to_numpy(block(hidden, **{spec.mask_argument: mask}, training=False))
                c, n = _cosine(hidden, out, mask)
                cosines[i] += c
                tokens[i] += n
                hidden = out
    block_scores = 1.0 - cosines / np.maximum(tokens, 1)
    unit_scores = [r.sums / max(r.tokens, 1) for r in recorders] if units else None
    return block_scores, unit_scores


def _ffn_cuts(block, spec):
    """`[(variable, axis)]`: every feed-forward weight and the axis of its units."""
    cuts = []
    for name in spec.up:
        for v in _sublayer(block, name).weights:
            cuts.append((v, len(v.shape) - 1))
    for v in _sublayer(block, spec.down, spec.up).weights:
        if v.name == "kernel":
            cuts.append((v, 0))
    return cuts


def _sublayer_weights(layer, name):
    return [v for v in layer.weights if v.path.split("/")[-2] == name]


def _head_cuts(block, spec):
    """`[(variable, axis)]`: every attention weight with a head axis."""
    attention = _sublayer(block, spec.heads.attention)
    return [(v, axis) for name, axis in spec.heads.axes for v in _sublayer_weights(attention, name)]


def _l2(cuts, units):
    scores = np.zeros(units)
    for v, axis in cuts:
        value = np.square(ops.convert_to_numpy(v).astype("float64"))
        scores += value.sum(axis=tuple(a for a in range(value.ndim) if a != axis)) if value.ndim > 1 else value
    return scores


def _lowest(scores, count):
    """Indices of the `count` lowest scores (ties: the first), as a boolean keep mask."""
    keep = np.ones(len(scores), bool)
    keep[sorted(range(len(scores)), key=lambda i: (scores[i], i))[:count]] = False
    return keep


class KerasHubShrinkPlan:
    """Which blocks, feed-forward units and attention heads `tfopt.shrink` removes from a keras-hub model.

    Made by `tfopt.plan_shrink` for a keras-hub Backbone or CausalLM;
    `apply()` builds the smaller model (the same keras-hub class), `masked()`
    the same-size model with the removed units and heads set to zero (every
    block kept), and `removed` says what goes.

    Attributes:
        removed_blocks: indices of the blocks removed, in order.
        block_scores: each block's 1 - mean cosine similarity of its input and
            output on `data` (None without `data`).
    """

    def __init__(self, model, backbone, blocks, spec, removed_blocks, block_scores, unit_keep, head_keep):
        self.model = model
        self._backbone = backbone
        self._blocks = blocks
        self._spec = spec
        self.removed_blocks = sorted(removed_blocks)
        self.block_scores = block_scores
        self._unit_keep = unit_keep
        self._head_keep = head_keep

    @property
    def removed(self):
        """`{block name: "removed"}` for removed blocks, `{block name: {"units": (before, after),
        "heads": (before, after)}}` for blocks that lose units or heads."""
        out = {}
        for i, block in enumerate(self._blocks):
            if i in self.removed_blocks:
                out[block.name] = "removed"
                continue
            lost = {}
            if self._unit_keep is not None and not self._unit_keep[i].all():
                lost["units"] = (len(self._unit_keep[i]), int(self._unit_keep[i].sum()))
            if self._head_keep is not None and not self._head_keep[i].all():
                lost["heads"] = (len(self._head_keep[i]), int(self._head_keep[i].sum()))
            if lost:
                out[block.name] = lost
        return out

    def _keeps(self, i):
        """`{id(variable): (axis, keep)}` of block `i`'s weights that lose slices."""
        block, spec, keeps = self._blocks[i], self._spec, {}
        if self._unit_keep is not None:
            for v, axis in _ffn_cuts(block, spec):
                keeps[id(v)] = (axis, self._unit_keep[i])
        if self._head_keep is not None:
            for v, axis in _head_cuts(block, spec):
                heads = v.shape[axis]
                keeps[id(v)] = (axis, self._head_keep[i] if heads == len(self._head_keep[i])
                                else self._kv_keep(i))
        return keeps

    def _kv_keep(self, i):
        keep = self._head_keep[i]
        config = self._backbone.get_config()
        groups = config[self._spec.heads.kv_key]
        return keep.reshape(groups, -1).all(axis=1)

    def _block_values(self, i, cut):
        keeps = self._keeps(i)
        values = []
        for v in self._blocks[i].weights:
            value = ops.convert_to_numpy(v)
            if id(v) in keeps:
                axis, keep = keeps[id(v)]
                if cut:
                    value = np.compress(keep, value, axis=axis)
                else:
                    shape = [1] * value.ndim
                    shape[axis] = len(keep)
                    value = value * keep.reshape(shape).astype(value.dtype)
            values.append(value)
        return values

    def apply(self):
        """The smaller model: the same keras-hub class, built from the backbone's config with fewer
        `num_layers`, `intermediate_dim` or heads, the kept weights copied in (not compiled)."""
        return self._build(cut=True)

    def masked(self):
        """The model, same size and every block kept, with the removed feed-forward units and
        heads set to zero (what `apply()` computes, but for the blocks it removes)."""
        return self._build(cut=False)

    def _build(self, cut):
        backbone, blocks, spec = self._backbone, self._blocks, self._spec
        kept = [i for i in range(len(blocks)) if not cut or i not in self.removed_blocks]
        config = backbone.get_config()
        if cut:
            config["num_layers"] = len(kept)
            if self._unit_keep is not None:
                config["intermediate_dim"] = int(self._unit_keep[0].sum()) * spec.units_per_dim
            if self._head_keep is not None:
                config[spec.heads.query_key] = int(self._head_keep[0].sum())
                config[spec.heads.kv_key] = int(self._kv_keep(0).sum())
                config["head_dim"] = self._head_dim()
        new = type(backbone).from_config(config)
        block_ids = {id(b) for b in blocks}
        for layer in backbone.layers:
            if id(layer) not in block_ids and layer.weights:
                new.get_layer(layer.name).set_weights(layer.get_weights())
        for j, i in enumerate(kept):
            _graph.set_cut_weights(new.transformer_layers[j], self._block_values(i, cut),
                                   f"block '{blocks[i].name}' ({type(blocks[i]).__name__})", "the model's config")
        if self.model is backbone:
            return new
        return type(self.model)(backbone=new, preprocessor=getattr(self.model, "preprocessor", None))

    def _head_dim(self):
        config = self._backbone.get_config()
        if config.get("head_dim"):
            return config["head_dim"]
        return config["hidden_dim"] // config[self._spec.heads.query_key]


def plan(model, fraction=None, depth=None, heads=None, data=None, min_channels=1, **others):
    """The `KerasHubShrinkPlan` of `tfopt.plan_shrink` for a keras-hub model (see `tfopt.shrink`).

    `others`: `plan_shrink`'s arguments for plain Keras models (`scope`,
    `importance`, `loss`, `layers`), refused unless left at their defaults.
    """
    backbone, blocks, spec = _backbone(model)
    name = f"'{model.name}' ({type(model).__name__})"
    defaults = {"scope": "layer", "importance": "l2", "loss": None, "layers": None}
    for key, value in others.items():
        if key not in defaults or (value != defaults[key] if isinstance(value, str) else value is not defaults[key]):
            raise ValueError(
                f"`tfopt.shrink({key}=...)` applies to plain Keras models, not to keras-hub model {name}: its "
                "blocks are scored from `data` (mean |activation| of the feed-forward units, 1 - cosine "
                f"similarity of a block's input and output), or from weight magnitudes without it. Received: "
                f"{key}={value!r}. Fix: leave {key} at its default ({defaults.get(key)!r}).")
    if fraction is None and depth is None and heads is None:
        raise ValueError(
            f"`tfopt.shrink` of keras-hub model {name} needs what to remove: fraction= (the share of each "
            "block's feed-forward units), depth= (blocks) or heads=. Received: none of them. Fix: e.g. "
            "tfopt.shrink(model, 0.25), or tfopt.shrink(model, depth=2, data=token_batches).")
    fraction = python_number(fraction)
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                 or not 0.0 <= fraction < 1.0):
        raise ValueError(
            "`tfopt.shrink(fraction=...)` is the share of each group's channels to remove, a number in "
            f"[0, 1), or None for the units pruning already zeroed. Received: fraction={fraction!r}")
    config = backbone.get_config()
    removed_blocks = []
    if depth is not None:
        removed_count = _count(depth, "depth", len(blocks), keep_one=True)
        if data is None:
            raise ValueError(
                f"`tfopt.shrink(depth={depth!r})` of model {name} scores blocks by how much they change the hidden "
                "state on calibration tokens (1 - cosine similarity of a block's input and output), and needs "
                "`data`. Received: data=None. Fix: pass a few batches of token ids, e.g. data=token_ids[:64] "
                "or data=[model.preprocessor(texts)[0]].")
    if heads is not None and not isinstance(spec.heads, str) and config.get("query_head_dim_normalize") is False:
        raise ValueError(
            f"`tfopt.shrink(heads={heads!r})`: model {name} scales its queries by hidden_dim // num_query_heads "
            "(query_head_dim_normalize=False), which fewer heads would change. Fix: leave heads=None and shrink "
            "blocks (depth=) and feed-forward units (fraction=) instead.")
    if heads is not None and isinstance(spec.heads, str):
        raise ValueError(
            f"`tfopt.shrink(heads={heads!r})`: " + spec.heads.format(
                backbone=type(backbone).__name__,
                key="num_query_heads" if "num_query_heads" in config else "num_heads")
            + f" (model {name}). Fix: leave heads=None and shrink blocks (depth=) and feed-forward units "
            "(fraction=) instead.")
    batches = _batches(backbone, data, name) if data is not None else None
    units = config["intermediate_dim"] // spec.units_per_dim
    block_scores, unit_scores = (None, None)
    if batches is not None:
        block_scores, unit_scores = _calibrate(backbone, blocks, spec, batches, units if fraction else 0)
    if depth is not None and removed_count:
        removed_blocks = list(np.flatnonzero(~_lowest(block_scores, removed_count)))
    unit_keep = None
    if fraction:
        count = min(int(round(fraction * units)), max(units - min_channels, 0))
        unit_keep = [_lowest(unit_scores[i] if unit_scores is not None else _l2(_ffn_cuts(b, spec), units), count)
                     for i, b in enumerate(blocks)]
    head_keep = None
    if heads is not None:
        groups = config[spec.heads.kv_key]
        per_group = config[spec.heads.query_key] // groups
        count = _count(heads, "heads", groups, keep_one=True)
        if count:
            head_keep = []
            for block in blocks:
                cuts = _head_cuts(block, spec)
                scores = np.zeros(groups)
                for v, axis in cuts:
                    per_head = _l2([(v, axis)], v.shape[axis])
                    scores += per_head.reshape(groups, -1).sum(axis=1)
                head_keep.append(np.repeat(_lowest(scores, count), per_group))
    result = KerasHubShrinkPlan(model, backbone, blocks, spec, [int(i) for i in removed_blocks], block_scores,
                                unit_keep, head_keep)
    return result
