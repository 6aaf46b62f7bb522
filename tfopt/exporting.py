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
import logging
import os
import tempfile
import warnings

import keras
import numpy as np

from tfopt import _keras_internal, _state, geometry, strategies, transforms
from tfopt.layers.quantize_activation import QuantizingLayer
from tfopt.reporting import prunable_values, zero_fraction

log = logging.getLogger("tfopt")

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
        precision: "float32", "float16", "int8" or "int16x8".
        float_ops: the file's ops that still compute in float, other than the
            QUANTIZE/DEQUANTIZE at its edges (empty for a full-integer model).
        activation_ranges: for int8/int16x8 files, where the activation
            ranges came from: "quantization-aware training" (the fake-quant
            ranges learned in `fit`) or "calibrated" (measured on
            `representative_data` by the converter); None for float files.
        num_check_samples: how many inputs were compared.
        sparsity: fraction of zeros in the exported kernels.
        latency_ms: median time of one single-input inference of the written
            file in the LiteRT interpreter (one thread), or None if not measured
            (`measure_latency=False`).
        float_latency_ms: the same for the model converted in float32, for
            comparison (equal to `latency_ms` for a float32 export).
        sparse_encoding: True when the file stores its pruned weights in the
            converter's sparse format (`sparse=`), False when it is dense.
        dense_size_bytes: with `sparse=`, the size of the dense file of the
            same precision, for comparison; else None.
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

    def __str__(self):
        diff = "not checked" if self.max_abs_diff is None else f"{self.max_abs_diff:.3g}"
        text = (
            f"{self.path}: {self.size_bytes:,} bytes ({self.gzip_bytes:,} gzipped), "
            f"max |LiteRT - Keras| = {diff} over {self.num_check_samples} inputs"
        )
        if self.sparse_encoding:
            text += f", sparse-encoded (dense: {self.dense_size_bytes:,} bytes)"
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


_PRECISIONS = ("float32", "float16", "int8", "int16x8")
# Below this arg-max agreement on the user's own check inputs, export warns.
_AGREEMENT_WARNING = 0.9


# Below this fraction of zeros in the kernels, `sparse="auto"` keeps the file dense (the
# converter itself encodes a weight only above about 30% zeros).
_AUTO_SPARSITY = 0.5


def _convert(model, optimizations=None, precision="float32", representative_data=None, sparse=False):
    # The model's inference function, traced once and frozen by the converter: about 2.5x
    # faster than `from_keras_model`, which writes and reloads a SavedModel (measured on
    # ResNet50 int8: 10 s vs 26 s). Where tracing it fails outside the converter itself
    # (a TensorFlow without this path, say), `from_keras_model` does the conversion.
    args = (optimizations, precision, representative_data, sparse)
    try:
        return _convert_with(model, True, *args)
    except Exception as traced_error:  # noqa: BLE001 - the other path says whether it was the model
        if type(traced_error).__name__ == "ConverterError":  # (not public) the converter refused the model
            raise
        log.debug("tfopt.export: the traced conversion failed (%s); converting with from_keras_model.",
                  traced_error)
        return _convert_with(model, False, *args)


def litert_load_error(model_content):
    """None if the default LiteRT interpreter (`ai_edge_litert`, its default
    XNNPACK delegate included) loads and runs `model_content` on zeros, else
    the error it gave. (An int8 file with sparse-encoded weights fails here:
    "failed to delegate FULLY_CONNECTED ... failed to prepare".)"""
    from ai_edge_litert.interpreter import Interpreter

    try:
        interpreter = Interpreter(model_content=model_content)
        for detail in interpreter.get_input_details():
            shape = [d if d > 0 else 1 for d in detail["shape_signature"]]
            interpreter.resize_tensor_input(detail["index"], shape)
        interpreter.allocate_tensors()
        for detail in interpreter.get_input_details():
            interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
        interpreter.invoke()
    except (RuntimeError, ValueError) as e:
        return e
    return None


