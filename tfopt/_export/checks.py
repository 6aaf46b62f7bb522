"""What `tfopt.export` checks around the conversion: finite weights before it,
and after it the file's outputs against the Keras model's (and a sparse
file's against the dense one's)."""

import dataclasses
import warnings

import keras
import numpy as np

from tfopt import _keras_internal

# Below this arg-max agreement on the check inputs, export warns.
AGREEMENT_WARNING = 0.9
# A sparse-encoded file whose outputs differ from the dense file's by more than this
# fraction of the dense outputs' largest magnitude computes something else (measured:
# int8 in 1x16 blocks differs by 0.8%, one or two output quantization steps; int16x8 in
# 1x16 blocks by 200%, arg-max agreeing on 19% of inputs).
SPARSE_TOLERANCE = 0.05


def check_weights_finite(model):
    """Raises a ValueError naming the first weight of `model` that holds NaN or Inf."""
    owner = {}
    for layer in reversed(_keras_internal.all_layers(model)):  # the innermost layer owning a weight names it
        for weight in layer.weights:
            owner.setdefault(id(weight), layer)
    for weight in model.weights:
        if not np.issubdtype(np.dtype(keras.backend.standardize_dtype(weight.dtype)), np.floating):
            continue
        value = np.asarray(weight.numpy())
        bad = int(value.size - np.count_nonzero(np.isfinite(value)))
        if bad:
            layer = owner.get(id(weight), model)
            raise ValueError(
                f"tfopt.export: layer '{layer.name}' ({type(layer).__name__}) of model '{model.name}', weight "
                f"'{weight.name}' (shape {tuple(weight.shape)}), holds {bad} NaN/Inf value(s) out of "
                f"{value.size}: every output it feeds would be NaN, in the file as in Keras. Fix: export "
                "finite weights (restore them from a checkpoint saved before training diverged; a lower "
                "learning rate or gradient clipping keeps them finite).")


@dataclasses.dataclass
class Parity:
    """How a LiteRT file's outputs compare with a reference model's on the same inputs.

    Attributes:
        max_abs_diff: the largest absolute difference over every output
            (NaN when an output holds NaN).
        top1_agreement: the fraction of inputs whose first output has the same
            arg-max in both (of input steps, for a (samples, steps, classes)
            output such as a language model's next-token logits), an input
            with a NaN/Inf output counting as disagreeing; None unless that
            output is (samples, classes > 1) or (samples, steps, classes > 1).
        non_finite_file: inputs whose outputs hold NaN/Inf in the file.
        non_finite_reference: the same in the reference.
    """

    max_abs_diff: float
    top1_agreement: float | None
    non_finite_file: int = 0
    non_finite_reference: int = 0


def _non_finite_rows(outputs, num_samples):
    bad = np.zeros(num_samples, bool)
    for out in outputs:
        out = np.asarray(out)
        if out.ndim and len(out) == num_samples and np.issubdtype(out.dtype, np.floating):
            bad |= ~np.isfinite(out.reshape(num_samples, -1)).all(axis=1)
    return bad


def compare(got, expected, num_samples):
    """The `Parity` of outputs `got` (the file's) against `expected` (a model's)."""
    if len(got) != len(expected):
        raise RuntimeError(f"The LiteRT file has {len(got)} outputs but the Keras model {len(expected)}.")
    max_diff = max(float(np.max(np.abs(np.asarray(g, "float64") - np.asarray(e, "float64"))))
                   for g, e in zip(got, expected))
    bad_file, bad_reference = _non_finite_rows(got, num_samples), _non_finite_rows(expected, num_samples)
    top1 = None
    if expected[0].ndim in (2, 3) and expected[0].shape[-1] > 1:
        same = np.argmax(got[0], -1) == np.argmax(expected[0], -1)  # (samples,) or (samples, steps)
        ok = (~bad_file & ~bad_reference).reshape((-1,) + (1,) * (same.ndim - 1))
        top1 = float(np.mean(same & ok))
    return Parity(max_diff, top1, int(bad_file.sum()), int(bad_reference.sum()))


def warn_if_disagreeing(parity, precision, arrays, inputs_given, stacklevel):
    """Warns when the file disagrees with the model on the check inputs, or gives NaN."""
    num = len(arrays[0])
    bad = max(parity.non_finite_file, parity.non_finite_reference)
    if bad:
        nan_inputs = sum(int(a.size - np.count_nonzero(np.isfinite(a)))
                         for a in arrays if np.issubdtype(a.dtype, np.floating))
        cause = f"; `inputs` holds {nan_inputs} NaN/Inf value(s)" if nan_inputs else ""
        agreement = "" if parity.top1_agreement is None else f", top-1 agreement {parity.top1_agreement:.1%}"
        warnings.warn(
            f"tfopt.export: the outputs for {bad} of the {num} check inputs hold NaN/Inf (in the {precision} "
            f"LiteRT file: {parity.non_finite_file}, in the Keras model: {parity.non_finite_reference}{cause}); "
            f"they count as disagreeing{agreement}, max |difference| {parity.max_abs_diff:.3g}. The file was "
            "written, but it was not checked on those inputs. Fix: check on finite inputs (drop or fill the NaN "
            "samples of inputs=), or find the layer whose outputs overflow.", UserWarning, stacklevel=stacklevel)
        return
    if parity.top1_agreement is not None and parity.top1_agreement < AGREEMENT_WARNING:
        drawn = "" if inputs_given else " (drawn at random; pass typical ones as inputs=)"
        warnings.warn(
            f"tfopt.export: the {precision} LiteRT file agrees with the Keras model on only "
            f"{parity.top1_agreement:.1%} of the {num} check inputs{drawn} (arg-max; max |difference| "
            f"{parity.max_abs_diff:.3g}). It was written, but it computes something else than the model: try "
            "another precision (int16x8 or int8, or float32), more representative_data, or report the model "
            "to tfopt.", UserWarning, stacklevel=stacklevel)


def sparse_difference(dense_outputs, sparse_outputs):
    """None when a sparse-encoded file's outputs are the dense file's (within
    `SPARSE_TOLERANCE` of their magnitude), else a description of the difference."""
    scale = max(float(np.max(np.abs(d), initial=0.0, where=np.isfinite(d))) for d in dense_outputs)
    diff = 0.0
    for d, s in zip(dense_outputs, sparse_outputs):
        d, s = np.asarray(d, "float64"), np.asarray(s, "float64")
        if not np.array_equal(np.isfinite(d), np.isfinite(s)):
            return "NaN/Inf outputs where the dense file's are finite, or the other way round"
        both = np.isfinite(d)
        diff = max(diff, float(np.max(np.abs(d - s), initial=0.0, where=both)))
    if diff <= SPARSE_TOLERANCE * max(scale, 1e-6):
        return None
    text = f"max |sparse - dense| {diff:.3g} against outputs up to {scale:.3g}"
    d, s = np.asarray(dense_outputs[0]), np.asarray(sparse_outputs[0])
    if d.ndim == 2 and d.shape[-1] > 1:
        text += f"; arg-max agreement {np.mean(np.argmax(d, -1) == np.argmax(s, -1)):.1%}"
    return text
