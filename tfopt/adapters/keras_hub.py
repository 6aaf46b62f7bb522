"""`tfopt.shrink` for keras-hub transformers: whole blocks, feed-forward units, attention heads, hidden width.

keras-hub's backbones (`GPT2Backbone`, `BertBackbone`, `LlamaBackbone`,
`MistralBackbone`, `GemmaBackbone`) and the causal LMs around them are
Functional models whose transformer blocks are opaque custom layers, so
`tfopt.channel_groups` cannot see through them. This module knows those
blocks (the one place in tfopt that reads their sublayer attributes) and
shrinks the model the way the config can say it: fewer blocks (`num_layers`),
fewer feed-forward units (`intermediate_dim`), fewer attention heads where the
config has a `head_dim` (Mistral, Gemma), fewer residual-stream channels
(`hidden_dim`). The result is the same keras-hub class built from the smaller
config, with the kept weights copied in, so it saves, loads and generates like
any keras-hub model.

Importance:

- a block: 1 - the cosine similarity between its input and output hidden
  states, averaged over the calibration tokens (ShortGPT, Minitron): a block
  that barely turns the hidden state does little. Needs `data`.
- a feed-forward unit: the mean |activation| over the calibration tokens
  (what the down projection reads; Minitron), or, without `data`, the summed
  squares of the weights that make and read it.
- an attention head (a key-value group under grouped-query attention): the
  mean |activation| of its slice of the attention output projection's input
  (the context vectors its query heads hand on) over the calibration tokens,
  or, without `data`, the summed squares of its query, key, value and output
  weights.
- a residual-stream (hidden) channel: its mean |activation| over the
  calibration tokens at the embedding output and at every block's output
  (Minitron), or, without `data`, the summed squares of its token-embedding
  column plus those of every norm's scale at it (each term over its mean).

Removing blocks, units and heads is exact: the result computes what the
model computes with the removed blocks skipped and the removed units and
heads zeroed (`plan.masked()`). Removing hidden channels (`hidden=`) is not:
every norm then averages over fewer channels. tfopt multiplies each norm's
scale by sqrt(hidden_dim before / after) and divides RMSNorm's epsilon by the
kept share, which makes a norm over the kept channels give what it gave over
all of them when the removed channels carried nothing: RMSNorm models
(Mistral, Gemma) then compute what `plan.masked()` computes (the removed
channels zeroed in every weight that reads or writes them) to float rounding,
and LayerNorm models (GPT-2, BERT) only approximately, since the mean over the
kept channels is not the mean over all of them. Channels that did carry
something are lost: recover by distillation from the original (the Minitron
recipe, `tfopt.distillation`). Where the config derives the head size from
hidden_dim (GPT-2, BERT: hidden_dim // num_heads), each head loses
hidden / num_heads dimensions too (so `hidden` counts in multiples of
num_heads): query/key dimensions by the product of their query and key column
norms, value/output dimensions by the mean |context| (or the value column
norm) times the output row norm; the query is scaled by
sqrt(head size after / before), so the softmax's 1/sqrt(head size) gives the
kept dimensions the scores they had. Mistral and Gemma have `head_dim` in
their config: their heads keep their size (Mistral's `head_dim=None` becomes
the number it meant). Gemma multiplies the token embedding by
sqrt(hidden_dim): its (tied) embedding is scaled by sqrt(before / after) so
the blocks receive what they did. Llama's config has no `head_dim`, and its
rotary embedding spreads the rotation frequencies over the head size: smaller
heads would turn every kept pair of dimensions at another frequency, so
`hidden=` is refused for Llama.

keras-hub stays optional: it is imported only when a keras-hub model arrives.

Example:

>>> import numpy as np, pytest, tfopt
>>> keras_hub = pytest.importorskip("keras_hub")  # keras-hub is optional
>>> lm = keras_hub.models.GPT2CausalLM(keras_hub.models.GPT2Backbone(
...     vocabulary_size=64, num_layers=3, num_heads=2, hidden_dim=32, intermediate_dim=64,
...     max_sequence_length=16))
>>> tokens = np.random.default_rng(0).integers(1, 64, (4, 16))
>>> small = tfopt.shrink(lm, 0.5, depth=1, hidden=0.25, data=tokens)
>>> type(small).__name__, small.backbone.num_layers, small.backbone.intermediate_dim, small.backbone.hidden_dim
('GPT2CausalLM', 2, 32, 24)
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
    weights by the name of the layer holding them, each with the head axis of its kernel; the axis
    of the query/key/value kernels that reads the hidden state; the config keys."""

    attention: str
    axes: tuple  # ((sublayer name, head axis), ...): query, key, value, output
    input_axis: int = 0
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
    attention: where its heads are (`_Heads`).
    units_per_dim: `intermediate_dim` per unit (Gemma's config counts gate and up: 2).
    heads: None where the config can hold fewer heads, else the reason it cannot.
    hidden: None where the config can hold a smaller hidden_dim, else the reason it cannot.
    head_size_key: the config key that divides hidden_dim into the head size, where the config
        derives the head size from hidden_dim (GPT-2, BERT): a smaller hidden_dim means smaller heads.
    norm_offset: what the norms add to their scale (Gemma's RMSNormalization computes x * (1 + scale)).
    embedding_scaled: the backbone multiplies the token embedding by sqrt(hidden_dim) (Gemma).
    """

    up: tuple
    down: str
    mask_argument: str
    attention: _Heads
    units_per_dim: int = 1
    heads: object = None
    hidden: object = None
    head_size_key: object = None
    norm_offset: float = 0.0
    embedding_scaled: bool = False


_NO_HEAD_DIM = ("{backbone} derives the head size as hidden_dim // {key}, so fewer heads of the same size "
                "cannot be written in its config")
_NO_HIDDEN_ROPE = (
    "{backbone} derives the head size as hidden_dim // num_query_heads and has no head_dim in its config, so a "
    "smaller hidden_dim means smaller heads, and its rotary position embedding then turns each remaining pair of "
    "head dimensions at another frequency (the frequencies are spread over the head size): the attention scores "
    "of every head would change, not just lose the removed channels")
_GATED = ("feedforward_intermediate_dense", "feedforward_gate_dense")
_QKVO = (("query", 1), ("key", 1), ("value", 1), ("attention_output", 0))
_BLOCKS = {  # by the names of the sublayers (their weights' paths say them too)
    "TransformerDecoder": _Block(("feedforward_intermediate_dense",), "feedforward_", "decoder_padding_mask",
                                 _Heads("self_attention", _QKVO, query_key="num_heads", kv_key="num_heads"),
                                 heads=_NO_HEAD_DIM, head_size_key="num_heads"),
    "TransformerEncoder": _Block(("feedforward_intermediate_dense",), "feedforward_", "padding_mask",
                                 _Heads("self_attention_layer", _QKVO, query_key="num_heads", kv_key="num_heads"),
                                 heads=_NO_HEAD_DIM, head_size_key="num_heads"),
    "LlamaTransformerDecoder": _Block(_GATED, "feedforward_", "decoder_padding_mask", _Heads("self_attention", _QKVO),
                                      heads=_NO_HEAD_DIM, hidden=_NO_HIDDEN_ROPE),
    "MistralTransformerDecoder": _Block(_GATED, "feedforward_", "decoder_padding_mask",
                                        _Heads("self_attention", _QKVO)),
    "GemmaDecoderBlock": _Block(("ffw_gating", "ffw_gating_2"), "ffw_linear", "padding_mask",
                                _Heads("attention", (("query", 0), ("key", 0), ("value", 0), ("attention_output", 0)),
                                       input_axis=1),
                                units_per_dim=2, norm_offset=1.0, embedding_scaled=True),
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
    return {"depth": "blocks", "heads": "key-value head groups per block",
            "hidden": "residual-stream channels (hidden_dim)"}.get(what, "units")


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
    """Stands in for one of a block's layers while `_recording` runs: passes its input on,
    adding up |input| over the tokens that count, per everything after (batch, sequence):
    per feed-forward unit for a down projection, per (head, head dimension) for an attention
    output projection."""

    def __init__(self, layer):
        self.layer = layer
        self.sums = 0.0
        self.tokens = 0
        self.mask = None

    def __call__(self, x, *args, **kwargs):
        value = np.abs(ops.convert_to_numpy(x).astype("float64"))
        a = value.reshape(-1, *value.shape[2:])
        keep = self.mask.reshape(-1) > 0
        self.sums = self.sums + a[keep].sum(axis=0)
        self.tokens += int(keep.sum())
        return self.layer(x, *args, **kwargs)

    def mean(self):
        return np.asarray(self.sums) / max(self.tokens, 1)


@contextlib.contextmanager
def _recording(places):
    """Within it, each `(owner, attribute)` of `places` holds a `_Recorder` of its layer (eager
    calls only); each owner gets its own layer back on exit, whatever happens. (A copy of the block
    would leave the user's model alone, but some keras-hub blocks cannot be re-created
    from their config: LlamaTransformerDecoder.get_config reads an attribute it never sets.)"""
    recorders = [_Recorder(getattr(owner, attribute)) for owner, attribute in places]
    try:
        for (owner, attribute), recorder in zip(places, recorders):
            setattr(owner, attribute, recorder)
        yield recorders
    finally:
        for (owner, attribute), recorder in zip(places, recorders):
            setattr(owner, attribute, recorder.layer)


def _cosine(a, b, mask):
    """Sum over the tokens that count of cos(a, b), and how many there are."""
    a, b = a.astype("float64"), b.astype("float64")
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)
    keep = mask > 0
    return float(cos[keep].sum()), int(keep.sum())


@dataclasses.dataclass
class _Calibration:
    """What `_calibrate` measured on the calibration tokens."""

    blocks: np.ndarray  # per block: 1 - mean cosine similarity of its input and output
    units: list  # per block: mean |activation| per feed-forward unit (None if not recorded)
    contexts: list  # per block: mean |context| per (query head, head dimension)
    hidden: np.ndarray  # per residual-stream channel: mean |activation| of the embedding and block outputs


def _calibrate(backbone, blocks, spec, batches, units):
    """Runs `batches` through the blocks one by one, recording what `_Calibration` holds
    (each block's feed-forward units only with `units`)."""
    first = blocks[0].input
    embed = keras.Model(backbone.input, first[0] if isinstance(first, (list, tuple)) else first)
    cosines, tokens = np.zeros(len(blocks)), np.zeros(len(blocks))
    hidden_sums, hidden_tokens = 0.0, 0
    places = []
    for block in blocks:
        attention = _sublayer(block, spec.attention.attention)
        places.append((attention, _attribute(attention, "attention_output")))
    if units:
        places += [(block, _attribute(block, spec.down, spec.up)) for block in blocks]
    with _recording(places) as recorders:
        for batch in batches:
            mask = batch["padding_mask"]
            keep = mask.reshape(-1) > 0
            for recorder in recorders:
                recorder.mask = mask
            hidden = ops.convert_to_numpy(embed(batch, training=False))
            for i, block in enumerate(blocks):
                hidden_sums = hidden_sums + np.abs(hidden.astype("float64")).reshape(-1, hidden.shape[-1])[keep].sum(0)
                hidden_tokens += int(keep.sum())
                out = ops.convert_to_numpy(block(hidden, **{spec.mask_argument: mask}, training=False))
                c, n = _cosine(hidden, out, mask)
                cosines[i] += c
                tokens[i] += n
                hidden = out
            hidden_sums = hidden_sums + np.abs(hidden.astype("float64")).reshape(-1, hidden.shape[-1])[keep].sum(0)
            hidden_tokens += int(keep.sum())
    return _Calibration(
        blocks=1.0 - cosines / np.maximum(tokens, 1),
        units=[r.mean() for r in recorders[len(blocks):]] if units else None,
        contexts=[r.mean() for r in recorders[:len(blocks)]],
        hidden=np.asarray(hidden_sums) / max(hidden_tokens, 1))


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
    """`[(variable, axis)]`: every attention weight with a head axis (a query/key/value bias of
    shape (heads, head size) included)."""
    attention = _sublayer(block, spec.attention.attention)
    cuts = []
    for name, axis in spec.attention.axes:
        weights = _sublayer_weights(attention, name)
        kernel = [v for v in weights if v.name == "kernel"][0]
        for v in weights:
            shifted = axis - (len(kernel.shape) - len(v.shape))  # a bias has the kernel's trailing axes
            if shifted >= 0 and len(v.shape) >= 2:
                cuts.append((v, shifted))
    return cuts


def _block_hidden_cuts(block, spec, hidden_dim):
    """`[(variable, axis, role)]`: every weight of `block` with a residual-stream axis. role: "read"
    (query/key/value and feed-forward up kernels), "write" (the attention and feed-forward output
    kernels and biases), "scale" or "shift" (a norm's)."""
    att = spec.attention
    qkv = {name for name, _ in att.axes[:3]}
    output = att.axes[3][0]
    down = _sublayer(block, spec.down, spec.up).name
    cuts = []
    for v in block.weights:
        parent, name = v.path.split("/")[-2:]
        if parent in qkv or parent in spec.up:
            if name == "kernel":
                cuts.append((v, att.input_axis if parent in qkv else 0, "read"))
        elif parent in (output, down):
            cuts.append((v, len(v.shape) - 1, "write"))
        elif len(v.shape) == 1 and v.shape[0] == hidden_dim:
            cuts.append((v, 0, "scale" if name in ("gamma", "scale") else "shift"))
        else:
            raise TypeError(
                f"`tfopt.shrink(hidden=...)`: block '{block.name}' ({type(block).__name__}) holds weight "
                f"'{v.path}' of shape {tuple(v.shape)}, which is not one of the float weights this keras-hub "
                "version's block had (query/key/value, attention output, feed-forward, norms). Fix: shrink the "
                "float model before quantizing it or enabling LoRA; otherwise use the keras-hub version tfopt "
                "was checked on (0.32), and report the one you have.")
    return cuts


def _outer_hidden_cuts(backbone, layer, hidden_dim):
    """`[(variable, axis, role)]` of a backbone layer outside the blocks: "embed" (a token, position or
    segment embedding's columns), "read", "write", "scale", "shift"."""
    cuts = []
    dense = any(w.name == "kernel" and len(w.shape) == 2 for w in layer.weights)  # BERT's pooler
    for v in layer.weights:
        name = v.path.split("/")[-1]
        if name == "reverse_embeddings":
            cuts.append((v, 0, "read"))
        elif name == "embeddings" and len(v.shape) == 2:
            cuts.append((v, 1, "embed"))
        elif dense and name == "kernel" and len(v.shape) == 2:
            cuts += [(v, 0, "read"), (v, 1, "write")]  # BERT's pooler: hidden_dim in and out
        elif len(v.shape) == 1 and v.shape[0] == hidden_dim:
            role = "write" if dense else (
                "scale" if name in ("gamma", "scale") else "shift")
            cuts.append((v, 0, role))
        else:
            raise TypeError(
                f"`tfopt.shrink(hidden=...)`: layer '{layer.name}' ({type(layer).__name__}) of backbone "
                f"'{backbone.name}' holds weight '{v.path}' of shape {tuple(v.shape)}, which tfopt does not know "
                "how to cut to a smaller hidden_dim. Fix: use the keras-hub version tfopt was checked on (0.32), "
                "and report the one you have.")
    return cuts


def _per_head_dim_squares(attention, name, axis):
    """Summed squares of sublayer `name`'s kernel and bias per (head, head dimension); `axis` is the
    kernel's head axis, the head dimension the next."""
    total = 0.0
    for v in _sublayer_weights(attention, name):
        value = np.square(ops.convert_to_numpy(v).astype("float64"))
        if v.name == "kernel":
            at = axis
        elif value.ndim >= 2:
            at = value.ndim - 2  # a bias of shape (heads, head size)
        else:
            continue
        others = tuple(a for a in range(value.ndim) if a not in (at, at + 1))
        total = total + value.sum(axis=others)
    return total


def _cut(value, axis, keep, cut):
    """`value` with the slices `keep` leaves out along `axis` removed (`cut`) or zeroed. A 2-D `keep`
    (heads, head size) reads `axis` and the next as heads and their dimensions (each head keeps as many)."""
    if keep.ndim == 2:
        shape = value.shape
        merged = _cut(value.reshape(*shape[:axis], -1, *shape[axis + 2:]), axis, keep.reshape(-1), cut)
        return merged.reshape(*shape[:axis], keep.shape[0], -1, *shape[axis + 2:])
    if cut:
        return np.compress(keep, value, axis=axis)
    shape = [1] * value.ndim
    shape[axis] = len(keep)
    return value * keep.reshape(shape).astype(value.dtype)


def _l2(cuts, units):
    scores = np.zeros(units)
    for v, axis in cuts:
        value = np.square(ops.convert_to_numpy(v).astype("float64"))
        scores += value.sum(axis=tuple(a for a in range(value.ndim) if a != axis)) if value.ndim > 1 else value
    return scores


def _zeroed(backbone, blocks, spec, name):
    """`(unit_keep, head_keep)` as `plan` takes them: each block's feed-forward units and (where the config
    can have fewer heads) key-value groups whose every weight is zero, as `WidthPruning` leaves them; None
    for an axis where nothing is zero. Every block must have lost as many (the config has one count)."""
    config = backbone.get_config()
    units = config["intermediate_dim"] // spec.units_per_dim
    unit_keep = [_l2(_ffn_cuts(block, spec), units) > 0 for block in blocks]
    head_keep = None
    if spec.heads is None:
        groups = config[spec.attention.kv_key]
        per_group = config[spec.attention.query_key] // groups
        head_keep = []
        for block in blocks:
            head_keep.append(np.repeat(_group_l2(block, spec, groups) > 0, per_group))
    found = []
    for what, keeps in (("feed-forward units", unit_keep), ("key-value head groups", head_keep)):
        if keeps is None or all(keep.all() for keep in keeps):
            found.append(None)
            continue
        counts = [int((~keep).sum()) for keep in keeps]
        if len(set(counts)) > 1 or any(keep.sum() == 0 for keep in keeps):
            raise ValueError(
                f"`tfopt.shrink` of keras-hub model {name}: its blocks have {counts} {what} zeroed, and its config "
                f"holds one count for every block{' (and keeps at least one)' if min(k.sum() for k in keeps) == 0 else ''}"
                ". Fix: prune every block alike (tfopt.callbacks.WidthPruning does), or pass fraction=/heads= to "
                "choose by importance.")
        found.append(keeps)
    return found[0], found[1]


def _group_l2(block, spec, groups):
    """Per key-value group of `block`: the summed squares of its query, key, value and output weights."""
    scores = np.zeros(groups)
    for v, axis in _head_cuts(block, spec):
        scores += _l2([(v, axis)], v.shape[axis]).reshape(groups, -1).sum(axis=1)
    return scores


def _lowest(scores, count):
    """Indices of the `count` lowest scores (ties: the first), as a boolean keep mask."""
    keep = np.ones(len(scores), bool)
    keep[sorted(range(len(scores)), key=lambda i: (scores[i], i))[:count]] = False
    return keep


class KerasHubShrinkPlan:
    """Which blocks, feed-forward units, attention heads and hidden channels `tfopt.shrink` removes
    from a keras-hub model.

    Made by `tfopt.plan_shrink` for a keras-hub Backbone or CausalLM;
    `apply()` builds the smaller model (the same keras-hub class), `masked()`
    the same-size model with the removed units, heads and hidden channels set
    to zero (every block kept), and `removed` says what goes.

    Attributes:
        removed_blocks: indices of the blocks removed, in order.
        block_scores: each block's 1 - mean cosine similarity of its input and
            output on `data` (None without `data`).
        removed_channels: indices of the residual-stream (hidden) channels
            removed, in order (empty without `hidden=`).
        hidden_scores: each residual-stream channel's importance (mean
            |activation| on `data`, else weight magnitude; None without `hidden=`).
    """

    def __init__(self, model, backbone, blocks, spec, removed_blocks, block_scores, unit_keep, head_keep,
                 hidden_keep=None, head_dim_keep=None, hidden_scores=None):
        self.model = model
        self._backbone = backbone
        self._blocks = blocks
        self._spec = spec
        self.removed_blocks = sorted(removed_blocks)
        self.block_scores = block_scores
        self._unit_keep = unit_keep
        self._head_keep = head_keep
        self._hidden_keep = hidden_keep
        self._head_dim_keep = head_dim_keep  # per block: (query/key keep, value/output keep), (heads, head size)
        self.removed_channels = [] if hidden_keep is None else np.flatnonzero(~hidden_keep).tolist()
        self.hidden_scores = hidden_scores

    @property
    def removed(self):
        """`{block name: "removed"}` for removed blocks, `{block name: {"units": (before, after),
        "heads": (before, after), "head_size": (before, after)}}` for blocks that lose units, heads or
        head dimensions, and `{backbone name: {"hidden": (before, after)}}` when hidden channels go."""
        out = {}
        if self._hidden_keep is not None and not self._hidden_keep.all():
            out[self._backbone.name] = {"hidden": (len(self._hidden_keep), int(self._hidden_keep.sum()))}
        for i, block in enumerate(self._blocks):
            if i in self.removed_blocks:
                out[block.name] = "removed"
                continue
            lost = {}
            if self._unit_keep is not None and not self._unit_keep[i].all():
                lost["units"] = (len(self._unit_keep[i]), int(self._unit_keep[i].sum()))
            if self._head_keep is not None and not self._head_keep[i].all():
                lost["heads"] = (len(self._head_keep[i]), int(self._head_keep[i].sum()))
            if self._head_dim_keep is not None:
                qk = self._head_dim_keep[i][0]
                lost["head_size"] = (qk.shape[1], int(qk[0].sum()))
            if lost:
                out[block.name] = lost
        return out

    def _hidden_factor(self):
        """sqrt(hidden_dim before / after): what the norms' scales are multiplied by, so that a norm
        over fewer channels gives what it gave over all of them when the removed ones carried nothing."""
        return float(np.sqrt(len(self._hidden_keep) / self._hidden_keep.sum()))

    def _scale(self, factor):
        offset = self._spec.norm_offset
        return lambda value: ((value + offset) * factor - offset).astype(value.dtype)

    def _keeps(self, i):
        """`{id(variable): [(axis, keep), ...]}` of block `i`'s weights that lose slices, and
        `{id(variable): function}` of those `apply()` rescales."""
        block, spec, keeps, factors = self._blocks[i], self._spec, {}, {}
        if self._unit_keep is not None:
            for v, axis in _ffn_cuts(block, spec):
                keeps.setdefault(id(v), []).append((axis, self._unit_keep[i]))
        if self._head_keep is not None:
            for v, axis in _head_cuts(block, spec):
                heads = v.shape[axis]
                keeps.setdefault(id(v), []).append(
                    (axis, self._head_keep[i] if heads == len(self._head_keep[i]) else self._kv_keep(i)))
        if self._hidden_keep is not None:
            for v, axis, role in _block_hidden_cuts(block, spec, len(self._hidden_keep)):
                keeps.setdefault(id(v), []).append((axis, self._hidden_keep))
                if role == "scale":
                    factors[id(v)] = self._scale(self._hidden_factor())
        if self._head_dim_keep is not None:
            query_key, value_output = self._head_dim_keep[i]
            names = [name for name, _ in spec.attention.axes]
            attention = _sublayer(block, spec.attention.attention)
            for v, axis in _head_cuts(block, spec):
                parent = v.path.split("/")[-2]
                keeps.setdefault(id(v), []).append((axis, query_key if parent in names[:2] else value_output))
            # The softmax scale is 1 / sqrt(head size): the query keeps the smaller heads' scores as they were.
            factor = float(np.sqrt(query_key[0].sum() / query_key.shape[1]))
            for v in _sublayer_weights(attention, names[0]):
                factors[id(v)] = lambda value, f=factor: (value * f).astype(value.dtype)
        return keeps, factors

    def _outer_keeps(self, layer):
        """`_keeps` of a backbone layer outside the blocks (embeddings, norms, BERT's pooler)."""
        keeps, factors = {}, {}
        if self._hidden_keep is None:
            return keeps, factors
        factor = self._hidden_factor()
        embedding = self._backbone.token_embedding
        tied_and_scaled = self._spec.embedding_scaled and getattr(embedding, "tie_weights", False)
        for v, axis, role in _outer_hidden_cuts(self._backbone, layer, len(self._hidden_keep)):
            keeps.setdefault(id(v), []).append((axis, self._hidden_keep))
            if role == "scale":
                # Gemma: the tied embedding grows by `factor` (below), and so do the logits it makes.
                factors[id(v)] = self._scale(1.0 if tied_and_scaled else factor)
            elif role == "embed" and self._spec.embedding_scaled and layer is embedding:
                # Gemma multiplies the embedding by sqrt(hidden_dim): keep what the blocks receive.
                factors[id(v)] = lambda value, f=factor: (value * f).astype(value.dtype)
        return keeps, factors

    def _kv_keep(self, i):
        keep = self._head_keep[i]
        config = self._backbone.get_config()
        groups = config[self._spec.attention.kv_key]
        return keep.reshape(groups, -1).all(axis=1)

    @staticmethod
    def _values(weights, keeps, factors, cut):
        values = []
        for v in weights:
            value = ops.convert_to_numpy(v)
            for axis, keep in keeps.get(id(v), ()):
                value = _cut(value, axis, keep, cut)
            if cut and id(v) in factors:
                value = factors[id(v)](value)
            values.append(value)
        return values

    def _block_values(self, i, cut):
        return self._values(self._blocks[i].weights, *self._keeps(i), cut)

    def apply(self):
        """The smaller model: the same keras-hub class, built from the backbone's config with fewer
        `num_layers`, `intermediate_dim`, heads or `hidden_dim`, the kept weights copied in (not compiled)."""
        return self._build(cut=True)

    def masked(self):
        """The model, same size and every block kept, with the removed feed-forward units, heads and
        hidden channels set to zero in every weight that reads or writes them (what `apply()` computes,
        but for the blocks it removes; with `hidden=`, only approximately: see `tfopt.shrink`)."""
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
                config[spec.attention.query_key] = int(self._head_keep[0].sum())
                config[spec.attention.kv_key] = int(self._kv_keep(0).sum())
                config["head_dim"] = self._head_dim()
            if self._hidden_keep is not None:
                config["hidden_dim"] = int(self._hidden_keep.sum())
                if config.get("layer_norm_epsilon"):  # RMSNorm: eps as it was, next to a mean over fewer channels
                    config["layer_norm_epsilon"] /= float(self._hidden_keep.mean())
                if "head_dim" in config:  # Mistral's None meant hidden_dim // num_query_heads: keep the head size
                    config["head_dim"] = self._head_dim()
        new = type(backbone).from_config(config)
        block_ids = {id(b) for b in blocks}
        for layer in backbone.layers:
            if id(layer) not in block_ids and layer.weights:
                _graph.set_cut_weights(new.get_layer(layer.name), self._values(layer.weights, *self._outer_keeps(layer),
                                                                               cut),
                                       f"layer '{layer.name}' ({type(layer).__name__})", "the model's config")
        for j, i in enumerate(kept):
            _graph.set_cut_weights(new.transformer_layers[j], self._block_values(i, cut),
                                   f"block '{blocks[i].name}' ({type(blocks[i]).__name__})", "the model's config")
        if cut:  # a teacher frozen for distillation: its student is to be trained (as for plain Keras models)
            new.trainable = True
        if self.model is backbone:
            return new
        return type(self.model)(backbone=new, preprocessor=getattr(self.model, "preprocessor", None))

    def _head_dim(self):
        config = self._backbone.get_config()
        if config.get("head_dim"):
            return config["head_dim"]
        return config["hidden_dim"] // config[self._spec.attention.query_key]


def _hidden_count(hidden, spec, config, name):
    """`hidden=` as a count of residual-stream channels; where the head size is hidden_dim // heads,
    a multiple of the number of heads (each head loses as many dimensions)."""
    total = config["hidden_dim"]
    count = _count(hidden, "hidden", total, keep_one=True)
    if spec.head_size_key is None:
        return count
    heads = config[spec.head_size_key]
    if isinstance(python_number(hidden), int):
        if count % heads or count > total - heads:
            raise ValueError(
                f"`tfopt.shrink(hidden={hidden!r})`: model {name} derives its head size as hidden_dim // "
                f"{spec.head_size_key} ({total} // {heads}), so each of its {heads} heads loses hidden / {heads} "
                f"dimensions: hidden= must be a multiple of {heads} below {total}. Received: hidden={hidden!r}. "
                f"Fix: e.g. hidden={heads * max(total // heads // 4, 1)}, or a share such as hidden=0.25 "
                "(rounded to a multiple).")
        return count
    return min(heads * int(round(count / heads)), total - heads)


def _hidden_l2(backbone, blocks, spec, hidden_dim):
    """Each residual-stream channel's weight importance without `data`: the summed squares of its
    token-embedding column plus those of every norm's (effective) scale, each term over its mean."""
    table = ops.convert_to_numpy(backbone.token_embedding.embeddings)
    embedding = np.zeros(hidden_dim)
    for start in range(0, len(table), 4096):  # a large vocabulary's table is not copied whole as float64
        embedding += np.square(table[start:start + 4096].astype("float64")).sum(0)
    norms = np.zeros(hidden_dim)
    cuts = [c for b in blocks for c in _block_hidden_cuts(b, spec, hidden_dim)]
    cuts += [c for layer in backbone.layers if layer.weights and not any(layer is b for b in blocks)
             for c in _outer_hidden_cuts(backbone, layer, hidden_dim)]
    for v, _, role in cuts:
        if role == "scale":
            norms += np.square(ops.convert_to_numpy(v).astype("float64") + spec.norm_offset)
    return embedding / max(embedding.mean(), 1e-30) + norms / max(norms.mean(), 1e-30)


def _head_dim_keeps(blocks, spec, count, heads, contexts):
    """Per block, which dimensions of each head stay when each head loses `count`: query/key
    dimensions by the product of their query and key column norms, value/output dimensions by the
    mean |context| (with `data`; else the value column norm) times the output row norm."""
    names = [name for name, _ in spec.attention.axes]
    axes = dict(spec.attention.axes)
    keeps = []
    for i, block in enumerate(blocks):
        attention = _sublayer(block, spec.attention.attention)
        q, k, v, o = (np.sqrt(_per_head_dim_squares(attention, n, axes[n])) for n in names)
        query_key = q * k
        value_output = (contexts[i] if contexts is not None else v) * o
        keeps.append((np.stack([_lowest(query_key[h], count) for h in range(heads)]),
                      np.stack([_lowest(value_output[h], count) for h in range(heads)])))
    return keeps


def plan(model, fraction=None, depth=None, heads=None, data=None, min_channels=1, hidden=None, **others):
    """The `KerasHubShrinkPlan` of `tfopt.plan_shrink` for a keras-hub model (see `tfopt.shrink` and
    this module's docstring: what each of `fraction`, `depth`, `heads` and `hidden` removes, how it is
    scored, and why `hidden` is not exact).

    `others`: `plan_shrink`'s arguments for plain Keras models (`scope`,
    `importance`, `loss`, `layers`), refused unless left at their defaults.

    Example:

    >>> import numpy as np, pytest, tfopt
    >>> keras_hub = pytest.importorskip("keras_hub")  # keras-hub is optional
    >>> lm = keras_hub.models.GemmaCausalLM(keras_hub.models.GemmaBackbone(
    ...     vocabulary_size=64, num_layers=2, num_query_heads=4, num_key_value_heads=2, head_dim=8,
    ...     hidden_dim=32, intermediate_dim=64))
    >>> plan = tfopt.plan_shrink(lm, hidden=8, heads=1, data=np.ones((2, 8), "int32"))
    >>> plan.removed["gemma_backbone"], plan.removed["decoder_block_0"], len(plan.removed_channels)
    ({'hidden': (32, 24)}, {'heads': (4, 2)}, 8)
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
    if fraction is None and depth is None and heads is None and hidden is None:
        # The units and key-value groups pruning already zeroed (tfopt.callbacks.WidthPruning, then strip).
        unit_keep, head_keep = _zeroed(backbone, blocks, spec, name)
        if unit_keep is None and head_keep is None:
            raise ValueError(
                f"`tfopt.shrink` of keras-hub model {name} needs what to remove: fraction= (the share of each "
                "block's feed-forward units), depth= (blocks), heads= or hidden= (residual-stream channels), or "
                "units and heads zeroed by tfopt.callbacks.WidthPruning. Received: none of them, and no "
                "feed-forward unit or head group is zero in every block. Fix: e.g. tfopt.shrink(model, 0.25), "
                "or tfopt.shrink(model, depth=2, data=token_batches).")
        return KerasHubShrinkPlan(model, backbone, blocks, spec, [], None, unit_keep, head_keep, None, None, None)
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
    if heads is not None and spec.heads is None and config.get("query_head_dim_normalize") is False:
        raise ValueError(
            f"`tfopt.shrink(heads={heads!r})`: model {name} scales its queries by hidden_dim // num_query_heads "
            "(query_head_dim_normalize=False), which fewer heads would change. Fix: leave heads=None and shrink "
            "blocks (depth=) and feed-forward units (fraction=) instead.")
    if heads is not None and spec.heads is not None:
        raise ValueError(
            f"`tfopt.shrink(heads={heads!r})`: " + spec.heads.format(
                backbone=type(backbone).__name__,
                key="num_query_heads" if "num_query_heads" in config else "num_heads")
            + f" (model {name}). Fix: leave heads=None and shrink blocks (depth=) and feed-forward units "
            "(fraction=) instead.")
    if hidden is not None and spec.hidden is not None:
        raise ValueError(
            f"`tfopt.shrink(hidden={hidden!r})`: " + spec.hidden.format(backbone=type(backbone).__name__)
            + f" (model {name}). Fix: leave hidden=None and shrink blocks (depth=), feed-forward units "
            "(fraction=) and key-value heads where the config allows; or rebuild the weights as a MistralBackbone "
            "(the same blocks, with a head_dim in its config) and shrink that.")
    hidden_count = _hidden_count(hidden, spec, config, name) if hidden is not None else 0
    if hidden is not None and not hidden_count and python_number(hidden):
        log.warning("tfopt.shrink(hidden=%r) of model %s removes no channel: the share rounds to 0 of its %d%s. "
                    "Pass a larger share or a count.", hidden, name, config["hidden_dim"],
                    f" (in multiples of {spec.head_size_key}={config[spec.head_size_key]})"
                    if spec.head_size_key else "")
    batches = _batches(backbone, data, name) if data is not None else None
    units = config["intermediate_dim"] // spec.units_per_dim
    calibration = _calibrate(backbone, blocks, spec, batches, units if fraction else 0) if batches else None
    block_scores = calibration.blocks if calibration else None
    if depth is not None and removed_count:
        removed_blocks = list(np.flatnonzero(~_lowest(block_scores, removed_count)))
    unit_keep = None
    if fraction:
        count = min(int(round(fraction * units)), max(units - min_channels, 0))
        unit_keep = [_lowest(calibration.units[i] if calibration else _l2(_ffn_cuts(b, spec), units), count)
                     for i, b in enumerate(blocks)]
    head_keep = None
    if heads is not None:
        groups = config[spec.attention.kv_key]
        per_group = config[spec.attention.query_key] // groups
        count = _count(heads, "heads", groups, keep_one=True)
        if count:
            head_keep = []
            for i, block in enumerate(blocks):
                if calibration:  # mean |context| each query head hands the output projection
                    scores = calibration.contexts[i].mean(axis=-1).reshape(groups, -1).sum(axis=1)
                else:
                    scores = _group_l2(block, spec, groups)
                head_keep.append(np.repeat(_lowest(scores, count), per_group))
    hidden_keep = head_dim_keep = hidden_scores = None
    if hidden_count:
        hidden_dim = config["hidden_dim"]
        hidden_scores = calibration.hidden if calibration else _hidden_l2(backbone, blocks, spec, hidden_dim)
        hidden_keep = _lowest(hidden_scores, hidden_count)
        if spec.head_size_key is not None:
            n = config[spec.head_size_key]
            head_dim_keep = _head_dim_keeps(blocks, spec, hidden_count // n, n,
                                            calibration.contexts if calibration else None)
    return KerasHubShrinkPlan(model, backbone, blocks, spec, [int(i) for i in removed_blocks], block_scores,
                              unit_keep, head_keep, hidden_keep, head_dim_keep, hidden_scores)
