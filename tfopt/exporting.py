"""`export`: strip, convert to LiteRT (.tflite), check the file, report sizes.

(The module is `exporting` so that `tfopt.export` can be the function.)

This module (with `tfopt.strategies`) is where tfopt touches TensorFlow
directly: the converter is `tf.lite.TFLiteConverter`, and the check runs the
written file in the `ai_edge_litert` interpreter.
"""

import contextlib
import dataclasses
import gzip
import io
import os
import tempfile
import warnings

import keras
import numpy as np

from tfopt import _keras_internal, _state, strategies, transforms
from tfopt.layers.quantize_activation import QuantizingLayer
from tfopt.reporting import prunable_values, zero_fraction

__all__ = ["export", "ExportReport", "atomic_write_bytes", "litert_latency_ms"]


@dataclasses.dataclass
class ExportReport:
    """What `tfopt.export` wrote and how well the file matches the Keras model.

    Attributes:
        path: the written file.
        size_bytes: file size.
        gzip_bytes: size after `gzip -9`, a fair proxy for download size
            (zeros left by pruning compress; dense weights do not).
        max_abs_diff: largest absolute difference between the LiteRT
            interpreter's outputs and the Keras model's, over the check inputs
            (None if the check was skipped).
        top1_agreement: fraction of check inputs whose arg-max output agrees
            between LiteRT and Keras (None if not checked).
        precision: "float32", "float16" or "int8".
        float_ops: the file's ops that still compute in float, other than the
            QUANTIZE/DEQUANTIZE at its edges (empty for a full-integer model).
        num_check_samples: how many inputs were compared.
        sparsity: fraction of zeros in the exported kernels.
        latency_ms: median time of one single-input inference of the written
            file in the LiteRT interpreter (one thread), or None if not measured
            (`measure_latency=False`).
        float_latency_ms: the same for the model converted in float32, for
            comparison (equal to `latency_ms` for a float32 export).
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

    def __str__(self):
        diff = "not checked" if self.max_abs_diff is None else f"{self.max_abs_diff:.3g}"
        text = (
            f"{self.path}: {self.size_bytes:,} bytes ({self.gzip_bytes:,} gzipped), "
            f"max |LiteRT - Keras| = {diff} over {self.num_check_samples} inputs"
        )
        if self.top1_agreement is not None:
            text += f", top-1 agreement {self.top1_agreement:.1%}"
        if self.latency_ms is not None:
            text += f", {self.latency_ms:.3g} ms per inference"
            if self.precision != "float32":
                text += f" (float32: {self.float_latency_ms:.3g} ms)"
        return text


def atomic_write_bytes(path, data):
    """Writes `data` to `path` so that `path` is either the old file or the new one.

    The bytes go to a temporary file in the same directory, are flushed to
    disk, and replace `path` with one `os.replace`; if anything fails, the
    temporary file is removed and an existing `path` is untouched.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tfopt-", suffix=".part", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


_PRECISIONS = ("float32", "float16", "int8")


def _convert(model, optimizations=None, precision="float32", representative_data=None):
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if optimizations:
        converter.optimizations = list(optimizations)
    if precision == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif precision == "int8":
        # Fake-quant ops carry the ranges; without them, calibrate on data.
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if representative_data is not None:
            arrays = representative_data if isinstance(representative_data, (list, tuple)) else [representative_data]

            def samples():
                for i in range(len(arrays[0])):
                    yield [np.asarray(a[i : i + 1], "float32") for a in arrays]

            converter.representative_dataset = samples
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    # The converter goes through a SavedModel and prints its signature; keep
    # the user's console for the report. Traced with every fake-quant op on:
    # the converter reads the ranges only from ops that feed their consumers.
    with contextlib.redirect_stdout(io.StringIO()), _state.export_scope(), warnings.catch_warnings():
        # Printed for every QAT model: its input ranges come from the fake-quant ops instead.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        return converter.convert()


def _check_inputs(model, inputs, num_samples, seed):
    if inputs is not None:
        arrays = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        return [np.asarray(a) for a in arrays]
    if not getattr(model, "inputs", None):
        raise ValueError(
            f"Model '{model.name}' ({type(model).__name__}) has no symbolic inputs (a "
            "subclassed model), so tfopt cannot draw check inputs for it. Pass "
            "`inputs=` (an array, or a list of arrays), or check=False."
        )
    rng = np.random.default_rng(seed)
    arrays = []
    for spec in model.inputs:
        shape = [num_samples] + [d if d is not None else 1 for d in spec.shape[1:]]
        dtype = keras.backend.standardize_dtype(spec.dtype)
        if "int" in dtype:
            arrays.append(rng.integers(0, 2, size=shape).astype(dtype))
        else:
            arrays.append(rng.standard_normal(shape).astype(dtype))
    return arrays


