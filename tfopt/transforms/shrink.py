"""`shrink`: remove channels, attention heads and feed-forward units, giving a smaller dense model.

Which channels, heads and units go together, and which must stay (those that
reach a model input or output, pass a layer tfopt cannot see through, or are
mixed by a softmax), is `tfopt.channel_groups`'s reading of the graph, the
one `tfopt.callbacks.WidthPruning` prunes by. Here each group is scored and
its lowest units removed: every weight slice that reads or writes a removed
unit is cut (the producing kernel's output slice, the consumers' input
slices, BatchNormalization's statistics, a depthwise kernel's channel). The
shrunk model computes exactly what the model computes with those slices set
to zero (`ShrinkPlan.masked()`), to float rounding.
"""

import contextlib
import logging

import keras
import numpy as np
from keras import ops

from tfopt import _backend, _keras_internal, channel_groups, geometry
from tfopt._arguments import python_number
from tfopt.adapters import keras_hub as _keras_hub
from tfopt.transforms import _graph

__all__ = ["shrink", "plan_shrink", "ShrinkPlan"]

log = logging.getLogger("tfopt")


class ShrinkPlan:
    """Which channels, heads and units `tfopt.shrink` removes, and how.

    Made by `tfopt.plan_shrink`; `apply()` builds the smaller model,
    `masked()` the same-size model with the removed slices set to zero (what
    the smaller model computes), and `removed` says what goes, per layer.
    """

    def __init__(self, model, walker, removed_roots):
        self.model = model
        self._walker = walker
        self._removed = removed_roots

    def _keep(self, atoms):
        roots = self._walker.atoms.roots(atoms)
        return ~np.isin(roots, list(self._removed))

    @property
    def removed(self):
        """`{layer name: (units before, units after)}` of every layer that loses channels or heads."""
        out = {}
        for record in self._walker.records.values():
            if record.units is None:
                continue
            kept = int(np.sum(self._keep(record.units)))
            if kept != len(record.units):
                out[record.layer.name] = (len(record.units), kept)
        return out

    def _values(self, layer, cut):
        """`layer`'s weights with the removed slices cut (`cut=True`) or zeroed."""
        by_var = {}
        for s in self._walker.slices:
            by_var.setdefault(id(s.variable), []).append(s)
        values = []
        for var in layer.weights:
            value = ops.convert_to_numpy(var)
            for s in by_var.get(id(var), []):
                keep = self._keep(s.atoms)
                if keep.all():
                    continue
                if cut:
                    index = [slice(None)] * value.ndim
                    index[s.axis] = keep
                    value = value[tuple(index)]
                else:
                    shape = [1] * value.ndim
                    shape[s.axis] = len(keep)
                    value = value * keep.reshape(shape).astype(value.dtype)
            values.append(value)
        return values

    def apply(self):
        """The smaller model: a plain, uncompiled Keras model (same layer names
        and topology) without the removed channels, heads and units."""
        records = self._walker.records

        def make_layer(layer):
            record = records.get(id(layer))
            if record is None or record.size_key is None:
                return _graph.plain_copy(layer)
            units = record.units if record.units is not None else record.inputs[0]
            kept = int(np.sum(self._keep(units)))
            if kept == len(units):
                return _graph.plain_copy(layer)
            config = layer.get_config()
            key = record.size_key
            if key in ("output_shape", "target_shape"):
                shape = config[key]
                config[key] = kept if isinstance(shape, int) else [*list(shape)[:-1], kept]
            else:
                config[key] = kept
            return layer.__class__.from_config(config)

        small = self._rebuild(make_layer, cut=True)
        if not self.model.trainable:  # a teacher frozen for distillation: its student is to be trained
            small.trainable = True
            for layer in _keras_internal.all_layers(small):
                layer.trainable = True
        return small

    def masked(self):
        """The model, same size, with every removed slice set to zero (uncompiled)."""
        return self._rebuild(_graph.plain_copy, cut=False)

    def _rebuild(self, make_layer, cut):
        with _uncompiled(self.model):
            clone, pairs = _graph.clone(self.model, make_layer)
        for old, new in pairs:
            if not getattr(old, "weights", None) or isinstance(old, keras.Model):
                continue
            _graph.set_cut_weights(new, self._values(old, cut), f"layer '{old.name}' ({type(old).__name__})",
                                   "the model's summary")
        return clone