def _sparse_content(dense, convert_args, sparse, sparsity, path):
    """The sparse-encoded file when `sparse` asks for it and it serves: smaller
    than `dense` and loadable in the default interpreter; else `dense`, with a
    warning saying why when sparse=True asked for it."""
    if sparse == "auto" and (sparsity or 0.0) < _AUTO_SPARSITY:
        return dense, False
    content = _convert(*convert_args, sparse=True)
    error = litert_load_error(content)
    if error is not None:
        warnings.warn(
            f"tfopt.export: the sparse-encoded file does not load in the default LiteRT interpreter "
            f"({' '.join(str(error).split())[:200]}), so the dense file was written to {str(path)!r}. "
            "LiteRT's sparse int8 kernels need 1x16 blocks along FULLY_CONNECTED inputs (structure "
            "'litert_1x16'); float files take any sparsity. Fix: prune with that structure, export in "
            "float32, or drop sparse=.", UserWarning, stacklevel=3)
        return dense, False
    if len(content) >= len(dense):
        if sparse is True:
            warnings.warn(
                f"tfopt.export: sparse encoding did not make the file smaller ({len(content):,} vs "
                f"{len(dense):,} bytes; the kernels are {sparsity or 0.0:.0%} zeros, and the converter "
                f"encodes a weight only above about 30%), so the dense file was written to {str(path)!r}.",
                UserWarning, stacklevel=3)
        return dense, False
    return content, True


def _structured(model, arrays):
    """`arrays` (in `model.inputs` order) as the model takes them: a dict for a
    model with named dict inputs, else the list (or the one array)."""
    try:
        structure = model.input
    except (AttributeError, ValueError):  # a Sequential or subclassed model never called
        structure = None
    if isinstance(structure, dict) and len(keras.tree.flatten(structure)) == len(arrays):
        return keras.tree.pack_sequence_as(structure, list(arrays))
    return arrays if len(arrays) > 1 else arrays[0]


def _traced_converter(model):
    """A converter for a `tf.function` calling `model` with its inputs in
    `model.inputs` order, packed into the model's own input structure."""
    import tensorflow as tf

    specs = [tf.TensorSpec(t.shape, t.dtype, name=_keras_internal.input_name(t)) for t in model.inputs]

    @tf.function(input_signature=specs)
    def serve(*tensors):
        return model(_structured(model, list(tensors)), training=False)

    # Without `trackable_obj` the converter freezes the variables to constants itself (the
    # int8 path needs the fake-quant ranges as constants) instead of going through a
    # SavedModel; TensorFlow logs that this is its older path, which is the point here.
    with _absl_warning_filtered("Please consider providing the trackable_obj"):
        return tf.lite.TFLiteConverter.from_concrete_functions([serve.get_concrete_function()])


@contextlib.contextmanager
def _absl_warning_filtered(prefix):
    """Drops TensorFlow's (absl) log records that start with `prefix` within the block."""
    logger = logging.getLogger("absl")
    drop = lambda record: not str(record.getMessage()).startswith(prefix)  # noqa: E731
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _convert_with(model, traced, optimizations, precision, representative_data, sparse=False):
    # Traced with every fake-quant op on (the converter reads the ranges only from ops that
    # feed their consumers), whichever path traces; the converter prints a SavedModel's
    # signature: keep the user's console for the report.
    with contextlib.redirect_stdout(io.StringIO()), _state.export_scope(), warnings.catch_warnings():
        # Printed for every QAT model: its input ranges come from the fake-quant ops instead.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        converter = _configured(model, traced, optimizations, precision, representative_data, sparse)
        return converter.convert()


