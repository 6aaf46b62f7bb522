"""Mask computation for magnitude pruning: unstructured, N:M, block, channel.

Every structure turns a weight tensor and a target sparsity into a 0/1 mask of
the weight's shape, with `keras.ops` only, static shapes and no host round
trip, so it runs inside a compiled train step (`jit_compile=True`, TPU).

Rounding rule (all structures but N:M): the number of pruned units (weights,
blocks or channels) is `round(sparsity * units)`, rounding half to even. A
tensor of 10 weights at 0.75 target therefore gets 8 zeros (0.8 achieved);
`tfopt.summary` reports the achieved sparsity. A weight always keeps at least
one unit (a "channel" target of 0.8 on a 2-unit head keeps one channel, not
none): `check_target` warns when a target would have removed them all. N:M fixes the sparsity at
`1 - N/M`; the schedule only decides when masks are updated (as in tfmot).

Ties: among units of equal magnitude (all-zero or constant weights), the ones
with the lowest flat index are pruned first, so masks are deterministic.

Non-finite weights: a mask is never computed from NaN/Inf magnitudes. Inside the
train step the previous mask is kept (the loss shows the NaN); on attach,
`validate_finite` raises.
"""

import math
import warnings

import keras
import numpy as np
from keras import ops

from tfopt import _backend
from tfopt._arguments import Configurable, python_number

__all__ = [
    "Structure",
    "Unstructured",
    "NM",
    "Block",
    "Channel",
    "get",
    "prune_lowest",
]


def prune_lowest(scores, num_pruned):
    """Returns a bool keep-mask (same shape as the 1-D `scores`) that drops the
    `num_pruned` lowest scores, ties broken by lowest index first.

    Example:
    >>> import numpy as np
    >>> np.asarray(prune_lowest(np.array([3.0, 1.0, 1.0, 2.0]), 2)).tolist()
    [True, False, False, True]
    """
    scores = ops.convert_to_tensor(scores)
    n = scores.shape[0]
    num_pruned = ops.cast(num_pruned, "int32")
    threshold = _kth_smallest(scores, ops.clip(num_pruned, 1, n))
    below = ops.less(scores, threshold)
    tie = ops.equal(scores, threshold)
    remaining = num_pruned - ops.sum(ops.cast(below, "int32"))

    def first_ties():  # by index: a cumulative sum over every score, the slowest pass here
        return ops.logical_and(tie, ops.less_equal(ops.cumsum(ops.cast(tie, "int32")), remaining))

    # Usually every tie goes (a unique threshold, or exactly the zeros already pruned).
    excess = ops.greater(ops.sum(ops.cast(tie, "int32")), remaining)
    pruned = ops.logical_or(below, ops.cond(excess, first_ties, lambda: tie))
    pruned = ops.logical_and(pruned, ops.greater(num_pruned, 0))
    return ops.logical_not(pruned)


# Above this many scores, the k-th smallest is found by a radix select instead of a sort.
_SELECT_ABOVE = 4096
# The radix select's digits: the high 16 bits of a non-negative float32's pattern, then the low 15.
_DIGITS = (16, 15)


def _kth_smallest(scores, k):
    """The `k`-th smallest (1-based, a tensor) of non-negative `scores`.

    Small tensors are sorted. Large ones (a mask update of a big kernel at a
    high frequency, where the sort was the cost) use a radix select over the
    float32 bit patterns, which order non-negative floats as their values do:
    two passes, each a count of the scores per digit (one bincount over the
    scores), no sort, static shapes (so it runs under XLA). Measured on 401k
    scores: 3.7 ms against 5.8 ms for 31 rounds of bisection and 31 ms for the
    sort (graph mode); 2.3 ms against 3.9 ms under XLA."""
    n = scores.shape[0]
    view = getattr(ops, "view", None)
    if n is None or n <= _SELECT_ABOVE or view is None:
        return ops.take(ops.sort(scores), k - 1)
    scores = ops.cast(scores, "float32") + 0.0  # (-0.0 + 0.0 is +0.0: every pattern >= 0)
    # A mask update at an unchanged sparsity (a constant schedule, or after the ramp) finds
    # the pruned weights' zeros: k zeros or more make the k-th smallest 0 without a search.
    zeros = ops.sum(ops.cast(ops.less_equal(scores, 0.0), "int32"))
    return ops.cond(ops.less_equal(k, zeros), lambda: ops.zeros((), "float32"), lambda: _radix_select(scores, k))


