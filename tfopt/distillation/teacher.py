"""Caching the teacher: `attach_teacher` runs it once and packs its outputs into the targets.

Packed targets are, per sample, a `(2, classes)` array: row 0 the label,
one-hot (all zeros: no label), row 1 the teacher's logits (probabilities are
converted with `log`). A sequence model's (a language model's `(batch, seq,
vocab)` logits) are packed per position, keeping the teacher's top-k logits:
`(n, seq, 2, k + 1)`, row 0 `[label, top-k indices]` and row 1 `[weight,
top-k logits]` (see `tfopt.distillation.sequence`).
"""

import numbers
import re
import sys
import warnings

import keras
import numpy as np

from tfopt.distillation import sequence
from tfopt.distillation._models import _ends_in_softmax, _input_shapes, _model_classes, _model_vocab, _output_shape
from tfopt.distillation.losses import _TINY, _check_teacher_outputs, _width_mismatch


def _as_2d(a):
    a = np.asarray(a)
    return a.reshape(len(a), -1) if a.ndim != 2 else a


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else (next(iter(x.values())) if isinstance(x, dict) else x)


def _length(x):
    return len(_first(x))


def _concat(parts):
    first = parts[0]
    if isinstance(first, (list, tuple)):
        return type(first)(np.concatenate([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: np.concatenate([p[k] for p in parts]) for k in first}
    return np.concatenate(parts)


def _dataset_to_arrays(dataset):
    xs, ys, labelled = [], [], None
    for element in dataset.as_numpy_iterator():
        has_y = isinstance(element, tuple) and len(element) >= 2
        if labelled is None:
            labelled = has_y
        if has_y != labelled:
            raise ValueError("attach_teacher: the dataset mixes (x, y) and x-only elements.")
        xs.append(element[0] if has_y else element)
        if has_y:
            ys.append(element[1])
    if not xs:
        raise ValueError("attach_teacher: the dataset is empty.")
    return _concat(xs), (np.concatenate(ys) if labelled else None), len(_first(xs[0]))


def _parts(x):
    """`(structure, [arrays])` of model inputs: one array, a list/tuple, or a dict."""
    if isinstance(x, dict):
        return ("dict", tuple(sorted(x))), [x[k] for k in sorted(x)]
    if isinstance(x, (list, tuple)):
        return ("list", len(x)), list(x)
    return ("array", 1), [x]


def _check_unlabelled(x, unlabelled):
    """Refuses unlabelled inputs that are not shaped like the labelled ones, before concatenating."""
    (kind_x, keys_x), parts_x = _parts(x)
    (kind_u, keys_u), parts_u = _parts(unlabelled)
    if (kind_x, keys_x) != (kind_u, keys_u):
        def describe(kind, keys):
            if kind == "dict":
                return f"a dict with keys {list(keys)}"
            return f"a list of {keys} arrays" if kind == "list" else "one array"

        raise ValueError(
            f"attach_teacher: `unlabelled` must be structured like the labelled inputs `x`, which are "
            f"{describe(kind_x, keys_x)}. Received: unlabelled as {describe(kind_u, keys_u)}. "
            "Fix: pass the unlabelled inputs in the same structure as x."
        )
    names = keys_x if kind_x == "dict" else range(len(parts_x))
    for name, px, pu in zip(names, parts_x, parts_u):
        shape_x, shape_u = tuple(np.shape(px)), tuple(np.shape(pu))
        if shape_x[1:] != shape_u[1:]:
            which = "" if kind_x == "array" else f" (input {name!r})"
            raise ValueError(
                f"attach_teacher: the unlabelled inputs{which} have shape {shape_u} but the labelled inputs "
                f"`x` have shape {shape_x}: each unlabelled sample must have the labelled samples' shape "
                f"{shape_x[1:]}. Received: unlabelled of shape {shape_u}. Fix: preprocess the unlabelled "
                f"inputs like x, to shape (n,) + {shape_x[1:]}."
            )


def _rows_are_probabilities(outputs):
    """Every row non-negative and summing to 1 within 1e-3 (a softmax's output)."""
    o = np.asarray(outputs, "float64")
    return (o.ndim == 2 and o.shape[0] > 0 and o.shape[1] > 1 and bool(np.all(o >= 0))
            and bool(np.all(np.abs(o.sum(axis=1) - 1.0) <= 1e-3)))


def _probabilities_warning(who, teacher_name, reason):
    return (
        f"{who}: the teacher{teacher_name} outputs probabilities, not logits ({reason}). Softened by a "
        "temperature, probabilities give nearly uniform targets, so they are converted with log() to act "
        "as logits (softmax(log(p) / T) is the teacher's distribution softened by T). To silence this "
        "warning, pass logits (remove the teacher's final softmax) or declare them with "
        '`teacher_outputs="probabilities"`.'
    )


def _teacher_logits(outputs, teacher, teacher_outputs):
    """attach_teacher's teacher outputs as float32 logits (probabilities converted with log)."""
    outputs = _as_2d(outputs).astype("float32")
    if teacher_outputs == "logits":
        return outputs
    if teacher_outputs == "probabilities":
        if outputs.size and outputs.min() < 0:
            raise ValueError(
                f"attach_teacher: `teacher_outputs=\"probabilities\"` but the teacher's outputs have negative "
                f"values (min {outputs.min():.4g}), so they are logits. Received: teacher_outputs="
                "'probabilities'. Fix: pass teacher_outputs=\"logits\", or leave it None to detect."
            )
    else:
        softmax = _ends_in_softmax(teacher)
        if not softmax and not _rows_are_probabilities(outputs):
            return outputs
        name = f" '{teacher.name}'" if isinstance(teacher, keras.Model) else ""
        reason = ("its final activation is softmax" if softmax else
                  f"each of its {len(outputs)} output rows is non-negative and sums to 1")
        warnings.warn(_probabilities_warning("attach_teacher", name, reason), UserWarning, stacklevel=3)
    return np.log(np.maximum(outputs, _TINY)).astype("float32")


def _student_classes(student):
    if student is None or isinstance(student, keras.Model):
        return _model_classes(student)
    if isinstance(student, numbers.Integral) and not isinstance(student, (bool, np.bool_)) and student > 0:
        return int(student)
    raise ValueError(
        "attach_teacher: `student` must be the student model or its number of classes (an int > 0). "
        f"Received: student={student!r}"
    )


def _pack(labels, logits):
    """`(n, 2, K)`: one-hot labels (all zeros: none) over the teacher's logits."""
    n, classes = logits.shape
    one_hot = np.zeros((n, classes), "float32")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] == 1):
            flat = labels.reshape(-1)
            if np.issubdtype(flat.dtype, np.floating) and not np.all(flat == np.round(flat)):
                raise ValueError(
                    f"attach_teacher: integer class labels expected; received {flat.dtype} labels such as "
                    f"{flat[flat != np.round(flat)][0]!r}. Fix: pass class indices (or -1 for none), or "
                    f"one-hot labels of shape (n, {classes})."
                )
            if flat.size and (flat.max() >= classes or flat.min() < -1):
                raise ValueError(
                    f"attach_teacher: labels must be class indices in [0, {classes}) (or -1 for none) for a "
                    f"teacher with {classes} outputs. Received labels from {flat.min()} to {flat.max()}."
                )
            index = flat.astype(np.int64)
            rows = np.nonzero(index >= 0)[0]
            one_hot[rows, index[rows]] = 1.0
        elif labels.ndim == 2 and labels.shape[1] == classes:
            one_hot = labels.astype("float32")
        else:
            raise ValueError(
                f"attach_teacher: labels of shape {labels.shape} fit neither integer classes (n,) nor one-hot "
                f"(n, {classes}) for a teacher with {classes} outputs."
            )
    return np.stack([one_hot, logits], axis=1)