def run_litert(model_content, inputs, input_names=None):
    """Runs a LiteRT flatbuffer on a list of input arrays and returns its outputs.

    Inputs are fed by name through the file's signature when `input_names`
    (the Keras input names, in the order of `inputs`) are given, since the
    converter may reorder input tensors; outputs come back in the Keras
    model's order (`output_0`, `output_1`, ...).
    """
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as e:  # pragma: no cover - the test extra installs it
        raise ImportError(
            "Checking an exported .tflite file needs the LiteRT interpreter. Install it "
            "with `pip install 'tfopt[litert]'` (package ai-edge-litert), or pass check=False."
        ) from e
    interpreter = Interpreter(model_content=model_content)
    signatures = interpreter.get_signature_list()
    if input_names is not None and len(signatures) == 1:
        key, signature = next(iter(signatures.items()))
        if sorted(signature["inputs"]) == sorted(input_names):
            runner = interpreter.get_signature_runner(key)
            feeds = {}
            for name, array in zip(input_names, inputs):
                detail = runner.get_input_details()[name]
                feeds[name] = np.asarray(array).astype(detail["dtype"])
            outputs = runner(**feeds)
            return [outputs[k] for k in sorted(outputs, key=_output_index)]
    details = interpreter.get_input_details()
    for detail, array in zip(details, inputs):
        interpreter.resize_tensor_input(detail["index"], array.shape)
    interpreter.allocate_tensors()
    for detail, array in zip(interpreter.get_input_details(), inputs):
        interpreter.set_tensor(detail["index"], np.asarray(array).astype(detail["dtype"]))
    interpreter.invoke()
    return [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]


def litert_latency_ms(model_content, inputs, runs=50, warmup=5, num_threads=1):
    """Median milliseconds of one inference of a LiteRT flatbuffer on the first
    sample of `inputs` (a list of arrays), after `warmup` runs."""
    import time

    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model_content, num_threads=num_threads)
    for detail, array in zip(interpreter.get_input_details(), inputs):
        interpreter.resize_tensor_input(detail["index"], (1,) + tuple(np.shape(array)[1:]))
    interpreter.allocate_tensors()
    for detail, array in zip(interpreter.get_input_details(), inputs):
        interpreter.set_tensor(detail["index"], np.asarray(array[:1]).astype(detail["dtype"]))
    for _ in range(warmup):
        interpreter.invoke()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000.0)


def _output_index(name):
    tail = name.rsplit("_", 1)[-1]
    return (0, int(tail), name) if tail.isdigit() else (1, 0, name)


def _flat_outputs(outputs):
    if isinstance(outputs, dict):
        return [outputs[k] for k in sorted(outputs)]
    if isinstance(outputs, (list, tuple)):
        return list(outputs)
    return [outputs]


def _kernel_sparsity(model):
    return zero_fraction([value for _, _, value in prunable_values(model)])


