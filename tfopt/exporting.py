"""`export`: strip, convert to LiteRT (.tflite), check the file, report sizes.

(The module is `exporting` so that `tfopt.export` can be the function.)

`export` reads as four steps: plan (every argument checked, before the slow
conversion), encode (the converter, in `tfopt.litert`), verify (the file against
the model), report. Conversion and the interpreter live in `tfopt.litert`;
`run_litert`, `litert_latency_ms`, `litert_load_error`, `float_ops` and
`atomic_write_bytes` stay importable from here.
"""

import dataclasses
import gzip
import warnings

import keras
import numpy as np

from tfopt import _backend, _keras_internal, _state, litert, strategies, transforms
from tfopt._export import checks, child, weight_only
from tfopt._export.files import atomic_write_bytes, check_target
from tfopt._export.forms import export_form
from tfopt._export.inputs import (
    as_arrays, check_arrays, check_finite, check_num_samples, draw_samples, fixed_shapes, flat_outputs,
    structured, symbolic_inputs,
)
from tfopt.layers.quantize_activation import QuantizingLayer
from tfopt.litert import float_ops, litert_latency_ms, litert_load_error, run_litert  # noqa: F401 (public here too)
from tfopt.reporting import prunable_values, zero_fraction
from tfopt.transforms import weight_quantization

__all__ = ["export", "ExportReport", "atomic_write_bytes", "litert_latency_ms"]


@dataclasses.dataclass
class ExportReport:
    """What `tfopt.export` wrote and how well the file matches the Keras model.

    The file is checked against the model passed to `export`, called in
    inference as it was trained and evaluated: a quantization-aware model with
    its fake quantization on (also before a `QuantizationSchedule`'s start, as
    in the file), not its float counterpart. For such a model the float
    figures are reported too (`float_top1_agreement`, `float_max_abs_diff`).

    Attributes:
        path: the written file.
        size_bytes: file size.
        gzip_bytes: size after `gzip -9`, a fair proxy for download size
            (zeros left by pruning compress; dense weights do not).
        max_abs_diff: largest absolute difference between the LiteRT
            interpreter's outputs and the Keras model's, over the check inputs
            (None if the check was skipped; NaN if an output holds NaN).
        num_check_samples: how many inputs were compared.
        sparsity: fraction of zeros in the exported kernels.
        top1_agreement: fraction of check inputs whose arg-max output agrees
            between LiteRT and the Keras model (of all their steps, for a
            (samples, steps, classes) output such as next-token logits); an
            input whose output holds NaN/Inf in either counts as disagreeing
            (None if not checked, or if the first output is neither
            (samples, classes) nor (samples, steps, classes)).
        precision: "float32", "float16", "int8", "int16x8", or one of the
            weight-quantized precisions (see `tfopt.export`).
        float_ops: the file's ops that still compute in float, other than the
            QUANTIZE/DEQUANTIZE at its edges (empty for a full-integer model).
        latency_ms: median time of one single-input inference of the written
            file in the LiteRT interpreter (one thread), or None if not measured
            (`measure_latency=False`).
        float_latency_ms: the same for the model converted in float32, for
            comparison (equal to `latency_ms` for a float32 export).
        activation_ranges: for int8/int16x8 files, where the activation
            ranges came from: "quantization-aware training" (the fake-quant
            ranges learned in `fit`) or "calibrated" (measured on
            `representative_data` by the converter); None for float files.
        sparse_encoding: True when the file stores its pruned weights in the
            converter's sparse format (`sparse=`), False when it is dense.
        dense_size_bytes: with `sparse=`, the size of the dense file of the
            same precision, for comparison; else None.
        float_top1_agreement: for a quantization-aware model, `top1_agreement`
            against its float counterpart (`tfopt.strip(model)`, no fake
            quantization); else None.
        float_max_abs_diff: the same for `max_abs_diff`.
        float_size_bytes: for the precisions LiteRT's quantizer writes
            ("int8_weight_only", "int4_*"), the size of the converter's float32
            file it quantized; else None.
        perplexity: for a causal language model checked on token data
            (`inputs={"token_ids": ..., "padding_mask": ...}` and logits of
            shape (samples, length, vocabulary)), exp of the mean next-token
            crossentropy of the file's logits over those tokens (position t's
            logits scored on token t + 1, padding left out); else None.
        keras_perplexity: the same for the Keras model's logits.

    Example:
    >>> import keras, tempfile, os, tfopt
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> report = tfopt.export(model, os.path.join(tempfile.mkdtemp(), "m.tflite"))
    >>> report.top1_agreement, report.float_top1_agreement
    (1.0, None)
    """

    path: str
    size_bytes: int
    gzip_bytes: int
    max_abs_diff: float | None
    num_check_samples: int
    sparsity: float | None = None
    top1_agreement: float | None = None
    precision: str = "float32"
    float_ops: list = dataclasses.field(default_factory=list)
    latency_ms: float | None = None
    float_latency_ms: float | None = None
    activation_ranges: str | None = None
    sparse_encoding: bool = False
    dense_size_bytes: int | None = None
    float_top1_agreement: float | None = None
    float_max_abs_diff: float | None = None
    float_size_bytes: int | None = None
    perplexity: float | None = None
    keras_perplexity: float | None = None

    def __str__(self):
        diff = "not checked" if self.max_abs_diff is None else f"{self.max_abs_diff:.3g}"
        text = (
            f"{self.path}: {self.size_bytes:,} bytes ({self.gzip_bytes:,} gzipped), "
            f"max |LiteRT - Keras| = {diff} over {self.num_check_samples} inputs"
        )
        if self.float_size_bytes:
            text += f", {self.size_bytes / self.float_size_bytes:.2f}x the float32 file"
        if self.sparse_encoding:
            text += f", sparse-encoded (dense: {self.dense_size_bytes:,} bytes)"
        if self.top1_agreement is not None:
            text += f", top-1 agreement {self.top1_agreement:.1%}"
            if self.float_top1_agreement is not None:
                text += f" ({self.float_top1_agreement:.1%} with the float model)"
        if self.perplexity is not None:
            text += f", perplexity {self.perplexity:.4g} (Keras model: {self.keras_perplexity:.4g})"
        if self.latency_ms is not None:
            text += f", {self.latency_ms:.3g} ms per inference"
            if self.precision != "float32":
                text += f" (float32: {self.float_latency_ms:.3g} ms)"
        return text


