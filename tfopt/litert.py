"""Convert Keras models to LiteRT flatbuffers, and run, time and inspect those files.

The building blocks of `tfopt.export`, public so that benchmarks and tests can
convert and run files the way `export` does. This module (with
`tfopt.strategies` and `tfopt.exporting`) is where tfopt touches TensorFlow
directly: the converter is `tf.lite.TFLiteConverter`, and files run in the
`ai_edge_litert` interpreter.

Example:
>>> import keras, numpy as np
>>> from tfopt import litert
>>> model = keras.Sequential([keras.Input((4,), name="x"), keras.layers.Dense(2)])
>>> content = litert.convert(model)
>>> x = np.ones((3, 4), "float32")
>>> out = litert.run_litert(content, [x], input_names=["x"])[0]
>>> bool(np.allclose(out, model(x), atol=1e-5)), litert.float_ops(content)
(True, ['FULLY_CONNECTED'])
"""

import contextlib
import io
import logging
import time
import warnings

import keras
import numpy as np

from tfopt import _keras_internal, _state
from tfopt._export.inputs import structured

log = logging.getLogger("tfopt")

__all__ = ["convert", "run_litert", "litert_latency_ms", "litert_load_error", "float_ops", "tensor_count",
           "sample_inputs", "Generator", "GenerationStats"]


def convert(model, optimizations=None, precision="float32", representative_data=None, sparse=False,
            input_shapes=None):
    """Converts a Keras model, as it is, to a LiteRT flatbuffer (bytes).

    The model's inference function is traced once and frozen by the
    converter (about 2.5x faster than `from_keras_model`, which writes and
    reloads a SavedModel: ResNet50 int8, 10 s vs 26 s); where tracing fails
    outside the converter itself, `from_keras_model` converts. Fake
    quantization is on while tracing (see `tfopt.export`). Nothing is stripped
    or checked: `tfopt.export` does that around this call.

    Args:
        model: a Keras model the converter takes (see `tfopt.export`).
        optimizations: passed to the converter (e.g. `[tf.lite.Optimize.DEFAULT]`).
        precision: "float32", "float16", "int8" or "int16x8".
        representative_data: a list of arrays (one per model input, in
            `model.inputs` order) to calibrate int8/int16x8 ranges on, or None.
        sparse: store pruned weights in the converter's sparse format.
        input_shapes: None (the model's input shapes), or one shape per model
            input (in `model.inputs` order, without the batch axis) to trace at
            instead: fixes the model's free (None) dimensions, such as a
            sequence length, in the file. The batch axis stays free.

    Returns:
        The flatbuffer, as bytes.

    Example:
    >>> import keras
    >>> from tfopt import litert
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> litert.convert(model)[4:8]
    b'TFL3'
    """
    args = (optimizations, precision, representative_data, sparse, input_shapes)
    try:
        return _convert_with(model, True, *args)
    except Exception as traced_error:  # noqa: BLE001 - the other path says whether it was the model
        if type(traced_error).__name__ == "ConverterError":  # (not public) the converter refused the model
            raise
        if "should be recorded during calibration" in str(traced_error):
            # (Measured, TF 2.21: int16x8 calibration keeps no range for an integer input.)
            integer = [t.name for t in model.inputs if "int" in keras.backend.standardize_dtype(t.dtype)]
            raise ValueError(
                f"tfopt.export: the TensorFlow converter could not calibrate model '{model.name}' in "
                f"precision={precision!r}: {str(traced_error).splitlines()[0]} (integer inputs: {integer}; "
                "the converter's int16x8 calibration fails on integer inputs such as token ids). Fix: export "
                "precision='int8' after tfopt.quantize_model (ranges from training, no calibration), or a "
                "weight-only precision such as 'int8_weight_only'.") from traced_error
        if input_shapes is not None:  # (from_keras_model converts the model's own shapes only)
            raise
        log.debug("tfopt.export: the traced conversion failed (%s); converting with from_keras_model.",
                  traced_error)
        return _convert_with(model, False, *args)


def _traced_converter(model, input_shapes=None):
    """A converter for a `tf.function` calling `model` with its inputs in
    `model.inputs` order, packed into the model's own input structure
    (traced at `(None, *shape)` for each of `input_shapes` when given)."""
    import tensorflow as tf

    shapes = [t.shape for t in model.inputs] if input_shapes is None else [
        (None, *shape) for shape in input_shapes]
    specs = [tf.TensorSpec(shape, t.dtype, name=_keras_internal.input_name(t))
             for shape, t in zip(shapes, model.inputs)]

    @tf.function(input_signature=specs)
    def serve(*tensors):
        return model(structured(model, list(tensors)), training=False)

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


