"""The arrays `tfopt.export` converts and checks with: validation, dicts, drawn samples."""

import re
import warnings

import keras
import numpy as np

from tfopt import _keras_internal


def symbolic_inputs(model):
    """The model's symbolic input tensors, or None (a subclassed or unbuilt model)."""
    try:
        tensors = model.inputs
    except (AttributeError, ValueError):
        return None
    return list(tensors) if tensors else None


def structured(model, arrays):
    """`arrays` (in `model.inputs` order) as the model takes them: a dict for a
    model with named dict inputs, else the list (or the one array)."""
    try:
        structure = model.input
    except (AttributeError, ValueError):  # a Sequential or subclassed model never called
        structure = None
    if isinstance(structure, dict) and len(keras.tree.flatten(structure)) == len(arrays):
        return keras.tree.pack_sequence_as(structure, list(arrays))
    return arrays if len(arrays) > 1 else arrays[0]


def flat_outputs(outputs):
    """A model's outputs as a list, dict outputs in key order."""
    if isinstance(outputs, dict):
        return [outputs[k] for k in sorted(outputs)]
    if isinstance(outputs, (list, tuple)):
        return list(outputs)
    return [outputs]


def input_keys(model, tensors):
    """For each of `tensors` (the model's inputs), the key a dict of arrays
    names it by: the model's own dict key for a dict-input model, else the
    input's name."""
    names = [_keras_internal.input_name(t) for t in tensors]
    try:
        structure = model.input
    except (AttributeError, ValueError):
        structure = None
    if not isinstance(structure, dict):
        return names
    by_id = {id(t): key for key, t in structure.items()}
    return [by_id.get(id(t), name) for t, name in zip(tensors, names)]


def _from_dict(model, data, argument):
    """A dict of arrays keyed by the model's input names, as a list in `model.inputs` order."""
    tensors = symbolic_inputs(model)
    received = sorted(str(k) for k in data)
    if tensors is None:
        raise ValueError(
            f"tfopt.export: `{argument}` is a dict (keys {received}), but model '{model.name}' "
            f"({type(model).__name__}) has no symbolic inputs, so tfopt cannot tell which key feeds which "
            "input. Fix: pass a list of arrays in the order the model takes them.")
    keys = input_keys(model, tensors)
    names = [_keras_internal.input_name(t) for t in tensors]
    chosen, missing = [], []
    for key, name in zip(keys, names):
        found = key if key in data else name if name in data else None
        if found is None:
            missing.append(key)
        chosen.append(found)
    unexpected = sorted(str(k) for k in data if k not in chosen)
    if missing or unexpected:
        raise ValueError(
            f"tfopt.export: `{argument}` is a dict keyed by {received}, but model '{model.name}' takes the "
            f"inputs {keys}: missing {missing}, unexpected {unexpected}. Fix: key the dict by the model's "
            f"input names {keys}, one array per input (each with a leading samples axis).")
    return [data[key] for key in chosen]


def as_arrays(model, data, argument):
    """`data` (an array, a list of arrays, or a dict of arrays keyed by the
    model's input names) as a list of NumPy arrays in `model.inputs` order."""
    if isinstance(data, dict):
        data = _from_dict(model, data, argument)
    arrays = data if isinstance(data, (list, tuple)) else [data]
    out = []
    for a in arrays:
        array = np.asarray(a)
        if array.ndim == 0 or array.dtype == object:
            raise TypeError(
                f"tfopt.export: `{argument}` must be an array with a leading samples axis, a list of "
                f"such arrays (one per model input), or a dict of them keyed by input name. Received: "
                f"{argument} of type {type(a).__name__}"
                + ("" if array.dtype == object else f" with shape {array.shape}")
                + ". Fix: pass np.asarray(samples), e.g. x_train[:500] (a tf.data.Dataset: stack its batches "
                "with np.concatenate([x for x, _ in dataset])).")
        out.append(array)
    return out


def _shape_text(shape):
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def check_arrays(model, arrays, argument):
    """Raises a ValueError unless `arrays` fit the model's inputs (None dims match any size)."""
    shapes = [a.shape for a in arrays]
    for array in arrays:
        if len(array) == 0:
            raise ValueError(
                f"tfopt.export: `{argument}` holds no samples (shape {array.shape}). "
                + ("int8 calibration would have nothing to measure, and the converter would silently "
                   "leave the model in float. Fix: pass a few hundred typical inputs, e.g. "
                   "representative_data=x_train[:500]." if argument == "representative_data" else
                   "Fix: pass at least one input to check on, e.g. inputs=x_test[:32], or check=False.")
            )
    if len({len(a) for a in arrays}) > 1:
        raise ValueError(
            f"tfopt.export: the arrays of `{argument}` hold different numbers of samples: shapes "
            f"{shapes}. Fix: pass one array per model input, all with the same number of samples.")
    tensors = symbolic_inputs(model)
    if tensors is None:
        return
    names = [_keras_internal.input_name(t) for t in tensors]
    if len(arrays) != len(tensors):
        raise ValueError(
            f"tfopt.export: model '{model.name}' takes {len(tensors)} input(s) {names}, but `{argument}` "
            f"holds {len(arrays)} array(s). Received: {argument} of shape(s) {[tuple(s) for s in shapes]}. "
            f"Fix: pass a list of {len(tensors)} arrays, in the order of model.inputs.")
    for name, tensor, array in zip(names, tensors, arrays):
        expected = tuple(tensor.shape)
        if len(array.shape) == len(expected) and all(
                e is None or e == r for e, r in zip(expected[1:], array.shape[1:])):
            continue
        wanted = _shape_text(("num_samples",) + expected[1:])
        hint = ""
        if len(array.shape) < len(expected):
            hint = (" (the last axis is missing: add it with x[..., np.newaxis])"
                    if len(array.shape) == len(expected) - 1 and expected[-1] == 1 else
                    f" (received {len(array.shape)} axes where the model takes {len(expected)}: is an axis, "
                    "such as channels, missing?)")
        raise ValueError(
            f"tfopt.export: `{argument}` does not fit model '{model.name}', input '{name}': expected shape "
            f"{_shape_text(expected)} (None: any size), received shape {tuple(array.shape)}. "
            f"Fix: pass arrays shaped {wanted}{hint}, the shape the model was built for.")