@contextlib.contextmanager
def _uncompiled(model):
    """Within it, `model` (and the models nested in it) read as not compiled, so
    that `keras.models.clone_model` leaves its clone uncompiled too (it compiles
    the clone of a compiled model from its compile config): shrink's result has
    other shapes, so the model's optimizer state would not fit it, and its loss
    may not even serialize. Compile the result yourself."""
    models = [m for m in [model, *_keras_internal.all_layers(model)]
              if isinstance(m, keras.Model) and getattr(m, "compiled", False)]
    for m in models:
        m.compiled = False
    try:
        yield
    finally:
        for m in models:
            m.compiled = True


def _scores(walker, importance, gradients):
    """Importance of each atom root: summed squares (L2) or |w * dL/dw| (Taylor)
    of every kernel slice that reads or writes it. Raises if any is NaN/Inf:
    which channels go would then be arbitrary."""
    scores, broken = {}, []
    for s in walker.slices:
        if not s.score:
            continue
        value = ops.convert_to_numpy(s.variable)
        if importance == "taylor":
            value = np.abs(value * gradients[id(s.variable)])
        else:
            value = np.square(value)
        per_index = ops.convert_to_numpy(channel_groups.sum_per_index(value, s.axis))
        if not np.all(np.isfinite(per_index)) and s.variable.path not in broken:
            broken.append(s.variable.path)
        for root, v in zip(walker.atoms.roots(s.atoms).tolist(), per_index.tolist()):
            scores[root] = scores.get(root, 0.0) + v
    if broken:
        source = ("|weight x gradient| of `loss` on `data`" if importance == "taylor"
                  else "the weights' squares")
        raise ValueError(
            f"tfopt.shrink: the channel scores of weights {broken} are NaN/Inf (importance={importance!r}, "
            f"from {source}), so which channels go would be arbitrary. Fix: check that those weights are "
            "finite (training may have diverged: restore an earlier checkpoint)"
            + (" and that the model's outputs and the loss on `data` are (from_logits? labels in range?)"
               if importance == "taylor" else "") + "."
        )
    return scores


class _Scored:
    """What `_backend.mean_gradients` differentiates: `model`'s forward pass, with
    respect to the weights the channel scores read, trainable or not (a teacher
    frozen with `model.trainable = False` for distillation is scored like any
    model; its `trainable_weights` would be empty)."""

    def __init__(self, model, variables):
        self._model = model
        self.trainable_weights = variables

    def __call__(self, x, training=False):
        return self._model(x, training=training)


def _taylor_batches(data):
    """`data` as a list of `(x, y)` batches: one `(x, y)` tuple is one batch.
    Raises on a batch that is not a pair, or that holds NaN/Inf."""
    if isinstance(data, tuple) and len(data) == 2 and not isinstance(data[1], tuple):
        batches = [data]  # (x, y): one batch (y an array, or a list or dict of them)
    else:
        batches = list(data)
    for i, batch in enumerate(batches):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                "`tfopt.shrink(importance='taylor')`: `data` is a batch `(x, y)` or a list of them, and its "
                f"item {i} is not an (x, y) pair. Received: an item of type {type(batch).__name__}"
                + (f" and shape {tuple(batch.shape)}" if hasattr(batch, "shape") else "")
                + ". Fix: data=[(x[:256], y[:256])]."
            )
        for name, part in zip(("x", "y"), batch):
            for array in keras.tree.flatten(part):
                array = np.asarray(array)
                if not np.issubdtype(array.dtype, np.inexact):
                    continue
                bad = int(array.size - np.count_nonzero(np.isfinite(array)))
                if bad:
                    raise ValueError(
                        f"`tfopt.shrink(importance='taylor')`: `data` batch {i} holds {bad} NaN/Inf value(s) in "
                        f"its {name} (shape {array.shape}); the gradients, and so every channel score, would be "
                        "NaN, and the channels removed arbitrary. Fix: drop or fill those samples before "
                        "passing them as `data` (e.g. keep = np.isfinite(x).all(axis=tuple(range(1, x.ndim))))."
                    )
    return batches


