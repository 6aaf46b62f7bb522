"""`summary`: what was pruned, layer by layer, as a table and as data."""

import os
import sys
import zipfile

import keras
import numpy as np
from keras import ops

from tfopt import _keras_internal, geometry, pruning

__all__ = ["summary", "overall_sparsity", "prunable_values", "zero_fraction", "macs", "total_macs"]


def macs(model, sequence_length=None):
    """Multiply-adds of one example through `model`, per layer: `{layer name:
    count}` in graph order, every call of a shared layer counted, nested
    models' layers included; layers without weights count 0, and so would
    Keras operations on symbolic tensors (`outputs["x"]`, `ops.add`), which
    are left out. Recurrent, `Bidirectional` and `TimeDistributed` layers
    count every timestep (see `tfopt.geometry.macs`). A layer whose count
    tfopt does not know is None: a custom layer with weights, or a size the
    model leaves open (an input of shape `(None, None, features)`: how many
    timesteps; `tfopt.summary` gives such a layer's count per timestep).
    The result is None for a subclassed model (it has no graph to read).

    `sequence_length`: the length to count for an open sequence axis (the
    axis after the batch, None in the model's shapes), as in a language model
    whose inputs are `(batch, None)` token ids: keras-hub's backbones and causal
    LMs (their transformer blocks count projections, attention scores,
    feed-forward and norms; see `tfopt.adapters._keras_hub_geometry`), or a
    Dense or recurrent layer over `keras.Input((None, features))`.

    Example:
    >>> import keras
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="a"),
    ...                           keras.layers.Dense(2, name="b")])
    >>> macs(model)
    {'a': 32, 'b': 8}
    """
    calls = _calls(model, sequence_length)
    if calls is None:
        return None
    out = {}
    for layer, figures, _ in calls:
        count, steps = figures[0][1]
        previous = out.get(layer.name, 0)
        out[layer.name] = None if count is None or steps or previous is None else previous + count
    return out