def _radix_select(scores, k):
    bits = ops.view(scores, "int32")
    prefix, rank, shift = ops.convert_to_tensor(0, "int32"), k, 31
    for width in _DIGITS:
        shift -= width
        key = ops.right_shift(bits, shift)
        digit = ops.bitwise_and(key, (1 << width) - 1)
        # Scores outside the digits chosen so far count in one extra bin, dropped.
        inside = ops.equal(ops.right_shift(key, width), prefix)
        counts = _backend.bincount(ops.where(inside, digit, 1 << width), (1 << width) + 1)[: 1 << width]
        below = ops.cumsum(counts)  # scores (inside) with a digit <= each digit
        chosen = ops.sum(ops.cast(ops.less(below, rank), "int32"))  # the k-th score's digit
        rank = rank - ops.where(ops.greater(chosen, 0), ops.take(below, ops.maximum(chosen - 1, 0)), 0)
        prefix = prefix * (1 << width) + chosen
    return ops.view(prefix, "float32")


def _num_pruned(sparsity, units):
    """`round(sparsity * units)`, but never all `units`: a layer keeps at least one."""
    pruned = ops.cast(ops.round(ops.cast(sparsity, "float32") * float(units)), "int32")
    return ops.minimum(pruned, max(units - 1, 0))


def _axis(axis, ndim):
    return axis % ndim


class Structure(Configurable):
    """Base class. `mask(weight, sparsity, in_axis, out_axis)` -> 0/1 tensor.

    `in_axis` is the weight's input (reduction) dimension and `out_axis` its
    output-channel dimension; `tfopt.layers` and the `Pruning` callback know
    them for each Keras layer type.
    """

    name = None

    def validate(self, shape, in_axis, out_axis, where):
        """Raises ValueError if the structure cannot apply to a weight of `shape`."""

    #: What one pruned unit is called in messages.
    unit = "weight"

    def units(self, shape, in_axis, out_axis):
        """How many units (weights, blocks, channels) a weight of `shape` has."""
        return int(np.prod(shape))

    def achievable_sparsity(self, sparsity, shape, in_axis, out_axis):
        """The sparsity the mask will really have for a target `sparsity`."""
        units = self.units(shape, in_axis, out_axis)
        return min(round(sparsity * units), units - 1) / units

    def check_target(self, sparsity, shape, in_axis, out_axis, where):
        """Warns when `sparsity` would prune every unit of a weight of `shape`
        (the mask keeps one instead). Returns the achievable sparsity."""
        units = self.units(shape, in_axis, out_axis)
        if round(sparsity * units) >= units:
            warnings.warn(
                f"{where}: {self.describe()} pruning at sparsity {sparsity} would remove all {units} "
                f"{self.unit}(s) of shape {tuple(shape)} and zero the layer; tfopt keeps the largest "
                f"one (sparsity {(units - 1) / units:.2f}). Fix: a lower sparsity or a finer structure "
                "for this layer, or leave it out with `layers=`.", stacklevel=3)
        return self.achievable_sparsity(sparsity, shape, in_axis, out_axis)

    def mask(self, weight, sparsity, in_axis, out_axis):
        raise NotImplementedError

    def describe(self):
        """Short text for tables (`tfopt.summary`): the name, with any parameters."""
        return self.name