def _taylor_gradients(model, walker, loss, data):
    """`{id(variable): mean dL/dw}` of every weight the scores read."""
    variables = list({id(s.variable): s.variable for s in walker.slices if s.score}.values())
    return _backend.mean_gradients(_Scored(model, variables), keras.losses.get(loss), _taylor_batches(data))


def plan_shrink(model, fraction=None, scope="layer", importance="l2", min_channels=1, data=None, loss=None,
                layers=None, depth=None, heads=None, hidden=None):
    """Plans which channels, heads and units `tfopt.shrink` removes (see `shrink`).

    Returns:
        A `ShrinkPlan`; for a keras-hub Backbone or CausalLM a
        `tfopt.adapters.keras_hub.KerasHubShrinkPlan` (the same `apply()`,
        `masked()` and `removed`; with `hidden=`, `masked()` zeroes the
        removed channels in every weight that reads or writes them, which
        `apply()` matches only under RMSNorm: see `shrink`).
    """
    if _keras_hub.handles(model):
        return _keras_hub.plan(model, fraction, depth=depth, heads=heads, hidden=hidden, data=data,
                               min_channels=min_channels,
                               scope=scope, importance=importance, loss=loss, layers=layers)
    given = {"depth": depth, "heads": heads, "hidden": hidden}
    for key, value in given.items():
        if value is not None:
            raise ValueError(
                f"`tfopt.shrink({key}=...)` removes "
                f"{'hidden (residual-stream) channels' if key == 'hidden' else 'whole transformer blocks or heads'} "
                f"of keras-hub models, and model '{model.name}' ({type(model).__name__}) is not one. Received: {key}="
                f"{value!r}. Fix: leave it None and pass fraction= (heads of MultiHeadAttention layers are "
                "removed with the other channels).")
    _graph.check_graph_model(model, "shrink")
    fraction = python_number(fraction)
    if fraction is not None and (not isinstance(fraction, (int, float)) or isinstance(fraction, bool)
                                 or not 0.0 <= fraction < 1.0):
        raise ValueError(
            "`tfopt.shrink(fraction=...)` is the share of each group's channels to remove, a number in "
            f"[0, 1), or None for the units pruning already zeroed. Received: fraction={fraction!r}"
        )
    if scope not in ("layer", "global"):
        raise ValueError(f"`scope` must be 'layer' or 'global'. Received: scope={scope!r}")
    if importance not in ("l2", "taylor"):
        raise ValueError(f"`importance` must be 'l2' or 'taylor'. Received: importance={importance!r}")
    min_channels = python_number(min_channels)
    if not isinstance(min_channels, int) or isinstance(min_channels, bool) or min_channels < 1:
        raise ValueError(
            "`min_channels` is how many channels (heads) each group keeps at least, an int >= 1. "
            f"Received: min_channels={min_channels!r}"
        )
    if importance == "taylor" and (data is None or loss is None):
        raise ValueError(
            "`importance='taylor'` scores channels by |weight x gradient| and needs `data` (an (x, y) "
            "batch, or a list of them) and `loss`. Received: "
            f"data={'given' if data is not None else None}, loss={loss!r}. Fix: pass both, or use importance='l2'."
        )
    for layer in _keras_internal.all_layers(model):
        if geometry.is_twin(layer) or type(layer).__module__.startswith("tfopt"):
            raise TypeError(
                f"`tfopt.shrink` takes a plain Keras model, and layer '{layer.name}' is a tfopt "
                f"{type(layer).__name__}. Fix: `tfopt.strip(model)` first (shrink, then `quantize_model`, "
                "for a smaller quantized model)."
            )
    walker = channel_groups.read(model)
    gradients = _taylor_gradients(model, walker, loss, data) if importance == "taylor" else None
    scores = _scores(walker, importance, gradients)

    atoms = walker.atoms
    groups = channel_groups.unit_groups(walker, layers, model)
    removed = set()
    candidates = []
    if fraction is None:  # the units whose every kernel slice is zero (after WidthPruning)
        for roots in groups.values():
            dead = [r for r in roots if not atoms.frozen[r] and scores.get(r, 0.0) == 0.0]
            removed.update(dead[:max(len(roots) - min_channels, 0)])
        if not removed:
            log.warning(
                "tfopt.shrink(model) found no channel, head or unit that is zero wherever it is read and "
                "written, so it removed nothing. Pruning(structure='channel') zeroes only the producing "
                "kernels; train with tfopt.callbacks.WidthPruning, or pass a fraction.")
        return ShrinkPlan(model, walker, removed)
    for group, roots in groups.items():
        free = sorted((r for r in roots if not atoms.frozen[r]), key=lambda r: (scores.get(r, 0.0), r))
        limit = max(len(roots) - min_channels, 0)
        if scope == "layer":
            count = min(int(round(fraction * len(roots))), limit, len(free))
            removed.update(free[:count])
        else:
            mean = np.mean([scores.get(r, 0.0) for r in roots]) or 1.0
            candidates.extend((scores.get(r, 0.0) / mean, r, group, limit) for r in free)
    if scope == "global":
        total = len(candidates)
        budget = int(round(fraction * total))
        taken = {}
        for score, root, group, limit in sorted(candidates):
            if len(removed) >= budget:
                break
            if taken.get(group, 0) < limit:
                removed.add(root)
                taken[group] = taken.get(group, 0) + 1
    return ShrinkPlan(model, walker, removed)


