"""`shrink`: remove channels, attention heads and feed-forward units, giving a smaller dense model.

How it works. Every channel of every tensor in the graph (the last axis) gets
an *atom*; layers say how their outputs' atoms relate to their inputs'
(`tfopt.geometry.channel_flow`): a convolution or Dense makes new ones, a
BatchNormalization or activation carries them, an `Add` or `Multiply` says
its inputs' channels are the same channels, a `Concatenate` lines them up, a
`Flatten` repeats them. Atoms that must go together are joined (union-find),
so a channel of a residual stream is one unit across every block that adds
to it, and a squeeze-and-excitation multiply ties its two sides together.
Channels that reach a model output, a model input (a nested model's too), or a layer tfopt does not
know (a Lambda, LayerNormalization, a Reshape that moves the channel axis)
are kept. MultiHeadAttention contributes its heads as units.

Each weight slice that reads or writes a channel is recorded; removing a
unit cuts all of them (the producing kernel's output slice, the consumers'
input slices, BatchNormalization's statistics, a depthwise kernel's channel).
The shrunk model computes exactly what the model computes with those slices
set to zero (`ShrinkPlan.masked()`), to float rounding.
"""

import dataclasses
import logging

import keras
import numpy as np
from keras import ops

from tfopt import _backend, _keras_internal, geometry, pruning
from tfopt._config import python_number
from tfopt.transforms import _graph

__all__ = ["shrink", "plan_shrink", "ShrinkPlan"]

log = logging.getLogger("tfopt")