_PRECISIONS = ("float32", "float16", "int8", "int16x8") + weight_only.PRECISIONS
# Below this fraction of zeros in the kernels, `sparse="auto"` keeps the file dense (the
# converter itself encodes a weight only above about 30% zeros).
_AUTO_SPARSITY = 0.5


@dataclasses.dataclass
class _Plan:
    """`export`'s arguments, checked: what to convert, how, and what to check on."""

    model: object
    path: str
    precision: str
    quantized: bool
    optimizations: object
    representative_data: list | None
    inputs: list | None
    samples: list | None  # the check inputs (`inputs`, or drawn), when the file is run (see _samples)
    num_check_samples: int
    seed: int
    check: bool
    measure_latency: bool
    sparse: object
    input_shapes: list | None = None  # fixed input shapes to convert at (see fixed_shapes), once needed
    warn_disagreement: bool = True  # False in the child of an export from another backend (its parent warns)
    # What _verify compared (kept for the parent process of an export from another backend):
    outputs: list | None = None  # the model's outputs on `samples`
    float_outputs: list | None = None  # its float counterpart's, for a quantization-aware model
    file_outputs: list | None = None  # the file's
    tokens: tuple | None = None  # (token ids, padding mask) the perplexities were computed on


@dataclasses.dataclass
class _Encoded:
    content: bytes
    stripped: object  # the model converted (before its export form)
    calibrated: bool
    dense_size: int | None = None
    sparse_encoding: bool = False
    float_size: int | None = None


def _has_quantization(model):
    return any(isinstance(layer, QuantizingLayer) and layer.is_quantizing()
               for layer in _keras_internal.all_layers(model))


def _kernel_sparsity(model):
    return zero_fraction([value for _, _, value in prunable_values(model)])


def _input_names(model):
    return [_keras_internal.input_name(t) for t in symbolic_inputs(model) or []] or None