@keras.saving.register_keras_serializable(package="tfopt")
class Unstructured(Structure):
    """Prunes individual weights of lowest magnitude (tfmot's default).

    Example:
    >>> import numpy as np
    >>> w = np.array([[0.1, -2.0], [0.5, 0.05]], "float32")
    >>> np.asarray(Unstructured().mask(w, 0.5, 0, -1)).tolist()
    [[0.0, 1.0], [1.0, 0.0]]
    """

    name = "unstructured"

    def mask(self, weight, sparsity, in_axis, out_axis):
        flat = ops.reshape(ops.abs(weight), (-1,))
        keep = prune_lowest(flat, _num_pruned(sparsity, flat.shape[0]))
        return ops.reshape(ops.cast(keep, weight.dtype), weight.shape)


@keras.saving.register_keras_serializable(package="tfopt")
class NM(Structure):
    """N:M sparsity: in every group of `m` consecutive weights along the input
    dimension, keep the `n` of largest magnitude (2:4 is the pattern that
    NVIDIA sparse tensor cores accelerate).

    Args:
        n: weights kept per group.
        m: group size; must divide the input dimension of every pruned weight.

    Example:
    >>> import numpy as np
    >>> w = np.array([[4.0], [1.0], [3.0], [2.0]], "float32")   # (in=4, out=1)
    >>> np.asarray(NM(2, 4).mask(w, 0.5, 0, -1)).ravel().tolist()
    [1.0, 0.0, 1.0, 0.0]
    """

    name = "n:m"

    def __init__(self, n, m):
        n, m = python_number(n), python_number(m)
        if not (isinstance(n, int) and isinstance(m, int)) or not 0 < n < m:
            raise ValueError(
                f"N:M structure needs integers 0 < N < M, such as '2:4'. Received: n={n!r}, m={m!r}"
            )
        self.n, self.m = n, m

    def validate(self, shape, in_axis, out_axis, where):
        dim = shape[_axis(in_axis, len(shape))]
        if dim % self.m:
            raise ValueError(
                f"{where}: N:M structure '{self.n}:{self.m}' needs the input dimension "
                f"(axis {in_axis} of the weight, shape {tuple(shape)}) to be a multiple of "
                f"M={self.m}. Received: dimension {dim}. Fix: leave this layer out of "
                "pruning (`layers=`), or use another structure for it."
            )

    def achievable_sparsity(self, sparsity, shape, in_axis, out_axis):
        return 1.0 - self.n / self.m

    def check_target(self, sparsity, shape, in_axis, out_axis, where):
        return self.achievable_sparsity(sparsity, shape, in_axis, out_axis)  # N >= 1 kept per group

    def mask(self, weight, sparsity, in_axis, out_axis):
        ndim = len(weight.shape)
        in_axis = _axis(in_axis, ndim)
        moved = ops.moveaxis(ops.abs(weight), in_axis, -1)
        moved_shape = moved.shape
        groups = ops.reshape(moved, (-1, self.m))
        # Rank of each element inside its group: how many beat it (ties: lower index wins).
        a = ops.expand_dims(groups, 2)  # (g, m, 1): element i
        b = ops.expand_dims(groups, 1)  # (g, 1, m): element j
        idx = ops.arange(self.m)
        earlier = ops.less(ops.expand_dims(idx, 1), ops.expand_dims(idx, 0))  # i < j
        # j beats i if |w_j| > |w_i|, or equal and j comes first (j < i).
        beats = ops.logical_or(ops.greater(b, a), ops.logical_and(ops.equal(b, a), ops.transpose(earlier)))
        rank = ops.sum(ops.cast(beats, "int32"), axis=2)
        keep = ops.cast(ops.less(rank, self.n), weight.dtype)
        return ops.moveaxis(ops.reshape(keep, moved_shape), -1, in_axis)

    def get_config(self):
        return {"n": self.n, "m": self.m}

    def describe(self):
        return f"{self.n}:{self.m}"


