"""tfopt's own state about Keras objects, kept by tfopt, never planted on them.

Keras variables and layers are not tfopt's to decorate: an attribute set on
them is lost by a copy, collides with a future Keras attribute, and is
invisible to whoever reads the code. tfopt keeps what it knows about them
here, in registries keyed weakly by the object's identity:

- `PRUNED`: variable -> `PruneRecord` (its mask, structure, schedule, axes),
  written by whoever attaches pruning (a tfopt layer or the Pruning callback),
  read by `strip`, `summary`, export and TensorBoard;
- `TRAINING_LENGTH`: layer -> int64 variable holding the steps of the running
  `fit`, which resolves schedules given in percentages, in-graph;
- `QUANTIZATION_TIMES`: layer -> `QuantizationTimes` (start and freeze steps as
  int64 variables), written by `tfopt.callbacks.QuantizationSchedule`;
- `ANNOTATIONS`: layer -> precision, the marks of `tfopt.compat.tfmot.quantize_annotate_*`;
- `PRUNING_CALLBACKS`: model -> the `tfopt.callbacks.Pruning` of its latest `fit`
  (two in one `fit` are refused).

Values the train step reads are variables, so changing them never forces a
retrace. The one switch read while tracing is `export_scope()`: the converter
traces the model once more, and in that trace every fake-quant op must feed its
consumer directly (no schedule comparisons).
"""

import contextlib
import dataclasses
import weakref

__all__ = [
    "ObjectRegistry",
    "PruneRecord",
    "QuantizationTimes",
    "PRUNED",
    "TRAINING_LENGTH",
    "QUANTIZATION_TIMES",
    "ANNOTATIONS",
    "PRUNING_CALLBACKS",
    "export_scope",
    "exporting",
]


class ObjectRegistry:
    """A map from objects (by identity, held weakly) to tfopt records.

    Keras variables compare element-wise and are not reliably hashable, so
    entries are keyed by `id()` and dropped when the object is collected.

    Example:
    >>> class Thing: pass
    >>> registry, thing = ObjectRegistry(), Thing()
    >>> registry.set(thing, "record")
    >>> registry.get(thing), registry.get(Thing())
    ('record', None)
    """

    def __init__(self):
        self._items = {}

    def set(self, obj, value):
        key = id(obj)

        def drop(ref, key=key, items=self._items):
            entry = items.get(key)
            if entry is not None and entry[0] is ref:
                del items[key]

        self._items[key] = (weakref.ref(obj, drop), value)

    def get(self, obj, default=None):
        entry = self._items.get(id(obj))
        if entry is None or entry[0]() is not obj:
            return default
        return entry[1]

    def pop(self, obj, default=None):
        value = self.get(obj, default)
        if self._items.get(id(obj)) is not None and self._items[id(obj)][0]() is obj:
            del self._items[id(obj)]
        return value

    def __contains__(self, obj):
        return self.get(obj, _MISSING) is not _MISSING


_MISSING = object()


@dataclasses.dataclass
class PruneRecord:
    """What prunes one variable: its mask variable, the structure and schedule
    (None for a mask with no schedule of its own), its axes, and who attached it
    (the tfopt layer, or the Pruning callback)."""

    mask: object
    structure: object
    schedule: object
    in_axis: int
    out_axis: int
    owner: object = None


@dataclasses.dataclass
class QuantizationTimes:
    """Steps (int64 variables, compared with a layer's own step count in-graph)
    from which fake quantization is on, and from which activation ranges and
    folded BatchNormalization statistics stop moving (`NEVER`: never)."""

    start: object
    freeze_ranges: object
    freeze_batch_norm: object

    NEVER = 2**62


PRUNED = ObjectRegistry()
TRAINING_LENGTH = ObjectRegistry()
QUANTIZATION_TIMES = ObjectRegistry()
ANNOTATIONS = ObjectRegistry()
PRUNING_CALLBACKS = ObjectRegistry()  # model -> the Pruning callback of its latest fit

_EXPORTING = [False]


@contextlib.contextmanager
def export_scope():
    """Within it, layers trace for the LiteRT converter: fake quantization
    always on (schedules ignored), binary/ternary weights as constants."""
    _EXPORTING.append(True)
    try:
        yield
    finally:
        _EXPORTING.pop()


def exporting():
    """True while `tfopt.export` traces the model for the converter."""
    return _EXPORTING[-1]