def _plan(model, path, inputs, check, num_check_samples, seed, optimizations, precision, representative_data,
          measure_latency, sparse):
    """Every argument checked before the (slow) conversion."""
    if not str(path).endswith(".tflite"):
        raise ValueError(
            f"`tfopt.export` writes LiteRT flatbuffers; `path` should end in '.tflite'. "
            f"Received: path={str(path)!r}"
        )
    if precision not in _PRECISIONS:
        raise ValueError(f"`precision` must be one of {_PRECISIONS}. Received: precision={precision!r}")
    if sparse not in (True, False, "auto") or isinstance(sparse, (int, float)) and not isinstance(sparse, bool):
        raise ValueError(f"`sparse` must be True, False or 'auto'. Received: sparse={sparse!r}")
    weight_only.check_keras_quantized(model, precision)
    if weight_only.is_weight_precision(precision):
        sparse = weight_only.check_plan(precision, sparse)
    strategy = _keras_internal.distribute_strategy(model)
    if strategy is not None and not strategies.is_chief(strategy):
        # Multi-worker: every worker runs the same script; only the chief's file lands at `path`.
        path = strategies.chief_path(strategy, path)
    check_target(path)
    quantized = _has_quantization(model)
    if precision == "int8" and not quantized and representative_data is None:
        raise ValueError(
            f"Model '{model.name}' has no quantization ranges (no quantization-aware "
            "layers), so an int8 export needs calibration data. Pass "
            "`representative_data=` (a few hundred typical inputs) for post-training "
            "quantization, or train with `quantization_aware=` layers first."
        )
    if precision == "int16x8" and representative_data is None:
        raise ValueError(
            f"tfopt.export: precision='int16x8' (16-bit activations, 8-bit weights) calibrates its "
            f"activation ranges on data (the converter has no quantization-aware int16 path), and model "
            f"'{model.name}' got no `representative_data`. Fix: pass representative_data= (a few hundred "
            "typical inputs, e.g. training samples).")
    if representative_data is not None:
        if precision not in ("int8", "int16x8"):
            warnings.warn(
                f"tfopt.export: `representative_data` calibrates int8 and int16x8 exports only; with "
                f"precision={precision!r} it is ignored. Fix: pass precision='int8' (or 'int16x8'), or drop "
                "representative_data (use inputs= for the arrays to check on).", UserWarning, stacklevel=4)
            representative_data = None
        else:
            representative_data = as_arrays(model, representative_data, "representative_data")
            check_arrays(model, representative_data, "representative_data")
            check_finite(representative_data, "representative_data")
    if inputs is not None:
        inputs = as_arrays(model, inputs, "inputs")
        check_arrays(model, inputs, "inputs")
    elif check or measure_latency or sparse:
        check_num_samples(num_check_samples)
    checks.check_weights_finite(model)
    samples = inputs
    if samples is None and (check or measure_latency) and symbolic_inputs(model) is not None:
        samples = draw_samples(model, num_check_samples, seed)  # (a subclassed model: refused in _samples)
    return _Plan(model=model, path=path, precision=precision, quantized=quantized, optimizations=optimizations,
                 representative_data=representative_data, inputs=inputs, samples=samples,
                 num_check_samples=num_check_samples, seed=seed, check=check, measure_latency=measure_latency,
                 sparse=sparse)


def _samples(plan):
    """The check inputs; a model without symbolic inputs (subclassed) needs `inputs=`, which
    is said after the conversion, so that a model the converter cannot take says that first."""
    if plan.samples is None:
        plan.samples = draw_samples(plan.model, plan.num_check_samples, plan.seed)
    return plan.samples


def _encode(plan):
    """The file's bytes: converted (QAT ranges, else calibrated), then sparse-encoded if asked and it serves."""
    quantized_path = plan.precision == "int8" and plan.quantized
    # QAT layers must stay: their fake-quant ops carry the int8 ranges.
    stripped = plan.model if quantized_path else _stripped(plan.model)
    # (A mixed-precision model is converted from a float32 copy and checked against itself.)
    calibrated = plan.representative_data is not None and not quantized_path
    optimizations = weight_only.converter_optimizations(plan.precision, plan.optimizations)
    convert_args = (export_form(stripped, calibrated), optimizations, plan.precision,
                    plan.representative_data if calibrated else None)
    try:
        content = litert.convert(*convert_args)
    except Exception as error:  # noqa: BLE001 - fixed_shapes re-raises what it does not handle
        plan.input_shapes = fixed_shapes(convert_args[0], plan.inputs, error)
        content = litert.convert(*convert_args, input_shapes=plan.input_shapes)
    if quantized_path and plan.representative_data is not None and litert.float_ops(content):
        # Layers that quantization-aware training leaves in float (LayerNormalization,
        # attention, RNNs, ...): calibrate every range on the data instead, for a
        # full-integer file; the weights keep what QAT trained.
        stripped, calibrated = _stripped(plan.model), True
        convert_args = (export_form(stripped, True), plan.optimizations, plan.precision, plan.representative_data)
        content = litert.convert(*convert_args, input_shapes=plan.input_shapes)
    encoded = _Encoded(content, stripped, calibrated)
    if weight_only.is_weight_precision(plan.precision):  # the float file, then LiteRT's quantizer on it
        encoded.content, encoded.float_size = weight_only.quantize(content, plan.precision, plan.path)
    if plan.sparse:  # (the same model and arguments, sparse-encoded)
        encoded.dense_size = len(content)
        encoded.content, encoded.sparse_encoding = _sparse_content(plan, content, convert_args, stripped)
    return encoded