@keras.saving.register_keras_serializable(package="tfopt")
class Block(Structure):
    """Prunes whole blocks of weights by mean magnitude (tfmot's `block_size`).

    The weight is seen as a matrix (all axes but the output axis, output axis);
    blocks of `block_shape` tile it, and edge blocks that do not fill up are
    scored on their real weights only.

    Args:
        block_shape: `(rows, cols)`; `(1, 4)` zeroes 4 consecutive outputs.

    Example:
    >>> import numpy as np
    >>> w = np.array([[1.0, 1.0, 0.1, 0.1]], "float32")
    >>> np.asarray(Block((1, 2)).mask(w, 0.5, 0, -1)).tolist()
    [[1.0, 1.0, 0.0, 0.0]]
    """

    name = "block"

    def __init__(self, block_shape):
        block_shape = tuple(python_number(b) for b in block_shape) if isinstance(block_shape, (list, tuple)) \
            else block_shape
        if (
            not isinstance(block_shape, tuple)
            or len(block_shape) != 2
            or not all(isinstance(b, int) and b > 0 for b in block_shape)
        ):
            raise ValueError(
                "Block structure needs two positive ints (rows, cols), such as (1, 4). "
                f"Received: block_shape={block_shape!r}"
            )
        self.block_shape = block_shape

    def _matrix_shape(self, shape, out_axis):
        out_axis = _axis(out_axis, len(shape))
        cols = shape[out_axis]
        return int(np.prod(shape)) // cols, cols

    unit = "block"

    def units(self, shape, in_axis, out_axis):
        rows, cols = self._matrix_shape(shape, out_axis)
        br, bc = self.block_shape
        return math.ceil(rows / br) * math.ceil(cols / bc)  # exact sparsity when blocks tile the matrix

    def validate(self, shape, in_axis, out_axis, where):
        if self.units(shape, in_axis, out_axis) < 2:
            rows, cols = self._matrix_shape(shape, out_axis)
            raise ValueError(
                f"{where}: block {self.block_shape} covers the whole weight (shape {tuple(shape)}, seen as a "
                f"{rows}x{cols} matrix), so pruning one block would zero the layer. Fix: a smaller "
                "block_shape, or leave this layer out of pruning (`layers=`)."
            )

    def mask(self, weight, sparsity, in_axis, out_axis):
        ndim = len(weight.shape)
        out_axis = _axis(out_axis, ndim)
        moved = ops.moveaxis(ops.abs(weight), out_axis, -1)
        moved_shape = moved.shape
        rows, cols = self._matrix_shape(weight.shape, out_axis)
        br, bc = self.block_shape
        gr, gc = math.ceil(rows / br), math.ceil(cols / bc)
        mat = ops.reshape(moved, (rows, cols))
        pad = ((0, gr * br - rows), (0, gc * bc - cols))
        padded = ops.pad(mat, pad)
        ones = ops.pad(ops.ones((rows, cols), weight.dtype), pad)
        blocks = ops.sum(ops.reshape(padded, (gr, br, gc, bc)), axis=(1, 3))
        counts = ops.sum(ops.reshape(ones, (gr, br, gc, bc)), axis=(1, 3))
        scores = ops.reshape(blocks / counts, (-1,))
        keep = prune_lowest(scores, _num_pruned(sparsity, gr * gc))
        keep = ops.reshape(ops.cast(keep, weight.dtype), (gr, 1, gc, 1))
        keep = ops.reshape(ops.tile(keep, (1, br, 1, bc)), (gr * br, gc * bc))[:rows, :cols]
        return ops.moveaxis(ops.reshape(keep, moved_shape), -1, out_axis)

    def get_config(self):
        return {"block_shape": list(self.block_shape)}

    def describe(self):
        return "block {}x{}".format(*self.block_shape)