def _sequence_length(value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(
            "`sequence_length` is the number of tokens (timesteps) to count for the open sequence axis of a "
            f"model's inputs, an int >= 1. Received: sequence_length={value!r}. Fix: e.g. sequence_length=128.")
    return int(value)


def _with_length(shape, sequence_length):
    """`shape` with an open axis after the batch set to `sequence_length` (if given)."""
    if sequence_length is None or len(shape) < 2 or shape[1] is not None:
        return shape
    return (shape[0], sequence_length) + tuple(shape[2:])


def _calls(model, sequence_length=None):
    """`[(layer, [(layer or wrapped layer, (count, per_timestep))], input shape)]`
    for every layer call in `model`'s graph, or None for a subclassed model.
    Each figure is `(count, False)`, `(count of one timestep, True)` where the
    number of timesteps is unknown, or `(None, False)` when unknown.
    `sequence_length` fills an open axis after the batch (see `macs`)."""
    sequence_length = _sequence_length(sequence_length)
    if not _keras_internal.is_graph_network(model) or not model.built or not model.inputs:
        return None
    if "keras_hub" in sys.modules:  # lazy: the adapter reads keras-hub layers (optional) and sits above reporting
        from tfopt.adapters import _keras_hub_geometry

        _keras_hub_geometry.register_model(model)
    out = []
    for layer, node in reversed(_keras_internal.graph_calls(model)):
        if (not isinstance(layer, keras.layers.Layer)  # an op on symbolic tensors: `outputs["x"]`, `ops.add`
                or isinstance(layer, keras.Model) or _keras_internal.is_input_layer(layer)):
            continue
        shapes = ([_with_length(tuple(t.shape), sequence_length) for t in _keras_internal.node_inputs(node)],
                  [_with_length(tuple(t.shape), sequence_length) for t in _keras_internal.node_outputs(node)])
        parts = geometry.macs(layer, *shapes, parts=True)
        steps = geometry.macs(layer, *shapes, per_timestep=True, parts=True) if parts[0][1] is None else None
        if steps is not None and steps[0][1] is not None:
            out.append((layer, [(sub, (count, True)) for sub, count in steps], (shapes[0] or [None])[0]))
        else:
            out.append((layer, [(sub, (count, False)) for sub, count in parts], (shapes[0] or [None])[0]))
    return out


class _Figure:
    """Multiply-adds summed over calls: a count per example plus a count per
    timestep (layers over a time axis of unknown length); unknown once any
    part is."""

    def __init__(self):
        self.fixed, self.per_step, self.known = 0, 0, True

    def add(self, count, per_timestep):
        if count is None:
            self.known = False
        elif per_timestep:
            self.per_step += count
        else:
            self.fixed += count

    def cell(self):
        if not self.known:
            return "-"
        if not self.per_step:
            return self.fixed
        return f"{self.per_step} per timestep" if not self.fixed else f"{self.fixed} + {self.per_step} per timestep"


def total_macs(counts):
    """The sum of `macs(model)`'s counts (unknown layers left out), or None."""
    if counts is None:
        return None
    return int(sum(c for c in counts.values() if c is not None))


def prunable_values(model, pruned_only=False):
    """`(layer, PrunableWeight, numpy value)` for every prunable weight of
    `model` (only those a mask prunes, with `pruned_only`), each once, under
    the outermost layer that holds it (an LSTM's kernel is its cell's too)."""
    seen = set()
    for layer in _keras_internal.all_layers(model):
        for pw in pruning.prunable_weights(layer):
            if id(pw.variable) in seen or (pruned_only and pruning.record_of(pw.variable) is None):
                continue
            seen.add(id(pw.variable))
            yield layer, pw, ops.convert_to_numpy(pw.variable)


def zero_fraction(values):
    """Fraction of zeros over a list of arrays, or None if they hold nothing."""
    total = sum(int(v.size) for v in values)
    return None if total == 0 else sum(int(np.sum(v == 0)) for v in values) / total


def overall_sparsity(model):
    """Fraction of zeros across every weight being pruned, or None if none is.

    Example:
    >>> import keras, tfopt
    >>> model = keras.Sequential([keras.Input((4,)), tfopt.layers.Dense(2, pruning_schedule="baseline")])
    >>> overall_sparsity(model)
    0.0
    """
    return zero_fraction([value for _, _, value in prunable_values(model, pruned_only=True)])


def summary(model, print_fn=print, sequence_length=None):
    """Prints and returns a per-layer pruning table.

    One row per prunable weight: layer name and type, the layer's parameter
    count, the weight's size, its nonzeros and sparsity (measured on the
    weights themselves), and the structure and schedule pruning it ("-" when
    nothing prunes it). A last row totals the whole model: its `size` is
    every parameter, `nonzeros` what is left after pruning. `macs` is the
    layer's multiply-adds per example (on its first row; see `macs`; the
    layers a `Bidirectional` or `TimeDistributed` layer wraps have their own
    share), the total row's the whole model's: compare a model with its
    `tfopt.shrink` result to see what removing channels saves (zeros left in
    place by unstructured pruning save nothing on most runtimes, so they are
    not subtracted). A recurrent layer whose number of timesteps the model
    leaves open (`keras.Input((None, features))`) shows its count per
    timestep (`"384 per timestep"`), and so does the total
    (`"16 + 384 per timestep"`); "-" is unknown (a custom layer type), left
    out of the total. A note under the printed table names those layers.

    Args:
        model: a built Keras model, or the path of a `.keras` file (loaded
            with tfopt's classes; a file holding Python code, such as a
            `Lambda` layer, needs `tfopt.load_model(path, safe_mode=False)`
            first).
        print_fn: called with the rendered table; None to only return the rows.
        sequence_length: the number of tokens `macs` counts for an open
            sequence axis (a language model's `(batch, None)` token ids, as in
            keras-hub models): see `macs`. Without it such layers' counts are
            unknown ("-"), and a note under the table says so.

    Returns:
        A list of dicts with keys `layer`, `type`, `weight`, `params`, `size`,
        `nonzeros`, `sparsity`, `structure`, `schedule`, `bits` (per weight once
        exported: the quantization-aware spec's, else the dtype's) and
        `est_bytes` (size x bits / 8, before any compression; the total row
        sums the listed weights only), `macs`; the last is the total
        (`layer == "total"`, `params` counting every model parameter; tfopt's
        masks and step counters are state, not parameters, and never counted).

    Example:
    >>> import keras, tfopt
    >>> model = keras.Sequential([keras.Input((4,)), tfopt.layers.Dense(2, pruning_schedule="baseline", name="dense")])
    >>> rows = summary(model, print_fn=None)
    >>> rows[0]["layer"], rows[0]["size"], rows[0]["structure"]
    ('dense', 8, 'unstructured')
    """
    model = _model_argument(model)
    rows = []
    state = _state_ids(model)
    calls = _calls(model, sequence_length)
    figures, total = {}, _Figure()  # id(layer) -> its _Figure; the model's
    for layer, parts, _ in calls or ():
        if parts[0][1][0] is not None:  # unknown layers are left out of the total (a note says which)
            total.add(*parts[0][1])
        for sub, (count, per_timestep) in parts:
            figures.setdefault(id(sub), _Figure()).add(count, per_timestep)
    counted = set()
    for layer, pw, value in prunable_values(model):
        info = pruning.record_of(pw.variable)
        nonzeros = int(np.count_nonzero(value))
        rows.append(
            {
                "layer": layer.name,
                "type": type(layer).__name__,
                "weight": pw.variable.name,
                "params": _layer_params(layer, state),
                "size": int(value.size),
                "nonzeros": nonzeros,
                "sparsity": 1.0 - nonzeros / value.size,
                "structure": "-" if info is None else info.structure.describe(),
                "bits": _weight_bits(layer, value),
                "est_bytes": int(np.ceil(value.size * _weight_bits(layer, value) / 8)),
                "schedule": "-" if info is None or info.schedule is None else repr(info.schedule),
                "macs": "" if id(layer) in counted else (figures[id(layer)].cell() if id(layer) in figures else "-"),
            }
        )
        counted.add(id(layer))
    params = _model_params(model)
    pruned_away = sum(r["size"] - r["nonzeros"] for r in rows)
    rows.append(
        {
            "layer": "total",
            "type": "",
            "weight": "",
            "params": params,
            "size": params,
            "nonzeros": params - pruned_away,
            "sparsity": pruned_away / params if params else 0.0,
            "structure": "",
            "schedule": "",
            "bits": "",
            "est_bytes": sum(r["est_bytes"] for r in rows),
            "macs": "-" if calls is None else total.cell(),
        }
    )
    if print_fn is not None:
        print_fn("\n".join([render(rows)] + _macs_notes(calls, sequence_length)))
    return rows


def _macs_notes(calls, sequence_length=None):
    """Lines under the summary table naming the layers whose multiply-adds
    are per timestep or unknown."""
    notes = []
    per_step = {layer.name: shape for layer, parts, shape in calls or () if parts[0][1][1]}
    if per_step:
        shapes = sorted({str(shape) for shape in per_step.values()})
        notes.append(
            f"macs: layers {sorted(per_step)} run over a time axis of unknown length (input shape "
            f"{', '.join(shapes)}), so their multiply-adds are per timestep, and the total's too. Fix: "
            "give the model's Input a fixed number of steps, keras.Input((steps, features)), for counts per example.")
    unknown = sorted({f"{layer.name} ({type(layer).__name__})" for layer, parts, _ in calls or ()
                      if parts[0][1][0] is None})
    if unknown:
        open_sequence = sequence_length is None and any(
            parts[0][1][0] is None and shape is not None and len(shape) > 1 and shape[1] is None
            for _, parts, shape in calls or ())
        notes.append(f"macs: unknown for layers {unknown} (a layer type tfopt cannot count, or a size the model "
                     "leaves open), so the total leaves them out."
                     + (" Their inputs have an open sequence axis (None after the batch). Fix: count for a "
                        "length, tfopt.summary(model, sequence_length=128)." if open_sequence else ""))
    return notes


def _model_argument(model):
    """`summary`'s model: a Keras model (or layer) as it is, a `.keras` file loaded."""
    if isinstance(model, keras.layers.Layer):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            "`tfopt.summary` takes a Keras model or the path of a `.keras` file. Received: "
            f"model={model!r:.80} of type {type(model).__name__}. Fix: pass the model, tfopt.summary(model), "
            "or the file it was saved to, tfopt.summary('model.keras').")
    path = os.fspath(model)
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"`tfopt.summary`: model={path!r} is a directory (a SavedModel?), not a Keras model or a `.keras` "
            "file. Fix: pass the Keras model, or save it with model.save('model.keras') and pass that file.")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"`tfopt.summary`: no file at model={path!r}. Fix: pass the path of an existing `.keras` file, "
            "or the model itself.")
    if not (path.endswith((".keras", ".h5", ".hdf5")) and (not path.endswith(".keras") or zipfile.is_zipfile(path))):
        raise ValueError(
            f"`tfopt.summary`: model={path!r} is not a `.keras` file (the zip archive `model.save('m.keras')` "
            "writes). Fix: pass a `.keras` file, or the Keras model itself.")
    try:  # tfopt's classes are registered: importing this module imported tfopt
        return keras.saving.load_model(path)
    except ValueError as e:
        if "safe_mode" not in str(e):
            raise
        raise ValueError(
            f"`tfopt.summary`: model={path!r} holds Python code (a Lambda layer), which Keras loads only with "
            "safe_mode=False. Fix: if you trust the file, model = tfopt.load_model(path, safe_mode=False), "
            "then tfopt.summary(model).") from None


def _state_ids(model):
    """ids of tfopt's own variables (masks, steps, ranges, folded BN), which
    are not model parameters (tfopt layers list them in `tfopt_variables()`)."""
    return {
        id(v)
        for layer in _keras_internal.all_layers(model)
        for _, v in (layer.tfopt_variables() if hasattr(layer, "tfopt_variables") else [])
    }


def _model_params(model):
    state = _state_ids(model)
    return int(sum(np.prod(v.shape) for v in model.weights if id(v) not in state))


def _layer_params(layer, state):
    return int(sum(np.prod(v.shape) for v in layer.weights if id(v) not in state))


def _weight_bits(layer, value):
    """Bits per weight once exported: the QAT spec's, else the variable's dtype."""
    spec = getattr(layer, "weight_quant_spec", None)
    if spec is not None:
        return spec.stored_bits
    return value.dtype.itemsize * 8


def render(rows, columns=("layer", "type", "weight", "size", "nonzeros", "sparsity", "structure", "bits",
                          "est_bytes", "macs")):
    """Renders rows of dicts as a plain-text table."""

    def cell(value):
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    table = [list(columns)] + [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