def _sparse_content(plan, dense, convert_args, stripped):
    """The sparse-encoded file when `plan.sparse` asks for it and it serves:
    it loads in the default interpreter, computes what the dense file computes
    on the check inputs, and is smaller; else `dense`, with a warning saying
    why when sparse=True asked for it."""
    sparsity = _kernel_sparsity(stripped)
    if plan.sparse == "auto" and (sparsity or 0.0) < _AUTO_SPARSITY:
        return dense, False
    content = litert.convert(*convert_args, sparse=True, input_shapes=plan.input_shapes)
    error = litert.litert_load_error(content)
    if error is not None:
        warnings.warn(
            f"tfopt.export: the sparse-encoded file does not load in the default LiteRT interpreter "
            f"({' '.join(str(error).split())[:200]}), so the dense file was written to {str(plan.path)!r}. "
            "LiteRT's sparse int8 kernels need 1x16 blocks along FULLY_CONNECTED inputs (structure "
            "'litert_1x16'); float files take any sparsity. Fix: prune with that structure, export in "
            "float32, or drop sparse=.", UserWarning, stacklevel=5)
        return dense, False
    samples = plan.samples or litert.sample_inputs(dense, plan.num_check_samples, plan.seed)
    names = _input_names(stripped) if plan.samples else None
    difference = checks.sparse_difference(litert.run_litert(dense, samples, names),
                                          litert.run_litert(content, samples, names))
    if difference is not None:
        warnings.warn(
            f"tfopt.export: the sparse-encoded {plan.precision} file computes something else than the dense "
            f"file on the {len(samples[0])} check inputs ({difference}), so the dense file was written to "
            f"{str(plan.path)!r}. LiteRT's sparse kernels are exact for float32 files and for int8 in 1x16 "
            "blocks (structure 'litert_1x16'); others, such as int16x8, are not. Fix: export in float32 or "
            "int8, or drop sparse=.", UserWarning, stacklevel=5)
        return dense, False
    if len(content) >= len(dense):
        if plan.sparse is True:
            warnings.warn(
                f"tfopt.export: sparse encoding did not make the file smaller ({len(content):,} vs "
                f"{len(dense):,} bytes; the kernels are {sparsity or 0.0:.0%} zeros, and the converter "
                f"encodes a weight only above about 30%), so the dense file was written to {str(plan.path)!r}.",
                UserWarning, stacklevel=5)
        return dense, False
    return content, True


def _check_precision_reached(plan, content):
    """Raises (nothing written) when the file is not in the precision asked for."""
    if plan.precision == "int16x8" and not litert.tensor_count(content, np.int16):
        raise ValueError(
            f"tfopt.export: the converter returned no int16 activation for precision='int16x8' (float ops: "
            f"{sorted(set(litert.float_ops(content)))}), so nothing was written to {str(plan.path)!r}. Fix: pass "
            "typical, finite inputs as representative_data, or export with precision='int8'.")
    if plan.precision == "int8" and not litert.tensor_count(content, np.int8):
        raise ValueError(
            f"tfopt.export: the converter returned a float model for precision='int8' (no int8 tensor "
            f"in the file; float ops: {sorted(set(litert.float_ops(content)))}), so nothing was written to "
            f"{str(plan.path)!r}. This happens when calibration data gives no usable ranges, or when the "
            f"model (model '{plan.model.name}') has no op the converter quantizes. Fix: pass typical, "
            "finite inputs as representative_data, or export with precision='float32'.")


def _outputs(model, arrays):
    """The model's outputs on `arrays`, in inference, with its fake quantization on (as in the file)."""
    with _state.export_scope():
        outputs = model(structured(model, arrays), training=False)
    return [np.asarray(keras.ops.convert_to_numpy(o)) for o in flat_outputs(outputs)]


