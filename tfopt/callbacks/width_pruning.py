"""`WidthPruning`: prunes whole channels, heads and units, dependency groups together, during `fit`."""

import collections

import keras
import numpy as np
from keras import ops

from tfopt import _backend, _state, channel_groups, pruning
from tfopt import sparsity as sparsity_lib
from tfopt._arguments import python_number
from tfopt.adapters import _keras_hub_geometry
from tfopt.adapters import keras_hub as _keras_hub
from tfopt.callbacks.pruning import Pruning
from tfopt.transforms import _graph

__all__ = ["WidthPruning"]

# One removable group: its keep vector (a variable, one 0/1 per free unit), its unit count (frozen
# ones included: the sparsity and the floor count them), the most it may lose, its free units.
_Group = collections.namedtuple("_Group", ["keep", "total", "limit", "free"])


class _Width(sparsity_lib.Structure):
    """What `tfopt.summary` names the structure of weights `WidthPruning` prunes."""

    name = "width"
    unit = "channel"

    def mask(self, weight, sparsity, in_axis, out_axis):  # masks come from the groups, not one weight
        raise NotImplementedError

    def describe(self):
        return "width (channel groups)"


class WidthPruning(Pruning):
    """Prunes channels, attention heads and feed-forward units during `fit`,
    the channels that must go together together, so that `tfopt.shrink(model)`
    afterwards removes them and computes exactly what the pruned model does.

    The structured counterpart of `Pruning(structure="channel")`, which masks
    each kernel's output channels on its own: here the units are those of
    `tfopt.shrink` (a residual stream's channel across every block, a
    depthwise convolution with the convolution before it, a MultiHeadAttention
    head across its four kernels, a Dense unit with the rows that read it), and
    a pruned unit is zeroed everywhere it is read or written (producing and
    consuming kernels, biases, depthwise and normalization scales). At each
    update step of `pruning_schedule`, every group keeps its units of highest
    L2 norm (summed over those slices) and loses `round(sparsity * units)`,
    keeping at least `min_channels`; pruned units stay pruned. Like `Pruning`,
    the masks are variables updated inside the train step (through the weight
    constraints), so `steps_per_execution > 1`, `jit_compile=True` and
    strategies work, and `tfopt.strip` bakes them.

    Sequential and Functional models of Keras layers (it reads the graph),
    and keras-hub's GPT-2, BERT, Llama, Mistral and Gemma backbones and causal
    LMs, whose transformer blocks it sees inside (as `tfopt.shrink` does): in
    every block, feed-forward units (the up and gate kernels' columns and
    biases, the down kernel's rows) and, for Mistral and Gemma, whole
    key-value head groups (a group's query heads, its key and value heads, the
    output projection's rows of its query heads), each block a group of its
    own, so every block loses as many as the config can say
    (`tfopt.shrink(model, fraction, heads=...)` then removes them exactly).

    Under the JAX backend the keep vectors and masks are optimizer variables
    (as `Pruning`'s are), which JAX's stateless train step carries; the same
    weights, data and optimizer prune the same units as under TensorFlow.

    Args:
        pruning_schedule: a `tfopt.schedules.SparsitySchedule` or preset name;
            its sparsity is the share of each group's units pruned.
        min_channels: units each group keeps at least.
        layers: only units made by these layers are pruned (as in `tfopt.prune`).
        log_sparsity, total_steps: as in `Pruning`.

    Example:
    >>> import keras, numpy as np, tfopt
    >>> model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"),
    ...                           keras.layers.Dense(4)])
    >>> model.compile("adam", "mse")
    >>> schedule = tfopt.schedules.ConstantSparsity(0.5, begin_step=0, frequency=1)
    >>> _ = model.fit(np.ones((8, 16)), np.ones((8, 4)), verbose=0,
    ...               callbacks=[tfopt.callbacks.WidthPruning(schedule)])
    >>> tfopt.shrink(tfopt.strip(model)).layers[0].units
    16
    """

    def __init__(self, pruning_schedule, min_channels=1, layers=None, log_sparsity=True, total_steps=None):
        if pruning_schedule is None:
            raise ValueError("tfopt.callbacks.WidthPruning needs a `pruning_schedule`. Received: None")
        super().__init__(pruning_schedule, None, layers=layers, log_sparsity=log_sparsity, total_steps=total_steps)
        min_channels = python_number(min_channels)
        if not isinstance(min_channels, int) or isinstance(min_channels, bool) or min_channels < 1:
            raise ValueError(
                "WidthPruning: `min_channels` is how many units each group keeps at least, an int >= 1. "
                f"Received: min_channels={min_channels!r}")
        self.min_channels = min_channels
        self.structure = _Width()
        self._groups = []  # [_Group]

    def on_train_begin(self, logs=None):
        _graph.check_graph_model(self.model, "callbacks.WidthPruning")
        if _keras_hub.handles(self.model):
            self._keras_hub_groups()  # (raises for a keras-hub model it does not know, before training)
        super().on_train_begin(logs)

    def _keras_hub_groups(self):
        """`_keras_hub_geometry.width_groups` of the model, or a TypeError saying what is supported."""
        model = self.model
        name = f"'{model.name}' ({type(model).__name__})"
        if self.layers is not None:
            raise ValueError(
                f"tfopt.callbacks.WidthPruning(layers=...) selects layers of plain Keras models; in keras-hub "
                f"model {name} it prunes every transformer block's feed-forward units (and key-value head "
                f"groups), as tfopt.shrink removes them. Received: layers={self.layers!r}. Fix: leave layers=None.")
        try:
            return _keras_hub_geometry.width_groups(model)
        except TypeError as e:
            raise TypeError(
                f"tfopt.callbacks.WidthPruning prunes the feed-forward units (and, for Mistral and Gemma, the "
                f"key-value head groups) of keras-hub GPT2, BERT, Llama, Mistral and Gemma backbones and causal "
                f"LMs, and cannot see inside model {name}: {e}") from None

    def _attach(self):
        if self._masks:
            return False
        model = self.model
        if _keras_hub.handles(model):
            return self._attach_keras_hub()
        walker = channel_groups.read(model)
        groups = channel_groups.unit_groups(walker, self.layers, model)
        if not any(not walker.atoms.frozen[r] for roots in groups.values() for r in roots):
            raise ValueError(
                f"tfopt.callbacks.WidthPruning: model '{model.name}' has no channel, head or unit it can "
                "remove (every channel reaches an output, an input, or a layer tfopt cannot see through, "
                "such as a Lambda or LayerNormalization). Fix: use Pruning(structure='channel') or "
                "unstructured pruning.")
        atoms = walker.atoms
        position = {}  # root -> (group index, position)
        optimizer = model.optimizer
        resuming = int(ops.convert_to_numpy(optimizer.iterations)) > 0
        self._groups = []
        for roots in groups.values():
            free = [r for r in roots if not atoms.frozen[r]]
            if not free:  # (a group that reaches an output)
                continue
            g = len(self._groups)
            for i, r in enumerate(free):
                position[r] = (g, i)
            total, limit = len(roots), max(len(roots) - self.min_channels, 0)
            keep = _backend.in_init_scope(lambda n=len(free): self._variable(np.ones(n, "float32"), "width_keep"))
            self._groups.append(_Group(keep, total, limit, len(free)))
        # Per variable: its slices as (axis, group, index vector) with len(free) for "not this group's".
        by_variable = {}
        for s in walker.slices:
            roots = atoms.roots(s.atoms)
            per_group = {}
            for i, root in enumerate(roots.tolist()):
                if root in position:
                    g, p = position[root]
                    per_group.setdefault(g, np.full(len(roots), self._groups[g].free, "int32"))[i] = p
            for g, index in per_group.items():
                by_variable.setdefault(id(s.variable), (s.variable, []))[1].append((s.axis, g, index, s.score))
        return self._attach_slices(by_variable, resuming)

    def _attach_keras_hub(self):
        """Groups from the keras-hub blocks: per block, its feed-forward units, and its
        key-value head groups where the config can hold fewer (each keeps one at least)."""
        resuming = int(ops.convert_to_numpy(self.model.optimizer.iterations)) > 0
        self._groups = []
        by_variable = {}
        for kind, units, per_block in self._keras_hub_groups():
            limit = max(units - self.min_channels, 0) if kind == "units" else units - 1
            for slices in per_block:
                g = len(self._groups)
                keep = _backend.in_init_scope(lambda n=units: self._variable(np.ones(n, "float32"), "width_keep"))
                self._groups.append(_Group(keep, units, limit, units))
                for variable, axis, index in slices:
                    by_variable.setdefault(id(variable), (variable, []))[1].append(
                        (axis, g, np.asarray(index, "int32"), True))
        return self._attach_slices(by_variable, resuming)

    def _attach_slices(self, by_variable, resuming):
        """Masks and constraints for `{id(variable): (variable, [(axis, group, index, scored)])}`."""
        model = self.model
        # In the order the optimizer applies constraints, so that the first (the leader, which
        # updates the groups) runs before every other one of the step.
        self._slices = [by_variable[id(v)] for v in model.trainable_variables if id(v) in by_variable]
        leader = self._slices[0][0]
        for variable, entries in self._slices:
            value = ops.convert_to_numpy(variable)
            initial = (value != 0).astype(value.dtype) if resuming else np.ones_like(value)
            mask = _backend.in_init_scope(lambda v=initial, n=variable.name: self._variable(v, f"{n}_width_mask"))
            self._masks[id(variable)] = (variable, mask, None)
        for variable, entries in self._slices:
            mask = self._masks[id(variable)][1]
            constraint = self._constraint(variable, mask, entries, leader=variable is leader)
            variable.constraint = constraint
            _state.PRUNED.set(variable, _state.PruneRecord(mask, self.structure, self.pruning_schedule, None, None,
                                                          owner=self))
            self._masks[id(variable)] = (variable, mask, constraint)
        return True

    def _full_mask(self, variable, entries, keeps):
        mask = None
        for axis, g, index, _ in entries:
            vector = ops.take(ops.concatenate([keeps[g], ops.ones((1,), "float32")]), index)
            shape = [1] * len(variable.shape)
            shape[axis] = len(index)
            vector = ops.reshape(vector, shape)
            mask = vector if mask is None else mask * vector
        return ops.cast(ops.broadcast_to(mask, variable.shape), variable.dtype)

    def _scores(self):
        """Per group, the L2 score of each free unit, from the masked weights."""
        sums = [ops.zeros((group.free + 1,), "float32") for group in self._groups]
        for variable, entries in self._slices:
            mask = self._masks[id(variable)][1]
            value = ops.square(ops.cast(ops.convert_to_tensor(variable) * ops.convert_to_tensor(mask), "float32"))
            for axis, g, index, scored in entries:
                if not scored:
                    continue
                per_index = channel_groups.sum_per_index(value, axis)
                onehot = np.eye(self._groups[g].free + 1, dtype="float32")[index]
                sums[g] = sums[g] + ops.matmul(per_index[None, :], onehot)[0]
        return [s[:-1] for s in sums]

    @staticmethod
    def _count(sparsity, group):
        """Units of `group` to prune at `sparsity`: round(sparsity x units), within its floor."""
        return ops.minimum(ops.cast(ops.round(ops.cast(sparsity, "float32") * group.total), "int32"),
                           min(group.limit, group.free))

    def _constraint(self, variable, mask, entries, leader):
        """`make_constraint`'s, with the mask made from the groups: the leader (the first pruned
        variable the optimizer constrains) updates every group's keep vector, then each
        variable's mask is its slices' keep vectors. Written on update steps only: under a
        strategy each replica holds its own copy (replica-local, see `Pruning._variable`).
        Under JAX the leader writes the keep vectors before the mask's `ops.cond`, every
        step (the old ones between updates): a write inside a branch would leak from its trace."""

        def updated_keeps(sparsity):
            """The keep vectors after pruning each group's lowest units at `sparsity`."""
            updated = []
            for scores, group in zip(self._scores(), self._groups):
                keep = ops.convert_to_tensor(group.keep)
                pruned = ops.cast(sparsity_lib.prune_lowest(scores, self._count(sparsity, group)),
                                  "float32") * keep  # (pruned units stay pruned)
                # Never from NaN/Inf weights: the group keeps its units then, as `Pruning` does.
                updated.append(ops.where(ops.all(ops.isfinite(scores)), pruned, keep))
            return updated

        stateless = _backend.stateless_steps()

        def before(should_prune, sparsity):
            current = [ops.convert_to_tensor(group.keep) for group in self._groups]
            keeps = ops.cond(should_prune, lambda: updated_keeps(sparsity), lambda: current)
            for group, keep in zip(self._groups, keeps):
                group.keep.assign(keep)

        def mask_fn(masked, sparsity):
            if leader and not stateless:
                keeps = updated_keeps(sparsity)
                for group, keep in zip(self._groups, keeps):
                    group.keep.assign(keep)
            else:
                keeps = [ops.convert_to_tensor(group.keep) for group in self._groups]
            return self._full_mask(variable, entries, keeps)

        optimizer = self.model.optimizer
        return pruning.make_constraint(
            mask, lambda: optimizer.iterations, self.pruning_schedule, self.structure, None, None,
            inner=pruning.inner_constraint(variable), length_fn=lambda: self._length, mask_fn=mask_fn,
            before=before if leader and stateless else None)
