"""`summary`: what was pruned, layer by layer, as a table and as data."""

import keras
import numpy as np
from keras import ops

from tfopt import _keras_internal, geometry, pruning

__all__ = ["summary", "overall_sparsity", "prunable_values", "zero_fraction", "macs", "total_macs"]


def macs(model):
    """Multiply-adds of one example through `model`, per layer: `{layer name:
    count}` in graph order, every call of a shared layer counted, nested
    models' layers included; layers without weights count 0. A layer whose
    count tfopt does not know (a custom layer with weights) is None, and so is
    the result for a subclassed model (it has no graph to read).

    Example:
    >>> import keras
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="a"),
    ...                           keras.layers.Dense(2, name="b")])
    >>> macs(model)
    {'a': 32, 'b': 8}
    """
    if not _keras_internal.is_graph_network(model) or not model.built or not model.inputs:
        return None
    out = {}
    for layer, node in reversed(_keras_internal.graph_calls(model)):
        if isinstance(layer, keras.Model) or _keras_internal.is_input_layer(layer):
            continue
        count = geometry.macs(layer, [tuple(t.shape) for t in _keras_internal.node_inputs(node)],
                              [tuple(t.shape) for t in _keras_internal.node_outputs(node)])
        previous = out.get(layer.name, 0)
        out[layer.name] = None if count is None or previous is None else previous + count
    return out


def total_macs(counts):
    """The sum of `macs(model)`'s counts (unknown layers left out), or None."""
    if counts is None:
        return None
    return int(sum(c for c in counts.values() if c is not None))


def prunable_values(model, pruned_only=False):
    """`(layer, PrunableWeight, numpy value)` for every prunable weight of
    `model` (only those a mask prunes, with `pruned_only`)."""
    for layer in _keras_internal.all_layers(model):
        for pw in pruning.prunable_weights(layer):
            if pruned_only and pruning.record_of(pw.variable) is None:
                continue
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


def summary(model, print_fn=print):
    """Prints and returns a per-layer pruning table.

    One row per prunable weight: layer name and type, the layer's parameter
    count, the weight's size, its nonzeros and sparsity (measured on the
    weights themselves), and the structure and schedule pruning it ("-" when
    nothing prunes it). A last row totals the whole model: its `size` is
    every parameter, `nonzeros` what is left after pruning. `macs` is the
    layer's multiply-adds per example (on its first row; see `macs`), the
    total row's the whole model's: compare a model with its `tfopt.shrink`
    result to see what removing channels saves (zeros left in place by
    unstructured pruning save nothing on most runtimes, so they are not
    subtracted).

    Args:
        model: a built Keras model.
        print_fn: called with the rendered table; None to only return the rows.

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
    rows = []
    state = _state_ids(model)
    counts = macs(model)
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
                "macs": "" if layer.name in counted else ("-" if counts is None or counts.get(layer.name) is None
                                                          else counts[layer.name]),
            }
        )
        counted.add(layer.name)
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
            "macs": "-" if counts is None else total_macs(counts),
        }
    )
    if print_fn is not None:
        print_fn(render(rows))
    return rows


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