def _verify(plan, encoded):
    """The file in the precision asked for, then (with `check`) its outputs against the model's:
    (parity with the model passed, parity with its float counterpart or None,
    (file perplexity, Keras perplexity) for a causal LM checked on token data, or None)."""
    _check_precision_reached(plan, encoded.content)
    if not plan.check:
        return None, None, None
    samples = _samples(plan)
    num = len(samples[0])
    names = _input_names(encoded.stripped)
    got = litert.run_litert(encoded.content, samples, input_names=names)
    expected = _outputs(plan.model, samples)
    parity = checks.compare(got, expected, num)
    float_parity = None
    if plan.quantized:
        float_model = encoded.stripped if encoded.stripped is not plan.model else _stripped(plan.model)
        plan.float_outputs = _outputs(float_model, samples)
        float_parity = checks.compare(got, plan.float_outputs, num)
    if plan.warn_disagreement:
        checks.warn_if_disagreeing(parity, plan.precision, samples, plan.inputs is not None, stacklevel=5)
    perplexities = None
    tokens = _token_data(plan, names or _input_names(plan.model), got[0])
    if tokens is not None:
        perplexities = (next_token_perplexity(got[0], *tokens), next_token_perplexity(expected[0], *tokens))
    plan.outputs, plan.file_outputs, plan.tokens = expected, got, tokens
    return parity, float_parity, perplexities


def _token_data(plan, names, logits):
    """(token ids, padding mask) when `plan.inputs` (given by the caller, not drawn) are a causal LM's
    tokens: an integer input named "token_ids" of shape (samples, length), logits (samples, length,
    vocabulary) over every id it holds; else None."""
    if plan.inputs is None or not names or "token_ids" not in names:
        return None
    ids = np.asarray(plan.inputs[names.index("token_ids")])
    logits = np.asarray(logits)
    if (not np.issubdtype(ids.dtype, np.integer) or ids.ndim != 2 or logits.ndim != 3
            or logits.shape[:2] != ids.shape or ids.shape[1] < 2 or ids.min() < 0 or ids.max() >= logits.shape[-1]):
        return None
    mask = np.asarray(plan.inputs[names.index("padding_mask")]) if "padding_mask" in names else np.ones_like(ids)
    return ids, mask