def _convert_with(model, traced, optimizations, precision, representative_data, sparse=False, input_shapes=None):
    # Traced with every fake-quant op on (the converter reads the ranges only from ops that
    # feed their consumers), whichever path traces; the converter prints a SavedModel's
    # signature: keep the user's console for the report.
    with contextlib.redirect_stdout(io.StringIO()), _state.export_scope(), warnings.catch_warnings():
        # Printed for every QAT model: its input ranges come from the fake-quant ops instead.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        converter = _configured(model, traced, optimizations, precision, representative_data, sparse, input_shapes)
        return converter.convert()


def _configured(model, traced, optimizations, precision, representative_data, sparse, input_shapes=None):
    import tensorflow as tf

    converter = _traced_converter(model, input_shapes) if traced else tf.lite.TFLiteConverter.from_keras_model(model)
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


def _interpreter(**kwargs):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as e:  # pragma: no cover - the test extra installs it
        raise ImportError(
            "Running a .tflite file needs the LiteRT interpreter. Install it with "
            "`pip install 'tfopt[litert]'` (package ai-edge-litert), or pass check=False to tfopt.export."
        ) from e
    return Interpreter(**kwargs)


def litert_load_error(model_content):
    """None if the default LiteRT interpreter loads and runs `model_content`, else its error.

    The interpreter is `ai_edge_litert`'s, with its default XNNPACK delegate;
    it runs the file once on zeros. (An int8 file with sparse-encoded weights
    outside 1x16 blocks fails here: "failed to delegate FULLY_CONNECTED ...
    failed to prepare".)

    Example:
    >>> import keras
    >>> from tfopt import litert
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    >>> litert.litert_load_error(litert.convert(model)) is None
    True
    """
    try:
        interpreter = _interpreter(model_content=model_content)
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


def sample_inputs(model_content, num_samples=8, seed=0):
    """Random inputs shaped and typed as a LiteRT file's inputs (unknown sizes: 1).

    Floats are standard normal, integers 0 or 1, in the file's input order.

    Example:
    >>> import keras
    >>> from tfopt import litert
    >>> content = litert.convert(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))
    >>> [a.shape for a in litert.sample_inputs(content, 3)]
    [(3, 4)]
    """
    rng = np.random.default_rng(seed)
    arrays = []
    for detail in _interpreter(model_content=model_content).get_input_details():
        shape = [num_samples] + [d if d > 0 else 1 for d in detail["shape_signature"][1:]]
        if np.issubdtype(detail["dtype"], np.integer):
            arrays.append(rng.integers(0, 2, size=shape).astype(detail["dtype"]))
        else:
            arrays.append(rng.standard_normal(shape).astype(detail["dtype"]))
    return arrays


def run_litert(model_content, inputs, input_names=None):
    """Runs a LiteRT flatbuffer on a list of input arrays and returns its outputs.

    Inputs are fed by name through the file's signature when `input_names`
    (the Keras input names, in the order of `inputs`) are given, since the
    converter may reorder input tensors; outputs come back in the Keras
    model's order (`output_0`, `output_1`, ...).

    Args:
        model_content: the flatbuffer (bytes).
        inputs: a list of arrays, each with a leading samples axis.
        input_names: the Keras input names of `inputs`, or None (file order).

    Returns:
        A list of NumPy arrays, one per output.

    Example:
    >>> import keras, numpy as np
    >>> from tfopt import litert
    >>> model = keras.Sequential([keras.Input((4,), name="x"), keras.layers.Dense(2)])
    >>> litert.run_litert(litert.convert(model), [np.ones((3, 4), "float32")], ["x"])[0].shape
    (3, 2)
    """
    interpreter = _interpreter(model_content=model_content)
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


def _output_index(name):
    tail = name.rsplit("_", 1)[-1]
    return (0, int(tail), name) if tail.isdigit() else (1, 0, name)


def litert_latency_ms(model_content, inputs, runs=50, warmup=5, num_threads=1):
    """Median milliseconds of one inference of a LiteRT flatbuffer.

    It runs on the first sample of `inputs` (a list of arrays), after `warmup`
    runs, with `num_threads` interpreter threads.

    Example:
    >>> import keras, numpy as np
    >>> from tfopt import litert
    >>> content = litert.convert(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))
    >>> litert.litert_latency_ms(content, [np.ones((1, 4), "float32")], runs=3, warmup=1) > 0
    True
    """
    interpreter = _interpreter(model_content=model_content, num_threads=num_threads)
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