def _configured(model, traced, optimizations, precision, representative_data, sparse):
    import tensorflow as tf

    converter = _traced_converter(model) if traced else tf.lite.TFLiteConverter.from_keras_model(model)
    if optimizations:
        converter.optimizations = list(optimizations)
    if precision == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif precision in ("int8", "int16x8"):
        # Fake-quant ops carry the ranges; without them, calibrate on data.
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if representative_data is not None:
            arrays = representative_data if isinstance(representative_data, (list, tuple)) else [representative_data]

            dtypes = [keras.backend.standardize_dtype(t.dtype) for t in getattr(model, "inputs", None) or []]
            dtypes = dtypes if len(dtypes) == len(arrays) else ["float32"] * len(arrays)

            def samples():  # (integer inputs, such as token ids, stay integers)
                for i in range(len(arrays[0])):
                    yield [np.asarray(a[i : i + 1], dtype) for a, dtype in zip(arrays, dtypes)]

            converter.representative_dataset = samples
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8] if precision == "int8" else [
                # 16-bit activations, 8-bit weights; ops without such a kernel stay float (reported).
                tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8,
                tf.lite.OpsSet.TFLITE_BUILTINS]
    if sparse:  # pruned weights stored in the converter's sparse format
        converter.optimizations = list(converter.optimizations or []) + [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    return converter


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


def _symbolic_inputs(model):
    """The model's symbolic input tensors, or None (a subclassed or unbuilt model)."""
    try:
        tensors = model.inputs
    except (AttributeError, ValueError):
        return None
    return list(tensors) if tensors else None


def _shape_text(shape):
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _as_arrays(data, argument):
    """`data` (an array or a list of arrays) as a list of NumPy arrays, each with a samples axis."""
    arrays = data if isinstance(data, (list, tuple)) else [data]
    out = []
    for a in arrays:
        array = np.asarray(a)
        if array.ndim == 0 or array.dtype == object:
            raise TypeError(
                f"tfopt.export: `{argument}` must be an array with a leading samples axis, or a list of "
                f"such arrays (one per model input). Received: {argument} of type {type(a).__name__}"
                + ("" if array.dtype == object else f" with shape {array.shape}")
                + ". Fix: pass np.asarray(samples), e.g. x_train[:500] (a tf.data.Dataset: stack its batches "
                "with np.concatenate([x for x, _ in dataset])).")
        out.append(array)
    return out


def _check_arrays(model, arrays, argument):
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
    tensors = _symbolic_inputs(model)
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


def _check_finite(arrays, argument):
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


def _check_target(path):
    """Raises before any conversion if `path` cannot be written (a missing parent is fine: it is created)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"tfopt.export: path {path!r} is a directory; `path` names the .tflite file to write. "
            f"Fix: path={os.path.join(path, 'model.tflite')!r}.")
    existing = os.path.dirname(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(
            f"tfopt.export: cannot write {path!r}: {existing!r} is a file, not a directory. "
            "Fix: choose a path under a directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            f"tfopt.export: cannot write {path!r}: directory {existing!r} is not writable. "
            "Fix: choose a writable directory, or change its permissions.")


def _half_layers(model):
    """Layers (the model included) that compute in float16/bfloat16 (a mixed-precision policy)."""
    out = []
    for layer in [model] + _keras_internal.all_layers(model):
        policy = getattr(layer, "dtype_policy", None)
        if policy is not None and getattr(policy, "quantization_mode", None) is None and \
                keras.backend.standardize_dtype(policy.compute_dtype) in ("float16", "bfloat16"):
            out.append(layer)
    return out


def _export_form(model, calibrating=False):
    """`model`, or a copy with the same weights that the LiteRT converter
    takes: layers computing in float16/bfloat16 (mixed precision) rebuilt in
    float32 (the converter has no float16 MatMul), and layers with a
    `tfopt.geometry` export form rebuilt in it (`tfopt/layers/litert_forms.py`:
    RNNs unrolled; with `calibrating`, LayerNormalization without NEG)."""
    half = _half_layers(model)
    forms = {}
    if _keras_internal.is_graph_network(model):
        for layer in _keras_internal.all_layers(model):
            form = geometry.export_form(layer, calibrating)
            if form is not None and (form[0] is not type(layer) or form[1] != layer.get_config()):
                forms[id(layer)] = form
    if not half and not forms:
        return model
    half_ids = {id(layer) for layer in half}
    if not half:
        return _rebuild(model, forms, half_ids)
    policies = sorted({layer.dtype_policy.name for layer in half})
    if not _keras_internal.is_graph_network(model):
        raise ValueError(
            f"tfopt.export: model '{model.name}' ({type(model).__name__}) computes in half precision "
            f"(dtype policies {policies}), which the LiteRT converter cannot convert, and tfopt rebuilds "
            "only Sequential and Functional models in float32. Fix: build the model again under "
            "keras.mixed_precision.set_global_policy('float32'), copy the weights with "
            "float_model.set_weights(model.get_weights()), and export that.")
    code = [layer for layer in half if _keras_internal.holds_python_code(layer)]
    if code:
        raise ValueError(
            f"tfopt.export: layer '{code[0].name}' ({type(code[0]).__name__}) of model '{model.name}' "
            f"computes in half precision (dtype policy {code[0].dtype_policy.name!r}), which the LiteRT "
            "converter cannot convert, and holds Python code, which tfopt cannot rebuild in float32 "
            "without unsafe deserialization. Fix: create that layer with dtype='float32' (e.g. "
            "keras.layers.Lambda(fn, dtype='float32')), or build the model under the float32 policy.")
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")  # sublayers built without a dtype of their own
    try:
        return _rebuild(model, forms, half_ids)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _rebuild(model, forms, half_ids):
    def clone_function(layer):
        if id(layer) not in forms and id(layer) not in half_ids:
            return layer  # kept as it is (shared with `model`; Lambda layers need no deserializing)
        cls, config = forms.get(id(layer), (layer.__class__, layer.get_config()))
        if id(layer) in half_ids:
            config["dtype"] = "float32"
        return cls.from_config(config)

    clone = keras.models.clone_model(model, clone_function=clone_function, recursive=True)
    clone.set_weights([
        np.asarray(w, "float32") if np.issubdtype(np.asarray(w).dtype, np.floating) else w
        for w in model.get_weights()
    ])
    return clone


def _tensor_count(model_content, dtype):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model_content)
    return sum(1 for t in interpreter.get_tensor_details() if t["dtype"] == dtype)


def _has_quantization(model):
    return any(isinstance(layer, QuantizingLayer) and layer.is_quantizing()
               for layer in _keras_internal.all_layers(model))


def export(model, path, inputs=None, check=True, num_check_samples=8, seed=0, optimizations=None,
           precision="float32", representative_data=None, measure_latency=False, sparse=False):
    """Strips `model`, writes it as a LiteRT `.tflite` file, checks it, reports sizes.

    The file is written atomically: if conversion or writing fails, an existing
    file at `path` is left as it was. Under `tfopt.strategies.MultiWorker`,
    only the chief writes `path`; other workers write to a temporary
    directory (`report.path` says where), so every worker can run the same code. With `check=True` the written bytes run in
    the `ai_edge_litert` interpreter on `inputs` (or on `num_check_samples`
    random inputs shaped like the model's) and the largest absolute difference
    from the Keras model's outputs is reported.

    Misuses are refused before the (slow) conversion: a `path` that is a
    directory or under a read-only one, `inputs`/`representative_data` whose
    shapes do not fit the model's inputs (None dims match any size), and empty
    or non-finite calibration data. An int8 export whose file holds no int8
    tensor raises instead of writing a float file labelled int8. A
    Recurrent layers are converted unrolled (Keras 3's RNN loop does not
    convert), which needs a fixed sequence length. A
    mixed-precision model (`mixed_float16`, `mixed_bfloat16`) is converted from
    a float32 copy with the same weights (the global dtype policy is restored
    afterwards) and checked against the original model's outputs.

    Args:
        model: a Keras 3 model (tfopt layers and Pruning-callback masks are
            stripped first; see `tfopt.strip`).
        path: where to write the `.tflite` file.
        inputs: an array, or a list of arrays for multi-input models, to check on.
        check: run the file in the LiteRT interpreter and compare.
        num_check_samples: random inputs to draw when `inputs` is None.
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
        representative_data: inputs for calibration (an array, or a list of
            arrays; finite, at least one sample; used only with
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
            not load and run in the default LiteRT interpreter, or is not
            smaller; `report.sparse_encoding` says which was written and
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
    if not str(path).endswith(".tflite"):
        raise ValueError(
            f"`tfopt.export` writes LiteRT flatbuffers; `path` should end in '.tflite'. "
            f"Received: path={str(path)!r}"
        )
    if precision not in _PRECISIONS:
        raise ValueError(f"`precision` must be one of {_PRECISIONS}. Received: precision={precision!r}")
    if sparse not in (True, False, "auto") or isinstance(sparse, (int, float)) and not isinstance(sparse, bool):
        raise ValueError(f"`sparse` must be True, False or 'auto'. Received: sparse={sparse!r}")
    strategy = _keras_internal.distribute_strategy(model)
    if strategy is not None and not strategies.is_chief(strategy):
        # Multi-worker: every worker runs the same script; only the chief's file lands at `path`.
        path = strategies.chief_path(strategy, path)
    _check_target(path)
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
                "representative_data (use inputs= for the arrays to check on).", UserWarning, stacklevel=2)
            representative_data = None
        else:
            representative_data = _as_arrays(representative_data, "representative_data")
            _check_arrays(model, representative_data, "representative_data")
            _check_finite(representative_data, "representative_data")
    if inputs is not None:
        inputs = _as_arrays(inputs, "inputs")
        _check_arrays(model, inputs, "inputs")
    # QAT layers must stay: their fake-quant ops carry the int8 ranges.
    stripped = model if (precision == "int8" and quantized) else transforms.strip(model)
    # (A mixed-precision model is converted from a float32 copy and checked against itself.)
    calibrated = representative_data is not None and not (precision == "int8" and quantized)
    convert_args = (_export_form(stripped, calibrated), optimizations, precision,
                    representative_data if calibrated else None)
    content = _convert(*convert_args)
    if precision == "int8" and quantized and representative_data is not None and float_ops(content):
        # Layers that quantization-aware training leaves in float (LayerNormalization,
        # attention, RNNs, ...): calibrate every range on the data instead, for a
        # full-integer file; the weights keep what QAT trained.
        stripped, calibrated = transforms.strip(model), True
        convert_args = (_export_form(stripped, True), optimizations, precision, representative_data)
        content = _convert(*convert_args)
    dense_size = None
    if sparse:  # (the same model and arguments, sparse-encoded)
        dense_size = len(content)
        content, sparse = _sparse_content(content, convert_args, sparse, _kernel_sparsity(stripped), path)
    if precision == "int16x8" and not _tensor_count(content, np.int16):
        raise ValueError(
            f"tfopt.export: the converter returned no int16 activation for precision='int16x8' (float ops: "
            f"{sorted(set(float_ops(content)))}), so nothing was written to {str(path)!r}. Fix: pass "
            "typical, finite inputs as representative_data, or export with precision='int8'.")
    if precision == "int8" and not _tensor_count(content, np.int8):
        raise ValueError(
            f"tfopt.export: the converter returned a float model for precision='int8' (no int8 tensor "
            f"in the file; float ops: {sorted(set(float_ops(content)))}), so nothing was written to "
            f"{str(path)!r}. This happens when calibration data gives no usable ranges, or when the "
            f"model (model '{model.name}') has no op the converter quantizes. Fix: pass typical, "
            "finite inputs as representative_data, or export with precision='float32'.")
    max_diff = top1 = None
    arrays = []
    if check:
        arrays = _check_inputs(stripped, inputs, num_check_samples, seed)
        expected = [np.asarray(o) for o in _flat_outputs(stripped(_structured(stripped, arrays)))]
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
        if top1 is not None and top1 < _AGREEMENT_WARNING and inputs is not None:
            warnings.warn(
                f"tfopt.export: the {precision} LiteRT file agrees with the Keras model on only {top1:.1%} of "
                f"the {len(arrays[0])} check inputs (arg-max; max |difference| {max_diff:.3g}). It was written, "
                "but it computes something else than the model: try another precision (int16x8 or int8, "
                "or float32), more representative_data, or report the model to tfopt.", UserWarning,
                stacklevel=2)
    latency = float_latency = None
    if measure_latency:
        timing_inputs = arrays or _check_inputs(stripped, inputs, num_check_samples, seed)
        latency = litert_latency_ms(content, timing_inputs)
        float_latency = latency if precision == "float32" else litert_latency_ms(
            _convert(_export_form(transforms.strip(model))), timing_inputs)
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
        float_ops=float_ops(content) if precision in ("int8", "int16x8") else [],
        activation_ranges=("calibrated" if calibrated else "quantization-aware training")
        if precision in ("int8", "int16x8") else None,
        latency_ms=latency,
        float_latency_ms=float_latency,
        sparse_encoding=bool(sparse),
        dense_size_bytes=dense_size,
    )
