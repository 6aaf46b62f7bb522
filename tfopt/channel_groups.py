"""The channel dependency graph: which channels, attention heads and units go together.

Read by `tfopt.shrink` (which removes them) and `tfopt.callbacks.WidthPruning`
(which zeroes them during training), so that both see the same groups.

How it works. Every channel of every tensor in the graph (the last axis) gets
an *atom*; layers say how their outputs' atoms relate to their inputs'
(`tfopt.geometry.channel_flow`): a convolution or Dense makes new ones, a
BatchNormalization or activation carries them, an `Add` or `Multiply` says
its inputs' channels are the same channels, a `Concatenate` lines them up, a
`Flatten` repeats them. Atoms that must go together are joined (union-find),
so a channel of a residual stream is one unit across every block that adds
to it, and a squeeze-and-excitation multiply ties its two sides together.
Channels that reach a model output, a model input (a nested model's too), or
a layer tfopt does not know (a Lambda, LayerNormalization, a Reshape that
moves the channel axis) are *frozen*: kept. So are the channels a layer mixes
(a softmax over them, as an activation or a layer, normalizes each channel by
all the others: removing one changes the rest). MultiHeadAttention
contributes its heads as units.

Each weight slice that reads or writes a channel is recorded (`Slice`);
removing a unit cuts all of them (the producing kernel's output slice, the
consumers' input slices, BatchNormalization's statistics, a depthwise
kernel's channel), and zeroing them all leaves the model computing what the
model without the unit computes.
"""

import dataclasses

import keras
import numpy as np
from keras import ops

from tfopt import _keras_internal, geometry, pruning
from tfopt.transforms import _graph

__all__ = ["Atoms", "Slice", "LayerRecord", "Walker", "read", "unit_groups", "sum_per_index", "mixes_channels"]

# Keras activations that compute each value from that value alone. Any other (softmax, log_softmax,
# sparsemax, glu, or a function tfopt does not know) may mix channels: they are kept.
_PER_CHANNEL = (
    "celu", "elu", "exponential", "gelu", "hard_shrink", "hard_sigmoid", "hard_silu", "hard_swish", "hard_tanh",
    "leaky_relu", "linear", "log_sigmoid", "mish", "relu", "relu6", "selu", "sigmoid", "silu", "soft_shrink",
    "softplus", "softsign", "sparse_plus", "sparse_sigmoid", "squareplus", "swish", "tanh", "tanh_shrink",
    "threshold",
)
_PER_CHANNEL_FUNCTIONS = {id(fn) for module in (keras.activations, keras.ops) for name in _PER_CHANNEL
                          for fn in [getattr(module, name, None)] if fn is not None}


def mixes_channels(layer):
    """True when `layer` has an `activation` that computes an output channel
    from other channels too (softmax, log_softmax, sparsemax, glu) or that
    tfopt does not know (a custom function): its output channels must all stay.

    Example:
    >>> import keras
    >>> mixes_channels(keras.layers.Dense(4, activation="softmax"))
    True
    >>> mixes_channels(keras.layers.Dense(4, activation="relu")), mixes_channels(keras.layers.Flatten())
    (False, False)
    """
    activation = getattr(layer, "activation", None)
    return activation is not None and callable(activation) and id(activation) not in _PER_CHANNEL_FUNCTIONS


def _recreatable(layer):
    """True when Keras can make `layer` again from its config, as removing
    channels through it needs (a layer whose activation is a lambda, or a
    subclass whose `__init__` takes no `**kwargs`, cannot be: its channels stay)."""
    try:
        type(layer).from_config(layer.get_config())
    except Exception:  # noqa: BLE001 (whatever the layer's constructor raises)
        return False
    return True


class Atoms:
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
class Slice:
    variable: object
    axis: int
    atoms: np.ndarray  # one atom per index along `axis` (before find)
    score: bool  # counts in the L2 importance


@dataclasses.dataclass
class LayerRecord:
    layer: object
    flow: str
    size_key: str | None
    inputs: list  # atom arrays of its first call (later calls are joined to them)
    outputs: list
    units: np.ndarray | None = None  # the layer's own output channels or heads (NEW, HEADS)


class Walker:
    """Reads a model's graph into atoms, slices and layer records."""

    def __init__(self):
        self.atoms = Atoms()
        self.slices = []
        self.records = {}  # id(layer) -> LayerRecord
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
        # An activation over the channels (softmax) makes each output channel from all of them:
        # removing one would change the others. A layer that makes its channels (Dense) keeps them
        # all, and can still lose input channels; any other layer stops removal.
        mixing = mixes_channels(layer)
        if flow is None or not ins or (mixing and flow != geometry.NEW) or not _recreatable(layer):
            self.records[id(layer)] = LayerRecord(layer, None, None, ins, [])
            return self._stop(ins, outs)
        handler = getattr(self, f"_{flow}")
        results = handler(layer, node, ins, outs)
        if results is None:
            self.records[id(layer)] = LayerRecord(layer, None, None, ins, [])
            return self._stop(ins, outs)
        if mixing:
            for atoms in results:
                self.atoms.freeze(atoms)
        self.records.setdefault(id(layer), LayerRecord(layer, flow, size_key, ins, results))
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
                self.slices.append(Slice(var, spec.in_axis % rank, x, True))
                continue
            if var.shape[spec.out_axis] != len(out):
                return None
            self.slices.append(Slice(var, spec.out_axis % rank, out, True))
            if spec.in_axis is not None and spec.in_axis % rank != spec.out_axis % rank:  # (not an Embedding)
                if var.shape[spec.in_axis] != len(x):
                    return None
                self.slices.append(Slice(var, spec.in_axis % rank, x, True))
        for var in layer.weights:
            if id(var) in own:
                continue
            if len(var.shape) == 1 and var.shape[0] == len(out):  # the bias
                self.slices.append(Slice(var, 0, out, False))
            else:
                return None
        self.records[id(layer)] = LayerRecord(layer, geometry.NEW, geometry.channel_flow(layer)[1], ins, [out], out)
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
                self.slices.append(Slice(var, axis, x, True))
            elif shape and shape[-1] == len(x):
                self.slices.append(Slice(var, len(shape) - 1, x, False))
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
            self.slices.append(Slice(dense.kernel, 0, x, True))
            self.slices.append(Slice(dense.kernel, 1, heads, True))
            if dense.bias is not None:
                self.slices.append(Slice(dense.bias, 0, heads, False))
        self.slices.append(Slice(output.kernel, 0, heads, True))
        self.slices.append(Slice(output.kernel, len(output.kernel.shape) - 1, out, False))
        if output.bias is not None:
            self.slices.append(Slice(output.bias, 0, out, False))
        self.records[id(layer)] = LayerRecord(layer, geometry.HEADS, "num_heads", ins, [out], heads)
        return [out] + [self._fresh(o, frozen=True) for o in outs[1:]]  # (+ attention scores)


def read(model):
    """A `Walker` that has read `model` (Sequential or Functional, nested ones
    included), with the channels of every model output frozen."""
    walker = Walker()
    for atoms in walker.walk(_graph.to_functional(model)):
        walker.atoms.freeze(atoms)
    return walker


def unit_groups(walker, layers, model):
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