def float_ops(model_content):
    """Names of the ops of a LiteRT flatbuffer that take float32 inputs.

    QUANTIZE and DEQUANTIZE are left out: the list is what did not become
    integer in an int8 export (empty for a full-integer file).

    Example:
    >>> import keras
    >>> from tfopt import litert
    >>> litert.float_ops(litert.convert(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])))
    ['FULLY_CONNECTED']
    """
    interpreter = _interpreter(model_content=model_content)
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    out = []
    for op in _keras_internal.litert_ops(interpreter):
        if op["op_name"] in ("QUANTIZE", "DEQUANTIZE"):
            continue
        if any(i >= 0 and tensors[i]["dtype"] == np.float32 for i in op["inputs"]):
            out.append(op["op_name"])
    return out


def tensor_count(model_content, dtype):
    """How many tensors of a LiteRT flatbuffer have `dtype` (e.g. `np.int8`).

    Example:
    >>> import keras, numpy as np
    >>> from tfopt import litert
    >>> litert.tensor_count(litert.convert(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])), np.int8)
    0
    """
    interpreter = _interpreter(model_content=model_content)
    return sum(1 for t in interpreter.get_tensor_details() if t["dtype"] == dtype)


class GenerationStats:
    """How long the last `Generator.generate` took, in the interpreter.

    Attributes:
        prompt_tokens: the prompt's length.
        new_tokens: tokens generated (the first comes from prefill).
        prefill_ms: milliseconds of the prefill call (the padded prompt).
        decode_ms: milliseconds of all decode calls together.
        decode_tokens_per_second: decode calls per second (each gives one
            token), None when there was none.
        tokens_per_second: generated tokens per second, prefill included.
    """

    def __init__(self, prompt_tokens, new_tokens, prefill_s, decode_s, decode_calls):
        self.prompt_tokens = prompt_tokens
        self.new_tokens = new_tokens
        self.prefill_ms = prefill_s * 1000.0
        self.decode_ms = decode_s * 1000.0
        self.decode_tokens_per_second = decode_calls / decode_s if decode_calls and decode_s > 0 else None
        total = prefill_s + decode_s
        self.tokens_per_second = new_tokens / total if new_tokens and total > 0 else None

    def __repr__(self):
        decode = "n/a" if self.decode_tokens_per_second is None else f"{self.decode_tokens_per_second:.1f}"
        return (f"GenerationStats(prompt_tokens={self.prompt_tokens}, new_tokens={self.new_tokens}, "
                f"prefill_ms={self.prefill_ms:.2f}, decode_tokens_per_second={decode})")