def shrink(model, fraction=None, scope="layer", importance="l2", min_channels=1, data=None, loss=None, layers=None,
           depth=None, heads=None, hidden=None):
    """Returns a smaller, dense copy of `model`: channels, attention heads and
    feed-forward units removed, not just zeroed.

    Channels that must go together are found from the graph and removed as
    one (a residual `Add`'s inputs, a `Concatenate`, a depthwise convolution
    that follows its input, BatchNormalization, a squeeze-and-excitation
    `Multiply`, `Flatten` into Dense, MultiHeadAttention's heads across its
    query/key/value/output projections). Each removable group (the channels
    one layer makes, joined with those they must go with) is scored and its
    lowest `fraction` removed (`scope="layer"`), or the lowest `fraction` of
    all removable units after each group's scores are divided by their mean
    (`scope="global"`); every group keeps at least `min_channels`. Channels
    that reach a model input or output, or pass through a layer tfopt cannot
    see through (Lambda, LayerNormalization, Reshape that moves the channel
    axis, grouped convolutions, unknown custom layers), are kept, and so are
    those an activation mixes: a layer with `activation="softmax"` (or
    log_softmax, sparsemax, glu, or a function tfopt does not know) keeps
    every output channel, since each depends on all the others.

    The result is a plain Keras model (same layer names, topology and
    per-layer `trainable` flags, except that a model frozen as a whole with
    `model.trainable = False`, a distillation teacher, gives a trainable one;
    no tfopt import needed to load it) that computes what `model` computes with
    the removed slices set to zero (`tfopt.plan_shrink(...).masked()`). That
    is not what `model` computes: recover accuracy by training it briefly or,
    better, distilling from `model` (the Minitron recipe; see the README's
    "Pruning that makes models faster" and `tfopt.distillation`).

    `fraction=None` removes the units already pruned: those whose every
    kernel slice is zero, as `tfopt.callbacks.WidthPruning` leaves them (train
    with it, `tfopt.strip`, then `tfopt.shrink(model)`: the result computes
    what the pruned model computes). `Pruning(structure="channel")` zeroes only
    the producing kernels, per layer: its channels still feed the next layer
    their bias, so `fraction=None` keeps them (with a warning); a fraction
    removes them first (they score lowest), bias and all.

    keras-hub transformers (`GPT2Backbone`, `BertBackbone`, `LlamaBackbone`,
    `MistralBackbone`, `GemmaBackbone` and the CausalLM around each) are
    shrunk by `tfopt.adapters.keras_hub`: `depth=` removes whole blocks (the
    ones that change the hidden state least on `data`, token ids), `fraction=`
    each block's share of feed-forward units (lowest mean |activation| on
    `data`, or lowest weight L2 without it), `heads=` key-value head groups
    (lowest mean |context| they hand the output projection on `data`, or
    lowest weight L2; Mistral and Gemma only: GPT-2, BERT and Llama derive the
    head size from the number of heads, so their configs cannot hold fewer
    heads of the same size), `hidden=` residual-stream channels (lowest mean
    |activation| of the embedding and block outputs on `data`, or lowest
    embedding and norm-scale L2; not Llama, whose rotary embedding ties its
    head size to hidden_dim). The result is the same keras-hub class, built
    from the smaller config. Without `hidden=` it computes what `model`
    computes with the removed blocks skipped and the removed units and heads
    zeroed. `hidden=` is not exact: the norms average over fewer channels
    (their scales are rescaled for it, which is exact only for RMSNorm and
    removed channels that carried nothing); recover by distillation. GPT-2's
    and BERT's heads lose hidden / num_heads dimensions each with it, so there
    `hidden` counts in multiples of num_heads (a share is rounded).

    Args:
        model: a Keras 3 Sequential or Functional model of Keras layers
            (`tfopt.strip` a tfopt model first; shrink before `quantize_model`),
            or a keras-hub Backbone or CausalLM.
        fraction: share of each group's units to remove, in [0, 1); None:
            the units whose kernels are all zero.
        scope: "layer" (each group loses `fraction`) or "global".
        importance: "l2" (summed squares of every kernel slice of the unit)
            or "taylor" (|w x dL/dw| summed, from `data` and `loss`).
        min_channels: units each group keeps at least.
        data: for "taylor": an `(x, y)` batch, or an iterable of them (a
            few suffice); finite values only.
        loss: for "taylor": a Keras loss (name or object).
        layers: only units made by these layers are removed (a name, type,
            predicate or list, as in `tfopt.prune`); default all.
        depth: keras-hub only: how many transformer blocks to remove (an int)
            or which share of them (a float in [0, 1)); needs `data`, token ids
            (an int array, a dict of `token_ids`/`padding_mask`, or a list of
            them).
        heads: keras-hub Mistral and Gemma only: how many key-value head
            groups to remove from each block (an int), or which share of them.
        hidden: keras-hub GPT-2, BERT, Mistral and Gemma only: how many
            residual-stream channels to remove from `hidden_dim` everywhere
            (embeddings, every norm, every block's inputs and outputs, the LM
            head), an int, or which share of them (a float in [0, 1)); not
            exact (see above).

    Returns:
        A new `keras.Model`, not compiled even when `model` is (as after
        `tfopt.prune`): compile it before `fit` or `evaluate`.

    Example:
    >>> import keras, numpy as np, tfopt
    >>> inputs = keras.Input((8, 8, 3))
    >>> x = keras.layers.Conv2D(16, 3, padding="same", name="conv")(inputs)
    >>> x = keras.layers.BatchNormalization(name="bn")(x)
    >>> x = keras.layers.GlobalAveragePooling2D()(x)
    >>> model = keras.Model(inputs, keras.layers.Dense(10, name="head")(x))
    >>> small = tfopt.shrink(model, 0.5)
    >>> small.get_layer("conv").filters, small.count_params() < model.count_params(), small.compiled
    (8, True, False)

    A keras-hub causal LM: a quarter of its hidden width, half of each
    block's feed-forward units and key-value heads, and one block, scored on
    calibration tokens:

    >>> import pytest
    >>> keras_hub = pytest.importorskip("keras_hub")  # keras-hub is optional
    >>> lm = keras_hub.models.MistralCausalLM(keras_hub.models.MistralBackbone(
    ...     vocabulary_size=64, num_layers=3, num_query_heads=4, num_key_value_heads=2, hidden_dim=32,
    ...     intermediate_dim=64))
    >>> tokens = np.random.default_rng(0).integers(1, 64, (4, 16))
    >>> small = tfopt.shrink(lm, 0.5, heads=0.5, hidden=0.25, depth=1, data=tokens)
    >>> config = small.backbone.get_config()
    >>> config["num_layers"], config["hidden_dim"], config["intermediate_dim"], config["num_key_value_heads"]
    (2, 24, 32, 1)
    """
    plan = plan_shrink(model, fraction, scope=scope, importance=importance, min_channels=min_channels,
                       data=data, loss=loss, layers=layers, depth=depth, heads=heads, hidden=hidden)
    small = plan.apply()
    log.info("tfopt.shrink: removed {layer: (units before, after)} %s; the result is not compiled", plan.removed)
    return small