def next_token_perplexity(logits, token_ids, padding_mask=None):
    """exp of the mean crossentropy of `logits[:, t]` for `token_ids[:, t + 1]`, over the
    positions where both tokens are real (`padding_mask` 1); NaN if none is.

    Example:
    >>> import numpy as np
    >>> ids = np.array([[0, 1, 0]])
    >>> round(next_token_perplexity(np.zeros((1, 3, 4), "float32"), ids), 3)  # uniform over 4 tokens
    4.0
    """
    logits = np.asarray(logits, "float64")[:, :-1]
    targets = np.asarray(token_ids)[:, 1:]
    mask = np.ones(targets.shape) if padding_mask is None else np.asarray(padding_mask, "float64")
    if padding_mask is not None:
        mask = mask[:, 1:] * mask[:, :-1]
    top = logits.max(-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    nll = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    count = mask.sum()
    return float(np.exp((nll * mask).sum() / count)) if count else float("nan")


def _report(plan, encoded, parity, float_parity, perplexities=None):
    content = encoded.content
    latency = float_latency = None
    if plan.measure_latency:
        latency = litert.litert_latency_ms(content, _samples(plan))
        float_latency = latency if plan.precision == "float32" else litert.litert_latency_ms(
            litert.convert(export_form(_stripped(plan.model)), input_shapes=plan.input_shapes), _samples(plan))
    integer = plan.precision in ("int8", "int16x8")
    return ExportReport(
        path=str(plan.path),
        size_bytes=len(content),
        gzip_bytes=len(gzip.compress(content, compresslevel=9)),
        max_abs_diff=None if parity is None else parity.max_abs_diff,
        num_check_samples=len(plan.samples[0]) if plan.check else 0,
        sparsity=_kernel_sparsity(encoded.stripped),
        top1_agreement=None if parity is None else parity.top1_agreement,
        precision=plan.precision,
        float_ops=litert.float_ops(content) if integer else [],
        activation_ranges=("calibrated" if encoded.calibrated else "quantization-aware training") if integer else None,
        latency_ms=latency,
        float_latency_ms=float_latency,
        sparse_encoding=encoded.sparse_encoding,
        dense_size_bytes=encoded.dense_size,
        float_top1_agreement=None if float_parity is None else float_parity.top1_agreement,
        float_max_abs_diff=None if float_parity is None else float_parity.max_abs_diff,
        float_size_bytes=encoded.float_size,
        perplexity=None if perplexities is None else perplexities[0],
        keras_perplexity=None if perplexities is None else perplexities[1],
    )


def export(model, path, inputs=None, check=True, num_check_samples=8, seed=0, optimizations=None,
           precision="float32", representative_data=None, measure_latency=False, sparse=False):
    """Strips `model`, writes it as a LiteRT `.tflite` file, checks it, reports sizes.

    The file is written atomically: if conversion or writing fails, an existing
    file at `path` is left as it was. Under `tfopt.strategies.MultiWorker`,
    only the chief writes `path`; other workers write to a temporary
    directory (`report.path` says where), so every worker can run the same
    code. With `check=True` the file runs in the `ai_edge_litert` interpreter
    on `inputs` (or on `num_check_samples` random inputs shaped like the
    model's) and is compared with `model` itself, called in inference as it
    was trained and evaluated (a quantization-aware model with its fake
    quantization on): the largest absolute difference and the arg-max
    agreement are reported, and a file that agrees on fewer than 90% of the
    check inputs, or whose outputs hold NaN/Inf, is written with a warning.

    Misuses are refused before the (slow) conversion: a `path` that is a
    directory or under a read-only one, `inputs`/`representative_data` whose
    shapes do not fit the model's inputs (None dims match any size), and empty
    or non-finite calibration data, `num_check_samples` below 1, weights that
    hold NaN/Inf (the layer and weight are named). An int8 export whose file
    holds no int8 tensor raises instead of writing a float file labelled int8.
    Recurrent layers are converted unrolled (Keras 3's RNN loop does not
    convert), which needs a fixed sequence length. A
    mixed-precision model (`mixed_float16`, `mixed_bfloat16`) is converted from
    a float32 copy with the same weights (the global dtype policy is restored
    afterwards) and checked against the original model's outputs.

    Under another Keras backend than TensorFlow (JAX), the LiteRT converter
    cannot take the model's own graph (through jax2tf, fake quantization is
    plain arithmetic and an int8 file stays float), so `export` saves it as
    a `.keras` file in a temporary directory and runs this export under
    TensorFlow in a child process (a few seconds to start; custom layers must
    come from an importable module, tfopt's and keras-hub's load as they
    are), with the same arguments, errors (same type and message) and
    warnings. The file is then checked here: the TensorFlow rebuild must
    compute what `model` computes on the check inputs (up to float rounding,
    or a few quantization steps with fake quantization on; else a
    RuntimeError and nothing written), and the report's parity is the
    file's against `model`'s own outputs.

    For a causal language model checked on token data (`inputs` a dict
    with an integer "token_ids" (samples, length) array, and logits (samples,
    length, vocabulary) as first output, e.g. a keras-hub `CausalLM` given
    `{"token_ids": ids, "padding_mask": mask}`), the report also gives
    `perplexity` (from the file's logits: exp of the mean next-token
    crossentropy over the real tokens) and `keras_perplexity` (the same from
    the Keras model).

    Args:
        model: a Keras 3 model (tfopt layers and Pruning-callback masks are
            stripped first; see `tfopt.strip`).
        path: where to write the `.tflite` file.
        inputs: an array, a list of arrays in `model.inputs` order for
            multi-input models, or a dict of arrays keyed by the model's input
            names (keras-hub style, e.g. `{"token_ids": ..., "padding_mask":
            ...}`), to check on.
        check: run the file in the LiteRT interpreter and compare.
        num_check_samples: random inputs to draw when `inputs` is None (a
            positive int; 0 raises: pass `check=False` to skip the check).
        seed: seed of those random inputs.
        optimizations: passed to the converter (e.g. `[tf.lite.Optimize.DEFAULT]`).
        precision: "float32"; "float16" (weights stored in float16); "int8":
            full-integer ops from the ranges of quantization-aware layers (the
            model is then converted as is, fake-quant ops included), or, for a
            model trained without QAT, post-training quantization calibrated on
            `representative_data`; "int16x8": 16-bit activations and 8-bit
            weights (the converter's
            `EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8`),
            always calibrated on `representative_data` (QAT models are
            stripped first; their trained weights are kept), for models whose
            activations need more than 8 bits (LayerNormalization, softmax,
            audio front ends). Ops without an int16x8 kernel stay float and are
            listed in `float_ops`.
            Weight-quantized precisions (no calibration data; activations stay
            float in the file; see `tfopt/_export/weight_only.py`):
            "int8_weight_only" (int8 weights, one scale per output channel,
            dequantized before float ops), "int8_dynamic" (the converter's
            dynamic range, `optimizations=[DEFAULT]` without data: int8 weights
            of 1024+ elements, activations quantized at run time),
            "int4_weight_only", "int4_dynamic" (int4 per output channel), and
            "int4_block32"/"int4_block64"/"int4_block128" (int4 in blocks along
            the input dimension, activations quantized to int8 at run time: the
            only blockwise form LiteRT's quantizer writes; the block size must
            divide every FULLY_CONNECTED input dimension, else ValueError naming
            the sizes that fit). All but "int8_dynamic" rewrite the converter's
            float32 file with LiteRT's quantizer (`pip install
            'tfopt[litert-quantizer]'`; an ImportError says so when missing);
            `report.float_size_bytes` is that float file's size. A file that
            holds no weight of the precision asked for, or that the default
            LiteRT interpreter cannot load, raises and is not written. A
            Sequential/Functional model quantized by Keras in int8
            (`model.quantize("int8")`, Dense and Embedding layers) exports in
            "int8_weight_only" with Keras's own integers (bit for bit) or in
            "float32" (dequantized); other Keras-quantized models are refused.
        representative_data: inputs for calibration (an array, a list of
            arrays, or a dict keyed by input name, as `inputs`; finite, at least one sample; used only with
            precision="int8"/"int16x8", else ignored with a warning). For a
            quantization-aware model exported in int8, it is used only if the
            QAT conversion leaves float ops (layers QAT does not fake-quantize,
            such as LayerNormalization, MultiHeadAttention, LSTM/GRU): every
            activation range is then calibrated on it instead, giving a
            full-integer file (`report.activation_ranges == "calibrated"`).
        measure_latency: also time the file in the LiteRT interpreter (one
            thread, batch 1, median of 50 runs) and, for float16/int8, a float32
            conversion of the same model, into `latency_ms` and
            `float_latency_ms` (this converts the model a second time).
        sparse: store pruned weights in the converter's sparse format
            (`Optimize.EXPERIMENTAL_SPARSITY`): True, False, or "auto" (when at
            least half the kernels' weights are zero). The dense file is
            written instead, with a warning for True, when the sparse one does
            not load and run in the default LiteRT interpreter, computes
            something else than the dense file on the check inputs (outputs
            more than 5% of their magnitude apart: int16x8, measured), or is
            not smaller; `report.sparse_encoding` says which was written and
            `report.dense_size_bytes` the dense size. Measured here (LiteRT
            2.3, 784-512-512-10 MLP, 80% zeros): float unstructured 0.30x of
            the dense file, same speed (the interpreter densifies); float in
            4x1 blocks (`structure="litert_1x4"`) 0.21x, 0.93x the latency;
            int8 loads only with 1x16 blocks (`"litert_1x16"`), 0.23x of the
            dense int8 file but 5.7x slower than it (no XNNPACK kernel); int8
            unstructured fails to load (dense written).
            Only `tfopt.shrink` makes every runtime faster.

    Returns:
        An `ExportReport`.

    Example:
    >>> import keras, tempfile, os, tfopt
    >>> model = keras.Sequential([keras.Input((4,)), tfopt.layers.Dense(2, pruning_schedule="baseline")])
    >>> report = tfopt.export(model, os.path.join(tempfile.mkdtemp(), "m.tflite"))
    >>> report.max_abs_diff < 1e-5
    True
    """
    arguments = dict(inputs=inputs, check=check, num_check_samples=num_check_samples, seed=seed,
                     optimizations=optimizations, precision=precision, representative_data=representative_data,
                     measure_latency=measure_latency, sparse=sparse)
    if not _backend.is_tensorflow():
        return _export_from_backend(model, path, arguments)
    plan, encoded, report = _converted(model, path, **arguments)
    atomic_write_bytes(plan.path, encoded.content)
    return report


def _converted(model, path, reference=False, **arguments):
    """`export`'s steps before the write: (plan, encoded file, report). With `reference` (in the
    TensorFlow child of an export under another backend), the parent warns about disagreement, and
    the model's outputs are kept: on the check inputs, or without `check` on `inputs` or drawn ones."""
    _warn_other_grid(model, arguments["precision"])
    # A model in tfopt.quantize_weights's form is exported with its quantized weights baked in (the
    # float file then holds them on the grid LiteRT's quantizer re-quantizes exactly); it is restored after.
    with weight_quantization.baked_for_export(model):
        plan = _plan(model, path, **arguments)
        plan.warn_disagreement = not reference
        encoded = _encode(plan)
        parity, float_parity, perplexities = _verify(plan, encoded)
        report = _report(plan, encoded, parity, float_parity, perplexities)
        if reference and plan.outputs is None:
            _reference_outputs(plan)
    return plan, encoded, report


def _reference_outputs(plan):
    """Without `check`: the model's outputs (and its float counterpart's) on `inputs`, or on
    drawn inputs, kept in `plan` for the parent's rebuild check (none for a subclassed model without `inputs`)."""
    samples = plan.inputs
    if samples is None and symbolic_inputs(plan.model) is not None:
        num = plan.num_check_samples if isinstance(plan.num_check_samples, int) and plan.num_check_samples > 0 else 8
        samples = draw_samples(plan.model, num, plan.seed)
    if samples is None:
        return
    plan.samples, plan.outputs = samples, _outputs(plan.model, samples)
    if plan.quantized:
        plan.float_outputs = _outputs(_stripped(plan.model), samples)


def _export_in_child(model, path, arguments):
    """The TensorFlow child's side of `_export_from_backend`: `export`'s steps on the model
    rebuilt from its `.keras` file, but the write; what the parent needs, as plain values."""
    plan, encoded, report = _converted(model, path, reference=True, **arguments)
    return {"report": dataclasses.asdict(report), "content": encoded.content,
            "samples": plan.samples if plan.outputs is not None else None, "outputs": plan.outputs,
            "float_outputs": plan.float_outputs, "file_outputs": plan.file_outputs, "tokens": plan.tokens,
            "inputs_given": plan.inputs is not None}


def _export_from_backend(model, path, arguments):
    """`export` under another Keras backend than TensorFlow (JAX): the LiteRT converter takes only
    TensorFlow graphs (through jax2tf, fake quantization would reach it as plain arithmetic, and an
    int8 file would stay float), so the model is rebuilt under TensorFlow in a child process from a
    `.keras` file and exported there (`tfopt/_export/child.py`). Here, the rebuild is checked
    against `model` (its outputs on the check inputs), the file's parity is measured against
    `model`'s own outputs, and the file is written."""
    result = child.run(model, path, arguments, entry=(__name__, "_export_in_child"))
    fields, samples = result["report"], result["samples"]
    if samples is not None:
        with weight_quantization.baked_for_export(model):
            own = _outputs(model, samples)
            own_float = None if result["float_outputs"] is None else _outputs(_stripped(model), samples)
        child.check_rebuild(model, result["outputs"], own, quantized=own_float is not None)
        if own_float is not None:
            child.check_rebuild(model, result["float_outputs"], own_float, quantized=False, counterpart=True)
        got = result["file_outputs"]
        if got is not None:
            parity = checks.compare(got, own, len(samples[0]))
            fields.update(max_abs_diff=parity.max_abs_diff, top1_agreement=parity.top1_agreement)
            if own_float is not None:
                float_parity = checks.compare(got, own_float, len(samples[0]))
                fields.update(float_max_abs_diff=float_parity.max_abs_diff,
                              float_top1_agreement=float_parity.top1_agreement)
            checks.warn_if_disagreeing(parity, fields["precision"], samples, result["inputs_given"], stacklevel=4)
            if result["tokens"] is not None:
                fields["keras_perplexity"] = next_token_perplexity(own[0], *result["tokens"])
    atomic_write_bytes(fields["path"], result["content"])
    return ExportReport(**fields)


def _warn_other_grid(model, precision):
    layers = weight_quantization.weight_quantized_layers(model) if isinstance(model, keras.layers.Layer) else []
    trained = sorted({layer.weight_precision for layer in layers})
    grids = weight_quantization.PRECISIONS
    if trained and precision not in ("float32", "float16") and grids.get(precision) != grids[trained[0]]:
        warnings.warn(
            f"tfopt.export: model '{model.name}' was trained with tfopt.quantize_weights for precision "
            f"{trained[0]!r}, and precision={precision!r} quantizes its weights on another grid, so the file "
            f"will not compute what the trained model computes. Fix: export with precision={trained[0]!r}.",
            UserWarning, stacklevel=4)


def _stripped(model):
    """`tfopt.strip(model)` for conversion only. A custom layer Keras cannot
    re-create from its config is reused in the stripped copy; strip warns that
    the copy shares it with `model`, which does not matter here: the copy never
    leaves `export` and nothing trains it. A model quantized by Keras in int8 becomes its float copy
    with the dequantized weights (see `tfopt/_export/weight_only.py`)."""
    keras_int8 = weight_only.keras_int8_float_copy(model)
    if keras_int8 is not None:
        return keras_int8
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*cannot be re-created from its config.*reuses this layer")
        return transforms.strip(model)