class Generator:
    """Greedy generation from a LiteRT file written by `tfopt.export_generator`.

    The file has a "prefill" and a "decode" signature and an explicit
    key-value cache (see `tfopt.export_generator`); this runner feeds the
    prompt to prefill, then one token at a time to decode, carrying the cache
    between calls, in the default `ai_edge_litert` interpreter (XNNPACK).

    Args:
        model: the file's path, or its bytes.
        num_threads: interpreter threads (1: the on-device single-core figure).

    Attributes:
        max_length: the longest sequence (prompt plus new tokens) the file holds.
        prompt_length: the longest prompt prefill takes.
        vocabulary_size: the logits' size.
        signatures: the file's signatures, as the interpreter lists them.
        stats: a `GenerationStats` for the last `generate` call (None before).

    Example:
    >>> import os, tempfile, keras_hub, tfopt
    >>> backbone = keras_hub.models.GPT2Backbone(vocabulary_size=32, num_layers=1, num_heads=2, hidden_dim=16,
    ...                                          intermediate_dim=32, max_sequence_length=16)
    >>> lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    >>> path = tfopt.export_generator(lm, os.path.join(tempfile.mkdtemp(), "lm.tflite"), max_length=16).path
    >>> generator = tfopt.litert.Generator(path)
    >>> tokens = generator.generate([1, 2, 3], max_new_tokens=4)
    >>> tokens[:3].tolist(), len(tokens), generator.stats.new_tokens
    ([1, 2, 3], 7, 4)
    """

    def __init__(self, model, num_threads=1):
        if isinstance(model, (bytes, bytearray)):
            interpreter = _interpreter(model_content=bytes(model), num_threads=num_threads)
        else:
            interpreter = _interpreter(model_path=str(model), num_threads=num_threads)
        self.signatures = interpreter.get_signature_list()
        missing = [name for name in ("prefill", "decode") if name not in self.signatures]
        if missing:
            raise ValueError(
                f"tfopt.litert.Generator: the file has no {missing} signature(s) (it has "
                f"{sorted(self.signatures)}); Generator runs files written by tfopt.export_generator. Fix: "
                "write the file with tfopt.export_generator(causal_lm, path), or run it with run_litert.")
        self._prefill = interpreter.get_signature_runner("prefill")
        self._decode = interpreter.get_signature_runner("decode")
        inputs = self._prefill.get_input_details()
        self.prompt_length = int(inputs["token_ids"]["shape"][1])
        cache = self._decode.get_input_details()["cache"]
        self._cache_shape, self._cache_dtype = tuple(cache["shape"]), cache["dtype"]
        self.max_length = int(self._cache_shape[3])
        self.vocabulary_size = int(self._prefill.get_output_details()["logits"]["shape"][-1])
        self.stats = None

    def _check(self, prompt_ids, max_new_tokens):
        prompt = np.asarray(prompt_ids)
        if prompt.ndim == 2 and prompt.shape[0] == 1:
            prompt = prompt[0]
        if prompt.ndim != 1 or prompt.size == 0 or not np.issubdtype(prompt.dtype, np.integer):
            raise ValueError(
                f"tfopt.litert.Generator.generate: `prompt_ids` must be a non-empty 1-D sequence of integer token "
                f"ids (one prompt; batch 1). Received: an array of shape {prompt.shape} and dtype {prompt.dtype}. "
                "Fix: pass e.g. [15496, 11, 995] (token ids from the model's tokenizer).")
        if prompt.min() < 0 or prompt.max() >= self.vocabulary_size:
            raise ValueError(
                f"tfopt.litert.Generator.generate: `prompt_ids` holds token id(s) outside the vocabulary "
                f"[0, {self.vocabulary_size}): min {prompt.min()}, max {prompt.max()}. Fix: tokenize with the "
                "model's own tokenizer.")
        if prompt.size > self.prompt_length:
            raise ValueError(
                f"tfopt.litert.Generator.generate: the prompt has {prompt.size} tokens, and the file's prefill "
                f"takes at most prompt_length={self.prompt_length}. Fix: shorten the prompt, or export with "
                f"tfopt.export_generator(..., prompt_length={prompt.size}) or more.")
        if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise ValueError(
                f"tfopt.litert.Generator.generate: `max_new_tokens` must be a positive int. Received: "
                f"max_new_tokens={max_new_tokens!r}. Fix: max_new_tokens=32.")
        if prompt.size + max_new_tokens > self.max_length:
            raise ValueError(
                f"tfopt.litert.Generator.generate: the prompt ({prompt.size} tokens) plus max_new_tokens="
                f"{max_new_tokens} is {prompt.size + max_new_tokens} tokens, more than the file's max_length="
                f"{self.max_length} (its key-value cache). Fix: max_new_tokens={self.max_length - prompt.size} or "
                f"fewer, or export with tfopt.export_generator(..., max_length={prompt.size + max_new_tokens}).")
        return prompt.astype("int32")

    def generate(self, prompt_ids, max_new_tokens, stop_token_ids=None, return_logits=False):
        """Greedy generation: the prompt followed by up to `max_new_tokens` new token ids.

        Args:
            prompt_ids: one prompt, a 1-D sequence of token ids (at most
                `prompt_length`).
            max_new_tokens: how many tokens to generate; prompt plus these must
                fit in `max_length`.
            stop_token_ids: token ids that end generation once generated (kept
                in the output), or None.
            return_logits: also return the logits each new token was chosen from
                (new tokens, vocabulary).

        Returns:
            A 1-D int32 array, prompt then new tokens (and the logits with
            `return_logits`). `self.stats` holds the timing.
        """
        prompt = self._check(prompt_ids, max_new_tokens)
        stops = set() if stop_token_ids is None else {int(t) for t in np.atleast_1d(stop_token_ids)}
        padded = np.zeros((1, self.prompt_length), "int32")
        padded[0, :prompt.size] = prompt
        start = time.perf_counter()
        out = self._prefill(token_ids=padded, length=np.asarray(prompt.size, "int32"))
        prefill_s = time.perf_counter() - start
        logits, cache = out["logits"][0], out["cache"]
        tokens, all_logits = list(prompt), [logits]
        token = int(np.argmax(logits))
        tokens.append(token)
        decode_s, calls = 0.0, 0
        while len(tokens) - prompt.size < max_new_tokens and token not in stops:
            start = time.perf_counter()
            out = self._decode(token_id=np.asarray([[token]], "int32"), cache=cache,
                               position=np.asarray(len(tokens) - 1, "int32"))
            decode_s += time.perf_counter() - start
            calls += 1
            logits, cache = out["logits"][0], out["cache"]
            all_logits.append(logits)
            token = int(np.argmax(logits))
            tokens.append(token)
        self.stats = GenerationStats(prompt.size, len(tokens) - prompt.size, prefill_s, decode_s, calls)
        tokens = np.asarray(tokens, "int32")
        return (tokens, np.stack(all_logits)) if return_logits else tokens