@keras.saving.register_keras_serializable(package="tfopt")
class Channel(Structure):
    """Prunes whole output channels (filters, units) of lowest L2 norm.

    Only the kernel is masked; the bias of a pruned channel is kept, so the
    channel outputs `activation(bias)`. Physically removing channels needs the
    next layer to shrink too, which this structure leaves to the user.

    Example:
    >>> import numpy as np
    >>> w = np.array([[1.0, 0.1, 2.0], [1.0, 0.1, 2.0]], "float32")
    >>> np.asarray(Channel().mask(w, 0.34, 0, -1)).tolist()
    [[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]]
    """

    name = "channel"
    unit = "channel"

    def units(self, shape, in_axis, out_axis):
        return shape[_axis(out_axis, len(shape))]

    def mask(self, weight, sparsity, in_axis, out_axis):
        ndim = len(weight.shape)
        out_axis = _axis(out_axis, ndim)
        moved = ops.moveaxis(weight, out_axis, -1)
        channels = moved.shape[-1]
        norms = ops.sqrt(ops.sum(ops.square(ops.reshape(moved, (-1, channels))), axis=0))
        keep = ops.cast(prune_lowest(norms, _num_pruned(sparsity, channels)), weight.dtype)
        keep = ops.broadcast_to(keep, moved.shape)
        return ops.moveaxis(keep, -1, out_axis)


_NAMES = {
    "unstructured": Unstructured,
    "channel": Channel,
    "filter": Channel,
    # The blocks LiteRT's sparse FULLY_CONNECTED kernels run (`tfopt.export(sparse=True)`):
    # 4 (float) or 16 (int8) consecutive weights along the input axis of one output unit.
    "litert_1x4": lambda: Block((4, 1)),
    "litert_1x16": lambda: Block((16, 1)),
}


def get(identifier):
    """Returns a `Structure` from None, a name, an "N:M" string, a block tuple or a config.

    Accepted: None or "unstructured"; "channel" / "filter"; "2:4" (any "N:M");
    a tuple `(rows, cols)` for blocks; "litert_1x4" / "litert_1x16", the
    blocks LiteRT's sparse FULLY_CONNECTED kernels run in float / int8 (4 or
    16 consecutive inputs of one output: `(4, 1)`, `(16, 1)` on a Dense
    kernel; see `tfopt.export(sparse=True)`); a `Structure`.

    Example:
    >>> get("2:4")
    NM(n=2, m=4)
    >>> get((1, 4))
    Block(block_shape=[1, 4])
    """
    if identifier is None:
        return Unstructured()
    if isinstance(identifier, Structure):
        return identifier
    if isinstance(identifier, str):
        key = identifier.strip().lower()
        if key in _NAMES:
            return _NAMES[key]()
        if ":" in key:
            parts = key.split(":")
            if len(parts) == 2 and all(p.strip().isdigit() for p in parts):
                return NM(int(parts[0]), int(parts[1]))
    if isinstance(identifier, (tuple, list)):
        return Block(identifier)
    if isinstance(identifier, dict):
        obj = keras.saving.deserialize_keras_object(identifier)
        if isinstance(obj, Structure):
            return obj
    raise ValueError(
        f"Unknown pruning structure: structure={identifier!r}. Expected None or "
        "'unstructured', 'channel' (alias 'filter'), 'litert_1x4', 'litert_1x16', an 'N:M' string such as '2:4', "
        "a block shape such as (1, 4), or a `tfopt.sparsity.Structure`."
    )


def serialize(structure):
    return keras.saving.serialize_keras_object(structure)


def validate_finite(value, where):
    """Raises if `value` (a concrete array) holds NaN or Inf."""
    arr = np.asarray(keras.ops.convert_to_numpy(value))
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.sum(np.isfinite(arr)))
        raise ValueError(
            f"{where} holds {bad} NaN/Inf value(s); a magnitude mask computed from them "
            "would be meaningless. Fix the weights first (re-initialize, or restore a "
            "checkpoint from before training diverged)."
        )