class _Atoms:
    """Union-find over channel atoms; each atom also belongs to a *group*
    (the channels one layer made, joined with those they were merged with),
    within which `scope="layer"` removes its fraction."""

    def __init__(self):
        self.parent, self.group, self.frozen = [], [], []
        self.group_parent = []

    def new(self, n, frozen=False):
        start = len(self.parent)
        ids = np.arange(start, start + n)
        self.parent.extend(ids.tolist())
        self.group.extend([len(self.group_parent)] * n)
        self.group_parent.append(len(self.group_parent))
        self.frozen.extend([frozen] * n)
        return ids

    def find(self, a):
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a, b):
        """Joins two atom arrays of the same length, element by element."""
        for x, y in zip(np.asarray(a).tolist(), np.asarray(b).tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[ry] = rx
                self.frozen[rx] = self.frozen[rx] or self.frozen[ry]
            gx, gy = self.group_of(x), self.group_of(y)
            if gx != gy:
                self.group_parent[gy] = gx

    def group_of(self, a):
        g = self.group[a]
        while self.group_parent[g] != g:
            g = self.group_parent[g]
        return g

    def freeze(self, atoms):
        for a in np.asarray(atoms).tolist():
            self.frozen[self.find(a)] = True

    def roots(self, atoms):
        return np.array([self.find(a) for a in np.asarray(atoms).tolist()], dtype=np.int64)


@dataclasses.dataclass
class _Slice:
    variable: object
    axis: int
    atoms: np.ndarray  # one atom per index along `axis` (before find)
    score: bool  # counts in the L2 importance


@dataclasses.dataclass
class _LayerRecord:
    layer: object
    flow: str
    size_key: str | None
    inputs: list  # atom arrays of its first call (later calls are joined to them)
    outputs: list
    units: np.ndarray | None = None  # the layer's own output channels or heads (NEW, HEADS)


class _Walker:
    """Reads a model's graph into atoms, slices and layer records."""

    def __init__(self):
        self.atoms = _Atoms()
        self.slices = []
        self.records = {}  # id(layer) -> _LayerRecord
        self.tensors = {}  # id(KerasTensor) -> atom array

    # -- tensors -----------------------------------------------------------------------
    def _fresh(self, tensor, frozen=False):
        shape = tensor.shape
        width = shape[-1] if len(shape) >= 1 else 1
        if width is None:
            width, frozen = 1, True
        return self.atoms.new(int(width), frozen=frozen)

    def _assign(self, tensor, atoms):
        old = self.tensors.get(id(tensor))
        if old is not None and len(old) == len(atoms):
            self.atoms.union(old, atoms)
        else:
            self.tensors[id(tensor)] = atoms

    def _atoms_of(self, tensor):
        if id(tensor) not in self.tensors:  # not produced in this graph (a constant): keep it whole
            self.tensors[id(tensor)] = self._fresh(tensor, frozen=True)
        return self.tensors[id(tensor)]

    # -- graph -------------------------------------------------------------------------
    def walk(self, model, input_atoms=None):
        graph = _keras_internal.graph_of(model)
        inputs = keras.tree.flatten(graph.inputs)
        for i, tensor in enumerate(inputs):
            atoms = input_atoms[i] if input_atoms is not None else self._fresh(tensor, frozen=True)
            self._assign(tensor, atoms)
        for layer, node in _keras_internal.ordered_calls(model):
            ins = [self._atoms_of(t) for t in _keras_internal.node_inputs(node)]
            outs = _keras_internal.node_outputs(node)
            if isinstance(layer, keras.Model) and _keras_internal.is_graph_network(layer):
                for atoms in ins:  # a nested model's inputs are rebuilt at their old width: kept
                    self.atoms.freeze(atoms)
                results = self.walk(layer, ins)
            else:
                results = self._call(layer, node, ins, outs)
            for tensor, atoms in zip(outs, results):
                self._assign(tensor, atoms)
        return [self._atoms_of(t) for t in keras.tree.flatten(graph.outputs)]

    def _stop(self, ins, outs):
        """A layer channels cannot pass: keep everything around it."""
        for atoms in ins:
            self.atoms.freeze(atoms)
        return [self._fresh(t, frozen=True) for t in outs]

    def _call(self, layer, node, ins, outs):
        flow, size_key = geometry.channel_flow(layer)
        record = self.records.get(id(layer))
        if record is not None:  # a shared layer: its weights serve every call
            if record.flow is None or len(ins) != len(record.inputs):
                return self._stop(ins, outs)
            for old, new in zip(record.inputs, ins):
                if len(old) == len(new):
                    self.atoms.union(old, new)
                else:
                    self.atoms.freeze(old), self.atoms.freeze(new)
            if flow in (geometry.NEW, geometry.HEADS):
                return record.outputs
            if flow == geometry.SAME:
                return [record.inputs[0]]
        if flow is None or not ins:
            self.records[id(layer)] = _LayerRecord(layer, None, None, ins, [])
            return self._stop(ins, outs)
        handler = getattr(self, f"_{flow}")
        results = handler(layer, node, ins, outs)
        if results is None:
            self.records[id(layer)] = _LayerRecord(layer, None, None, ins, [])
            return self._stop(ins, outs)
        self.records.setdefault(id(layer), _LayerRecord(layer, flow, size_key, ins, results))
        return results

    # -- flows (each returns the output atoms, or None to stop) ----------------------------
    def _new(self, layer, node, ins, outs):
        if len(ins) != 1 or len(outs) != 1:
            return None
        x = ins[0]
        specs = geometry.weights_of(layer)
        if not specs:
            return None
        out = self._fresh(outs[0])
        own = {id(var) for _, var in specs}
        for spec, var in specs:
            rank = len(var.shape)
            if spec.depthwise:  # a separable layer's depthwise kernel: (..., channels, 1)
                if var.shape[spec.in_axis] != len(x):
                    return None
                self.slices.append(_Slice(var, spec.in_axis % rank, x, True))
                continue
            if var.shape[spec.out_axis] != len(out):
                return None
            self.slices.append(_Slice(var, spec.out_axis % rank, out, True))
            if spec.in_axis is not None and spec.in_axis % rank != spec.out_axis % rank:  # (not an Embedding)
                if var.shape[spec.in_axis] != len(x):
                    return None
                self.slices.append(_Slice(var, spec.in_axis % rank, x, True))
        for var in layer.weights:
            if id(var) in own:
                continue
            if len(var.shape) == 1 and var.shape[0] == len(out):  # the bias
                self.slices.append(_Slice(var, 0, out, False))
            else:
                return None
        self.records[id(layer)] = _LayerRecord(layer, geometry.NEW, geometry.channel_flow(layer)[1], ins, [out], out)
        return [out]

    def _same(self, layer, node, ins, outs):
        if len(ins) != 1 or len(outs) != 1:
            return None
        x = ins[0]
        if outs[0].shape[-1] is None or outs[0].shape[-1] != len(x):  # a Reshape that moves channels
            return None
        depthwise = {id(var): spec for spec, var in geometry.weights_of(layer)}
        for var in layer.weights:
            shape = tuple(var.shape)
            spec = depthwise.get(id(var))
            if spec is not None:
                axis = spec.in_axis % len(shape)
                if shape[axis] != len(x):
                    return None
                self.slices.append(_Slice(var, axis, x, True))
            elif shape and shape[-1] == len(x):
                self.slices.append(_Slice(var, len(shape) - 1, x, False))
            elif shape and shape[-1] != 1:
                return None
        return [x]

    def _merge(self, layer, node, ins, outs):
        widths = {len(a) for a in ins}
        if len(widths) != 1 or len(outs) != 1 or outs[0].shape[-1] != len(ins[0]):
            return None
        for other in ins[1:]:
            self.atoms.union(ins[0], other)
        return [ins[0]]

    def _concat(self, layer, node, ins, outs):
        out = np.concatenate(ins)
        if len(outs) != 1 or outs[0].shape[-1] != len(out):
            return None
        return [out]

    def _flatten(self, layer, node, ins, outs):
        shape = _keras_internal.node_inputs(node)[0].shape
        if len(ins) != 1 or any(d is None for d in shape[1:]):
            return None
        positions = int(np.prod(shape[1:-1])) if len(shape) > 2 else 1
        return [np.tile(ins[0], positions)]

    def _heads(self, layer, node, ins, outs):
        args, kwargs = _keras_internal.node_call_arguments(node)
        names = ("query", "value", "key")
        tensors = {n: kwargs.get(n) for n in names}
        for n, a in zip(names, args):
            tensors[n] = a
        if tensors["key"] is None:
            tensors["key"] = tensors["value"]
        if any(t is None or id(t) not in self.tensors for t in tensors.values()):
            return None
        extra = [t for t in _keras_internal.node_inputs(node) if all(t is not v for v in tensors.values())]
        for t in extra:  # attention masks
            self.atoms.freeze(self._atoms_of(t))
        heads = self.atoms.new(layer.num_heads)
        out = self._fresh(outs[0], frozen=True)  # the output width follows the query's: kept
        *projections, output = _keras_internal.attention_projections(layer)
        for dense, source in zip(projections, ("query", "key", "value")):
            x = self.tensors[id(tensors[source])]
            if dense.kernel.shape[0] != len(x) or dense.kernel.shape[1] != len(heads):
                return None
            self.slices.append(_Slice(dense.kernel, 0, x, True))
            self.slices.append(_Slice(dense.kernel, 1, heads, True))
            if dense.bias is not None:
                self.slices.append(_Slice(dense.bias, 0, heads, False))
        self.slices.append(_Slice(output.kernel, 0, heads, True))
        self.slices.append(_Slice(output.kernel, len(output.kernel.shape) - 1, out, False))
        if output.bias is not None:
            self.slices.append(_Slice(output.bias, 0, out, False))
        self.records[id(layer)] = _LayerRecord(layer, geometry.HEADS, "num_heads", ins, [out], heads)
        return [out] + [self._fresh(o, frozen=True) for o in outs[1:]]  # (+ attention scores)


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
        """The smaller model: a plain Keras model (same layer names and
        topology) without the removed channels, heads and units."""
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
        """The model, same size, with every removed slice set to zero."""
        return self._rebuild(_graph.plain_copy, cut=False)

    def _rebuild(self, make_layer, cut):
        clone, pairs = _graph.clone(self.model, make_layer)
        for old, new in pairs:
            if not getattr(old, "weights", None) or isinstance(old, keras.Model):
                continue
            values = self._values(old, cut)
            expected = [tuple(v.shape) for v in new.weights]
            got = [tuple(v.shape) for v in values]
            if expected != got:
                raise RuntimeError(
                    f"tfopt.shrink: layer '{old.name}' ({type(old).__name__}) rebuilt with weight shapes "
                    f"{expected}, but the cut weights have shapes {got}. This is a tfopt bug; please report it "
                    "with the model's summary."
                )
            new.set_weights(values)
        return clone


def _unit_groups(walker, layers, model):
    """`{group: [atom roots]}`: the units each removable group holds (the
    channels or heads made by the layers `layers` selects, all by default),
    frozen ones included (they count for the floor, and are never removed)."""
    allowed = None
    if layers is not None:
        selected, _ = pruning.select_layers(_graph.graph_layers(model), layers)
        allowed = {id(layer) for layer in selected}
    atoms = walker.atoms
    groups = {}
    for record in walker.records.values():
        if record.units is None or (allowed is not None and id(record.layer) not in allowed):
            continue
        for root in atoms.roots(record.units).tolist():
            roots = groups.setdefault(atoms.group_of(root), [])
            if root not in roots:
                roots.append(root)
    return groups


def sum_per_index(value, axis):
    """`value` summed over every axis but `axis`: one number per index along
    it (a channel's, a head's). With `keras.ops`, so the one-shot `shrink` and
    the in-graph `WidthPruning` score units alike."""
    moved = ops.moveaxis(value, axis, 0)
    return ops.sum(ops.reshape(moved, (moved.shape[0], -1)), axis=1)


def _scores(walker, importance, gradients):
    """Importance of each atom root: summed squares (L2) or |w * dL/dw| (Taylor)
    of every kernel slice that reads or writes it."""
    scores = {}
    for s in walker.slices:
        if not s.score:
            continue
        value = ops.convert_to_numpy(s.variable)
        if importance == "taylor":
            value = np.abs(value * gradients[id(s.variable)])
        else:
            value = np.square(value)
        per_index = ops.convert_to_numpy(sum_per_index(value, s.axis))
        for root, v in zip(walker.atoms.roots(s.atoms).tolist(), per_index.tolist()):
            scores[root] = scores.get(root, 0.0) + v
    return scores


def plan_shrink(model, fraction=None, scope="layer", importance="l2", min_channels=1, data=None, loss=None,
                layers=None):
    """Plans which channels, heads and units `tfopt.shrink` removes (see `shrink`).

    Returns:
        A `ShrinkPlan`.
    """
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
            "`importance='taylor'` scores channels by |weight x gradient| and needs `data` (batches of "
            "(x, y)) and `loss`. Received: "
            f"data={'given' if data is not None else None}, loss={loss!r}. Fix: pass both, or use importance='l2'."
        )
    for layer in _keras_internal.all_layers(model):
        if geometry.is_twin(layer) or type(layer).__module__.startswith("tfopt"):
            raise TypeError(
                f"`tfopt.shrink` takes a plain Keras model, and layer '{layer.name}' is a tfopt "
                f"{type(layer).__name__}. Fix: `tfopt.strip(model)` first (shrink, then `quantize_model`, "
                "for a smaller quantized model)."
            )
    walker = _Walker()
    outputs = walker.walk(_graph.to_functional(model))
    for atoms in outputs:
        walker.atoms.freeze(atoms)
    gradients = _backend.mean_gradients(model, keras.losses.get(loss), data) if importance == "taylor" else None
    scores = _scores(walker, importance, gradients)

    atoms = walker.atoms
    groups = _unit_groups(walker, layers, model)
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