def check_finite(arrays, argument):
    """Raises a ValueError if float `arrays` hold NaN or Inf (calibration data)."""
    for i, array in enumerate(arrays):
        if not np.issubdtype(array.dtype, np.floating):
            continue
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            which = f" (array {i})" if len(arrays) > 1 else ""
            raise ValueError(
                f"tfopt.export: `{argument}`{which} holds {bad} NaN/Inf value(s) out of {array.size} "
                f"(shape {array.shape}); int8 calibration would measure NaN ranges, and the converter "
                "would silently leave those ops in float. Fix: drop or fill those samples, e.g. "
                "x = x[np.isfinite(x).reshape(len(x), -1).all(axis=1)].")


def check_num_samples(num_check_samples):
    """Raises a ValueError unless `num_check_samples` is a positive int."""
    if isinstance(num_check_samples, bool) or not isinstance(num_check_samples, (int, np.integer)) \
            or num_check_samples < 1:
        raise ValueError(
            "tfopt.export: `num_check_samples` is how many random inputs to check the file on when `inputs` "
            f"is not given, a positive int. Received: num_check_samples={num_check_samples!r}. Fix: pass "
            "num_check_samples=8 (or more), your own inputs=, or check=False to skip the check.")


def draw_samples(model, num_samples, seed):
    """`num_samples` random inputs shaped like the model's (None dims: 1); floats
    standard normal, integers 0 or 1."""
    tensors = symbolic_inputs(model)
    if tensors is None:
        raise ValueError(
            f"Model '{model.name}' ({type(model).__name__}) has no symbolic inputs (a "
            "subclassed model), so tfopt cannot draw check inputs for it. Pass "
            "`inputs=` (an array, or a list of arrays), or check=False."
        )
    rng = np.random.default_rng(seed)
    arrays = []
    for spec in tensors:
        shape = [num_samples] + [d if d is not None else 1 for d in spec.shape[1:]]
        dtype = keras.backend.standardize_dtype(spec.dtype)
        if "int" in dtype:
            arrays.append(rng.integers(0, 2, size=shape).astype(dtype))
        else:
            arrays.append(rng.standard_normal(shape).astype(dtype))
    return arrays


def fixed_shapes(model, arrays, error):
    """The shapes of `arrays` (without the batch axis) to convert `model` at, when the converter
    refused it for TF Select ("flex") ops that only its free (None) input dims need (keras-hub's
    Mistral attention slices a mask of free length: StridedSlice with a new axis); `error`
    re-raised otherwise. Without `arrays` (the user's `inputs`), a ValueError says to pass them."""
    tensors = symbolic_inputs(model) or []
    free = [t for t in tensors if None in tuple(t.shape)[1:]]
    if type(error).__name__ != "ConverterError" or "flex op" not in str(error) or not free:
        raise error
    found = re.search(r"TF Select ops: ([^\n]+)", str(error))
    ops = found.group(1).strip() if found else "see the converter's message"
    names = ", ".join(f"'{_keras_internal.input_name(t)}' {_shape_text(tuple(t.shape))}" for t in free)
    if arrays is None:
        raise ValueError(
            f"tfopt.export: the converter takes model '{model.name}' only at fixed input shapes: with free "
            f"dimensions (inputs {names}) it needs TF Select ops ({ops}), which the default LiteRT runtime "
            "lacks. Received: no `inputs`. Fix: pass inputs= of the shape the file should run at (e.g. token ids "
            "of the sequence length to serve); the file is then converted at that shape.") from error
    shapes = [tuple(a.shape[1:]) for a in arrays]
    fixed = ", ".join(f"'{_keras_internal.input_name(t)}' {_shape_text((None, *s))}" for t, s in zip(tensors, shapes))
    warnings.warn(
        f"tfopt.export: model '{model.name}' converts only at fixed input shapes (with free dimensions, inputs "
        f"{names}, the converter needs TF Select ops: {ops}), so the file takes the shapes of `inputs`: {fixed}. "
        "Fix: to run the file at another length, export again with inputs= of that length.", UserWarning,
        stacklevel=5)
    return shapes