def float_ops(model_content):
    """Names of the ops in a LiteRT flatbuffer that take float32 inputs (QUANTIZE
    and DEQUANTIZE excluded): what did not become integer in an int8 export."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model_content)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    out = []
    for op in _keras_internal.litert_ops(interpreter):
        if op["op_name"] in ("QUANTIZE", "DEQUANTIZE"):
            continue
        if any(i >= 0 and tensors[i]["dtype"] == np.float32 for i in op["inputs"]):
            out.append(op["op_name"])
    return out


def _has_quantization(model):
    return any(isinstance(layer, QuantizingLayer) and layer.is_quantizing()
               for layer in _keras_internal.all_layers(model))


def export(model, path, inputs=None, check=True, num_check_samples=8, seed=0, optimizations=None,
           precision="float32", representative_data=None, measure_latency=False):
    """Strips `model`, writes it as a LiteRT `.tflite` file, checks it, reports sizes.

    The file is written atomically: if conversion or writing fails, an existing
    file at `path` is left as it was. Under `tfopt.strategies.MultiWorker`,
    only the chief writes `path`; other workers write to a temporary
    directory (`report.path` says where), so every worker can run the same code. With `check=True` the written bytes run in
    the `ai_edge_litert` interpreter on `inputs` (or on `num_check_samples`
    random inputs shaped like the model's) and the largest absolute difference
    from the Keras model's outputs is reported.

    Args:
        model: a Keras 3 model (tfopt layers and Pruning-callback masks are
            stripped first; see `tfopt.strip`).
        path: where to write the `.tflite` file.
        inputs: an array, or a list of arrays for multi-input models, to check on.
        check: run the file in the LiteRT interpreter and compare.
        num_check_samples: random inputs to draw when `inputs` is None.
        seed: seed of those random inputs.
        optimizations: passed to the converter (e.g. `[tf.lite.Optimize.DEFAULT]`).
        precision: "float32"; "float16" (weights stored in float16); or "int8":
            full-integer ops from the ranges of quantization-aware layers (the
            model is then converted as is, fake-quant ops included), or, for a
            model trained without QAT, post-training quantization calibrated on
            `representative_data`.
        representative_data: inputs for post-training int8 calibration.
        measure_latency: also time the file in the LiteRT interpreter (one
            thread, batch 1, median of 50 runs) and, for float16/int8, a float32
            conversion of the same model, into `latency_ms` and
            `float_latency_ms` (this converts the model a second time).

    Returns:
        An `ExportReport`.

    Example:
    >>> import keras, tempfile, os, tfopt
    >>> model = keras.Sequential([keras.Input((4,)), tfopt.layers.Dense(2, pruning_schedule="baseline")])
    >>> report = tfopt.export(model, os.path.join(tempfile.mkdtemp(), "m.tflite"))
    >>> report.max_abs_diff < 1e-5
    True
    """
    if not str(path).endswith(".tflite"):
        raise ValueError(
            f"`tfopt.export` writes LiteRT flatbuffers; `path` should end in '.tflite'. "
            f"Received: path={str(path)!r}"
        )
    if precision not in _PRECISIONS:
        raise ValueError(f"`precision` must be one of {_PRECISIONS}. Received: precision={precision!r}")
    strategy = _keras_internal.distribute_strategy(model)
    if strategy is not None and not strategies.is_chief(strategy):
        # Multi-worker: every worker runs the same script; only the chief's file lands at `path`.
        path = strategies.chief_path(strategy, path)
    quantized = _has_quantization(model)
    if precision == "int8" and not quantized and representative_data is None:
        raise ValueError(
            f"Model '{model.name}' has no quantization ranges (no quantization-aware "
            "layers), so an int8 export needs calibration data. Pass "
            "`representative_data=` (a few hundred typical inputs) for post-training "
            "quantization, or train with `quantization_aware=` layers first."
        )
    # QAT layers must stay: their fake-quant ops carry the int8 ranges.
    stripped = model if (precision == "int8" and quantized) else transforms.strip(model)
    content = _convert(stripped, optimizations, precision, representative_data)
    max_diff = top1 = None
    arrays = []
    if check:
        arrays = _check_inputs(stripped, inputs, num_check_samples, seed)
        expected = [np.asarray(o) for o in _flat_outputs(stripped(arrays if len(arrays) > 1 else arrays[0]))]
        model_inputs = getattr(stripped, "inputs", None) or []
        names = [_keras_internal.input_name(t) for t in model_inputs] or None
        got = run_litert(content, arrays, input_names=names)
        if len(got) != len(expected):
            raise RuntimeError(
                f"The LiteRT file has {len(got)} outputs but the Keras model {len(expected)}."
            )
        max_diff = max(
            float(np.max(np.abs(g.astype("float64") - e.astype("float64")))) for g, e in zip(got, expected)
        )
        if expected[0].ndim == 2 and expected[0].shape[-1] > 1:
            top1 = float(np.mean(np.argmax(got[0], -1) == np.argmax(expected[0], -1)))
        else:
            top1 = None
    latency = float_latency = None
    if measure_latency:
        timing_inputs = arrays or _check_inputs(stripped, inputs, num_check_samples, seed)
        latency = litert_latency_ms(content, timing_inputs)
        float_latency = latency if precision == "float32" else litert_latency_ms(
            _convert(transforms.strip(model)), timing_inputs)
    atomic_write_bytes(path, content)
    return ExportReport(
        path=str(path),
        size_bytes=len(content),
        gzip_bytes=len(gzip.compress(content, compresslevel=9)),
        max_abs_diff=max_diff,
        num_check_samples=len(arrays[0]) if arrays else 0,
        sparsity=_kernel_sparsity(stripped),
        top1_agreement=top1,
        precision=precision,
        float_ops=float_ops(content) if precision == "int8" else [],
        latency_ms=latency,
        float_latency_ms=float_latency,
    )