def _check_teacher_inputs(teacher, x):
    """Refuses inputs the teacher's graph does not take, before running it (a Functional/Sequential teacher)."""
    expected = _input_shapes(teacher)
    kind, parts = _parts(x)[0][0], _parts(x)[1]
    if expected is None or kind == "dict" or len(expected) != len(parts):
        return  # a subclassed teacher or dict inputs: `predict` says it, and attach_teacher wraps its error
    for index, (want, part) in enumerate(zip(expected, parts)):
        got = tuple(np.shape(part))
        fits = all(w is None or w == g for w, g in zip(want[1:], got[1:]))
        if fits and (len(got) == len(want) or (len(got) == len(want) - 1 and want[-1] == 1)):
            continue  # Keras adds a missing last axis of 1 itself
        which = "" if len(parts) == 1 else f" (input {index})"
        raise ValueError(
            f"attach_teacher: the teacher '{teacher.name}' takes inputs of shape {want}{which} (None: any size), "
            f"but the data's inputs have shape {got}. Received: x of shape {got}. Fix: pass inputs shaped "
            f"(n, {', '.join(map(str, want[1:]))}), preprocessed as for the teacher, or the teacher these "
            "inputs are for."
        )


def _slice(x, start, stop):
    if isinstance(x, dict):
        return {key: value[start:stop] for key, value in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(value[start:stop] for value in x)
    return x[start:stop]


def _loaded_tensorflow():
    """TensorFlow if this process has imported it, else None: `attach_teacher` takes a
    `tf.data.Dataset` (whose caller imported TensorFlow) on any backend, and imports nothing
    itself, so under JAX it loads no TensorFlow."""
    return sys.modules.get("tensorflow")


def _is_dataset(data):
    tf = _loaded_tensorflow()
    return tf is not None and isinstance(data, tf.data.Dataset)


def _to_dataset(x, packed, batch_size):
    """`(x, packed)` as the `tf.data.Dataset` of batches `attach_teacher` returns for a dataset."""
    return _loaded_tensorflow().data.Dataset.from_tensor_slices((x, packed)).batch(batch_size)


def _run_teacher(teacher, x, run):
    """`run()`'s outputs; a teacher that cannot run on `x` is a ValueError naming it and the data's shapes."""
    tf = _loaded_tensorflow()
    errors = (ValueError, TypeError) + ((tf.errors.InvalidArgumentError,) if tf is not None else ())
    try:
        outputs = run()
    except errors as error:
        shapes = [tuple(np.shape(part)) for part in _parts(x)[1]]
        first = _first_line(error)
        raise ValueError(
            f"attach_teacher: the teacher '{teacher.name}' ({type(teacher).__name__}) could not run on the "
            f"data ({type(error).__name__}: {first}). Received: inputs of shape "
            f"{', '.join(map(str, shapes))}. Fix: pass the inputs the teacher was trained on, shaped and "
            "preprocessed the same way."
        ) from error
    if isinstance(outputs, (list, tuple, dict)):
        raise ValueError(
            "attach_teacher: the teacher has several outputs; distillation needs one "
            "(batch, classes) output. Wrap it in a model that returns the head to distill."
        )
    return outputs


def _not_a_sequence(teacher_name, shape, top_k):
    return ValueError(
        f"attach_teacher: `top_k` keeps the teacher's top-k logits per position of a sequence model's "
        f"(batch, seq, vocab) output, but the teacher{teacher_name} outputs shape {shape}. Received: "
        f"top_k={top_k}. Fix: leave top_k=None for a classifier (its whole output is cached)."
    )


def _sequence_targets(x, y, n, teacher, top_k, batch_size, teacher_outputs, student_vocab):
    """attach_teacher's packed targets for a sequence teacher: `(n, seq, 2, k + 1)` (see the module docstring).

    The teacher runs batch by batch and only its top-k logits per position are kept, so the
    full `(n, seq, vocab)` outputs are never held."""
    is_model = isinstance(teacher, keras.Model)
    name = f" '{teacher.name}'" if is_model else ""
    graph_vocab = _model_vocab(teacher)
    sequence.check_top_k_fits(top_k, graph_vocab, name)
    if student_vocab is not None and graph_vocab not in (None, student_vocab):
        raise sequence.vocab_mismatch("attach_teacher", graph_vocab, student_vocab, f"teacher{name}")
    probabilities = teacher_outputs == "probabilities"
    if teacher_outputs is None and _ends_in_softmax(teacher):
        probabilities = True
        warnings.warn(_probabilities_warning("attach_teacher", name, "its final activation is softmax"),
                      UserWarning, stacklevel=3)
    values, indices = [], []
    for start in range(0, n, batch_size if is_model else n):
        if is_model:
            out = _run_teacher(teacher, x, lambda: teacher.predict_on_batch(_slice(x, start, start + batch_size)))
        else:
            out = teacher
        out = np.asarray(out)
        if out.ndim != 3:
            raise _not_a_sequence(name, out.shape, top_k)
        if not np.issubdtype(out.dtype, np.floating):
            raise ValueError(
                f"attach_teacher: the teacher's outputs are {out.dtype}, not floats; distillation needs logits "
                "or probabilities."
            )
        vocab = out.shape[-1]
        sequence.check_top_k_fits(top_k, vocab, name)
        if student_vocab is not None and vocab != student_vocab:
            raise sequence.vocab_mismatch("attach_teacher", vocab, student_vocab,
                                          f"teacher outputs of shape {out.shape}")
        if probabilities:
            if out.size and out.min() < 0:
                raise ValueError(
                    f"attach_teacher: `teacher_outputs=\"probabilities\"` but the teacher's outputs have negative "
                    f"values (min {out.min():.4g}), so they are logits. Received: teacher_outputs="
                    "'probabilities'. Fix: pass teacher_outputs=\"logits\", or leave it None to detect."
                )
            out = np.log(np.maximum(out, _TINY))
        v, i = sequence.top_k_numpy(out, top_k or vocab)
        values.append(v)
        indices.append(i)
    values, indices = np.concatenate(values), np.concatenate(indices)
    seq = values.shape[1]
    weights = np.ones((n, seq), "float32")
    if isinstance(x, dict) and "padding_mask" in x:
        mask = np.asarray(x["padding_mask"])
        if mask.shape != (n, seq):
            raise ValueError(
                f"attach_teacher: the inputs' padding_mask has shape {mask.shape} but the teacher outputs {seq} "
                f"positions for each of the {n} sequences. Received: padding_mask of shape {mask.shape}. Fix: "
                f"pass a padding_mask shaped like token_ids, ({n}, {seq})."
            )
        weights = mask.astype("float32")
    return sequence.pack(_sequence_labels(y, n, seq, vocab), weights, values, indices)


def _sequence_labels(y, n, seq, vocab):
    """`(n, seq)` next-token labels as floats (-1: none), checked against the teacher's outputs."""
    if y is None:
        return np.full((n, seq), -1.0, "float32")
    labels = np.asarray(y)
    if labels.ndim == 3 and labels.shape[-1] == 1:
        labels = labels[..., 0]
    if labels.ndim != 2 or labels.shape[1] != seq:
        raise ValueError(
            f"attach_teacher: the labels have shape {labels.shape} but the teacher outputs {seq} positions per "
            f"sequence: sequence labels are the next token at each output position, shape (n, {seq}). Received: "
            f"y of shape {labels.shape}. Fix: pass y = token_ids[:, 1:] with x = token_ids[:, :-1] (-1: no label)."
        )
    if np.issubdtype(labels.dtype, np.floating) and not np.all(labels == np.round(labels)):
        raise ValueError(
            f"attach_teacher: sequence labels must be token ids (or -1 for none); received {labels.dtype} "
            "labels that are not whole numbers. Fix: pass the next tokens' ids."
        )
    if labels.size and (labels.min() < -1 or (vocab is not None and labels.max() >= vocab)):
        raise ValueError(
            f"attach_teacher: sequence labels must be token ids in [0, {vocab}) (or -1 for none). Received labels "
            f"from {labels.min()} to {labels.max()}."
        )
    return labels.astype("float32")


def _first_line(error):
    """The line of a Keras/TensorFlow error that says what went wrong (not "Exception encountered ...")."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line and not line.startswith("Exception encountered")]
    return lines[0].rstrip(".") if lines else type(error).__name__


def attach_teacher(data, teacher, unlabelled=None, batch_size=256, teacher_outputs=None, student=None,
                   top_k=None):
    """Runs `teacher` once over `data` and returns it with the teacher's outputs in the targets.

    Args:
        data: `(x, y)` (arrays; `x` may be a list or dict of arrays for
            multi-input models; `y` integer classes or one-hot), `x` alone (a
            transfer set without labels), or a finite `tf.data.Dataset` of
            `(x, y)` or `x` batches.
        teacher: a Keras model (run with `training=False`, batched, under the
            strategy it was built in), or the teacher's outputs already
            computed (an array with one row per sample of `data`).
        unlabelled: extra inputs without labels (more samples the teacher
            labels), appended after `data`'s; shaped like `data`'s inputs.
        batch_size: the teacher's batch size (and the returned dataset's, for
            array inputs given as a dataset: its first batch's size).
        teacher_outputs: None (detect: outputs that are probabilities, from a
            final softmax or rows non-negative summing to 1, are converted
            with `log` with a warning), "logits" (use as they are), or
            "probabilities" (convert with `log`, no warning).
        student: optional, the student model (or its number of classes, or
            of tokens for a sequence model), to check now that the teacher
            outputs one value per student class; otherwise
            `DistillationLoss` checks at its first call.
        top_k: for a sequence teacher (a language model with
            `(batch, seq, vocab)` logits): how many of its largest logits to
            keep per position (an integer in [1, vocab]); None keeps the
            whole vocabulary (exact, but `n * seq * vocab` values). The
            teacher runs batch by batch, so its full outputs are never held.

    Returns:
        `(x, y_packed)` arrays for array inputs, or a `tf.data.Dataset` of
        `(x, y_packed)` batches for a dataset (held in memory). `y_packed` has
        shape `(n, 2, classes)`: per sample the one-hot label (all zeros: no
        label) and the teacher's logits. Use them with a student compiled
        with `DistillationLoss`. For a sequence teacher `y_packed` has shape
        `(n, seq, 2, k + 1)`: per position `[label, top-k token indices]`
        over `[weight, top-k logits]`, where the label is the next token
        (`y` of shape `(n, seq)`, -1: none) and the weight the inputs'
        `"padding_mask"` (dict inputs, as keras-hub's CausalLMs take; 1
        without one), so padding does not count in `DistillationLoss`.

    Raises:
        ValueError: `data` holds no samples; inputs of a shape a Functional
            or Sequential teacher does not take (checked before running it;
            a subclassed teacher's error is reported with its name and the
            data's shape); labels or cached outputs that do not fit.

    Caching is valid when the student will see exactly these inputs: not with
    random augmentation (use `Distiller`). Shuffling is fine.

    Example:
    >>> import keras, numpy as np
    >>> teacher = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    >>> x = np.zeros((4, 8), "float32")
    >>> x_fit, y_fit = attach_teacher((x, np.array([0, 1, 2, -1])), teacher)
    >>> y_fit.shape, y_fit[3, 0].tolist()  # sample 3 has no label
    ((4, 2, 3), [0.0, 0.0, 0.0])
    """
    teacher_outputs = _check_teacher_outputs(teacher_outputs, "attach_teacher")
    top_k = sequence.check_top_k(top_k)
    teacher_shape = _output_shape(teacher) if isinstance(teacher, keras.Model) else np.shape(teacher)
    is_sequence = top_k is not None or (teacher_shape is not None and len(teacher_shape) == 3)
    if top_k is not None and teacher_shape is not None and len(teacher_shape) != 3:
        raise _not_a_sequence(f" '{teacher.name}'" if isinstance(teacher, keras.Model) else "", teacher_shape,
                              top_k)
    if is_sequence:
        student_vocab = _model_vocab(student) if isinstance(student, keras.Model) else _student_classes(student)
        classes = None
    else:
        classes = _student_classes(student)
    if classes is not None and _model_classes(teacher) not in (None, classes):
        raise _width_mismatch("attach_teacher", _model_classes(teacher), classes, f"teacher '{teacher.name}'")
    as_dataset = _is_dataset(data)
    if as_dataset:
        x, y, batch_size = _dataset_to_arrays(data)
    elif isinstance(data, tuple) and len(data) == 2:
        x, y = data
    elif isinstance(data, tuple):
        raise ValueError(f"attach_teacher: `data` must be (x, y) or x; received a tuple of {len(data)}.")
    else:
        x, y = data, None
    if y is not None and len(y) != _length(x):
        raise ValueError(f"attach_teacher: x has {_length(x)} samples but y has {len(y)}.")
    if unlabelled is not None:
        _check_unlabelled(x, unlabelled)
        n_extra = _length(unlabelled)
        x = _concat([x, unlabelled])
        if y is not None:
            y = np.asarray(y)
            if is_sequence:  # next-token labels: -1, none
                y = np.concatenate([y, np.full((n_extra,) + y.shape[1:], -1, np.int64 if not np.issubdtype(
                    y.dtype, np.floating) else y.dtype)])
            elif y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1):
                y = y.reshape(-1)
                if not np.issubdtype(y.dtype, np.floating):
                    y = y.astype(np.int64)  # unsigned labels could not hold -1
                y = np.concatenate([y, np.full((n_extra,), -1, y.dtype)])
            else:
                y = np.concatenate([y, np.zeros((n_extra,) + y.shape[1:], y.dtype)])
    n = _length(x)
    if n == 0:
        shapes = [tuple(np.shape(part)) for part in _parts(x)[1]]
        raise ValueError(
            f"attach_teacher: `data` holds no samples (inputs of shape {', '.join(map(str, shapes))}), so there "
            "is nothing for the teacher to label. Received: 0 samples. Fix: pass at least one sample (check "
            "the split or filter that made `data`)."
        )
    if isinstance(teacher, keras.Model):
        _check_teacher_inputs(teacher, x)
    if is_sequence:
        if not isinstance(teacher, keras.Model) and len(teacher) != n:
            raise ValueError(
                f"attach_teacher: the cached teacher outputs have {len(teacher)} rows but the data has "
                f"{n} samples. Recompute them on exactly these inputs, in this order."
            )
        packed = _sequence_targets(x, y, n, teacher, top_k, batch_size, teacher_outputs, student_vocab)
        if as_dataset:
            return _to_dataset(x, packed, batch_size)
        return x, packed
    if isinstance(teacher, keras.Model):
        outputs = _run_teacher(teacher, x, lambda: teacher.predict(x, batch_size=batch_size, verbose=0))
        if np.ndim(outputs) == 3:  # a subclassed sequence model: its outputs, whole
            packed = _sequence_targets(x, y, n, np.asarray(outputs), None, n, teacher_outputs,
                                       _model_vocab(student) if isinstance(student, keras.Model) else classes)
            if as_dataset:
                return _to_dataset(x, packed, batch_size)
            return x, packed
    else:
        outputs = np.asarray(teacher)
        if len(outputs) != n:
            raise ValueError(
                f"attach_teacher: the cached teacher outputs have {len(outputs)} rows but the data has "
                f"{n} samples{' (unlabelled included)' if unlabelled is not None else ''}. Recompute "
                "them on exactly these inputs, in this order."
            )
    if not np.issubdtype(np.asarray(outputs).dtype, np.floating):
        raise ValueError(
            f"attach_teacher: the teacher's outputs are {np.asarray(outputs).dtype}, not floats; "
            "distillation needs logits or probabilities."
        )
    logits = _teacher_logits(outputs, teacher, teacher_outputs)
    if classes is not None and logits.shape[1] != classes:
        raise _width_mismatch("attach_teacher", logits.shape[1], classes,
                              f"teacher outputs of shape {tuple(np.shape(outputs))}")
    packed = _pack(y, logits)
    if as_dataset:
        return _to_dataset(x, packed, batch_size)
    return x, packed