def shrink(model, fraction=None, scope="layer", importance="l2", min_channels=1, data=None, loss=None, layers=None):
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
    axis, grouped convolutions, unknown custom layers), are kept.

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

    Args:
        model: a Keras 3 Sequential or Functional model of Keras layers
            (`tfopt.strip` a tfopt model first; shrink before `quantize_model`).
        fraction: share of each group's units to remove, in [0, 1); None:
            the units whose kernels are all zero.
        scope: "layer" (each group loses `fraction`) or "global".
        importance: "l2" (summed squares of every kernel slice of the unit)
            or "taylor" (|w x dL/dw| summed, from `data` and `loss`).
        min_channels: units each group keeps at least.
        data: for "taylor": an iterable of `(x, y)` batches (a few suffice).
        loss: for "taylor": a Keras loss (name or object).
        layers: only units made by these layers are removed (a name, type,
            predicate or list, as in `tfopt.prune`); default all.

    Returns:
        A new, uncompiled `keras.Model`.

    Example:
    >>> import keras, numpy as np, tfopt
    >>> inputs = keras.Input((8, 8, 3))
    >>> x = keras.layers.Conv2D(16, 3, padding="same", name="conv")(inputs)
    >>> x = keras.layers.BatchNormalization(name="bn")(x)
    >>> x = keras.layers.GlobalAveragePooling2D()(x)
    >>> model = keras.Model(inputs, keras.layers.Dense(10, name="head")(x))
    >>> small = tfopt.shrink(model, 0.5)
    >>> small.get_layer("conv").filters, small.count_params() < model.count_params()
    (8, True)
    """
    plan = plan_shrink(model, fraction, scope=scope, importance=importance, min_channels=min_channels,
                       data=data, loss=loss, layers=layers)
    small = plan.apply()
    log.info("tfopt.shrink: %s", plan.removed)
    return small
