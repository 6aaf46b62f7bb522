"""`tfopt.export_generator`: a keras-hub causal LM as one LiteRT file that generates on device.

Design (keras-hub tried and closed this: keras-team/keras-hub#2705):

- **Stateless, explicit key-value cache.** The file has two signatures.
  `prefill(token_ids (1, prompt_length) int32, length () int32)` returns
  `logits` (1, vocabulary) of the prompt's last real position (`length - 1`)
  and `cache`; `decode(token_id (1, 1) int32, cache, position () int32)`
  writes the key and value of `token_id` at `position` and returns the logits
  of that position and the updated `cache`. The cache is an input and an output
  tensor of one fixed shape, keras-hub's own (`(1, layers, 2, max_length,
  key-value heads, head size)` for GPT-2, Llama, Mistral, Gemma), so the file
  holds no variable: the caller (`tfopt.litert.Generator`) carries it from one
  call to the next. Batch is 1.
- **Both signatures call the model's own `call_with_cache`** (what
  `CausalLM.generate` calls), so any keras-hub CausalLM with that method and
  keras-hub's cache layout converts the same way (tested: GPT2CausalLM; the
  others share the method and the layout).
- **Padding.** The prompt is padded to `prompt_length` (default `max_length`)
  and prefilled whole. Attention is causal, so padded positions after the real
  ones change nothing before them; the cache slots they write are masked
  (keras-hub's causal mask lets position p see slots <= p only) and each is
  overwritten by the decode step that reaches it, as in keras-hub's
  `generate`, which prefills the padded prompt the same way.
- **Conversion.** A Keras `ExportArchive` tracking the model with one endpoint
  per signature, written as a SavedModel and converted with
  `TFLiteConverter.from_saved_model(signature_keys=["prefill", "decode"])`:
  the converter's `from_concrete_functions` takes several functions only with
  a trackable object, and then keeps the weights as resource variables that
  the interpreter's signature runners do not initialise (NaN logits,
  measured). Weights are stored once and shared by both signatures. Built-in
  ops only (no Select TF ops): the file loads in the default `ai_edge_litert`
  interpreter, which is checked before anything is written.
- **Precisions** are `tfopt.export`'s: "float32", "float16" (the converter's
  float16 weights) and the weight-quantized ones of
  `tfopt/_export/weight_only.py`, whose `quantize` rewrites the float32 file
  with LiteRT's quantizer (it takes a multi-signature file: both signatures'
  weights are quantized, measured). Full-integer "int8"/"int16x8" need
  calibrated activation ranges and are not offered.
- **Cost.** Each decode step copies the whole cache several times (keras-hub's
  `call_with_cache` slices each layer's cache out of the stacked tensor, updates
  one position, transposes keys and values for the attention, stacks them back,
  and the file returns the cache): decode time grows with `max_length`
  (benchmarks/generation.py, 0.86M-parameter GPT-2 shape, one thread: 518
  tokens/s at max_length 64, 145 at 256), so export with the length you need.
- **Check.** With `check=True` a short greedy generation runs in the file and
  each of its tokens is compared with the arg-max of the Keras model's logits on
  the same sequence (the model called on the whole sequence, no cache): the
  report gives the token agreement and the largest logit difference.
"""

import dataclasses
import gzip
import os
import shutil
import tempfile

import keras
import numpy as np

from tfopt import _backend, litert
from tfopt._export import weight_only
from tfopt._export.files import atomic_write_bytes, check_target

PRECISIONS = ("float32", "float16") + weight_only.PRECISIONS
SIGNATURES = ("prefill", "decode")
# The check: a prompt of this many seeded tokens, then this many greedy steps.
_CHECK_PROMPT, _CHECK_STEPS = 4, 8


@dataclasses.dataclass
class GeneratorReport:
    """What `tfopt.export_generator` wrote.

    Attributes:
        path: the written file.
        size_bytes: its size.
        gzip_bytes: its size after `gzip -9`.
        precision: the precision it was written in.
        max_length: prompt plus generated tokens, at most (the cache length).
        prompt_length: the longest prompt `prefill` takes.
        cache_shape: the shape of the key-value cache tensor.
        signatures: the file's signatures, as the interpreter lists them
            (`{"prefill": {"inputs": [...], "outputs": [...]}, "decode": ...}`).
        float_size_bytes: for the precisions LiteRT's quantizer writes, the
            size of the float32 file it quantized; else None.
        token_agreement: the fraction of the check's greedy tokens (from the
            file) that are the arg-max of the Keras model's logits on the same
            sequence (None with `check=False`).
        max_abs_diff: the largest absolute difference between the file's
            logits and the Keras model's over the check (None with `check=False`).
        num_check_tokens: how many tokens the check compared.
    """

    path: str
    size_bytes: int
    gzip_bytes: int
    precision: str
    max_length: int
    prompt_length: int
    cache_shape: tuple
    signatures: dict
    float_size_bytes: int | None = None
    token_agreement: float | None = None
    max_abs_diff: float | None = None
    num_check_tokens: int = 0

    def __str__(self):
        text = (f"{self.path}: {self.size_bytes:,} bytes ({self.gzip_bytes:,} gzipped), {self.precision}, "
                f"signatures {sorted(self.signatures)}, max_length {self.max_length}, "
                f"prompts up to {self.prompt_length} tokens, cache {self.cache_shape}")
        if self.token_agreement is not None:
            text += (f", greedy tokens agree with Keras on {self.token_agreement:.1%} of {self.num_check_tokens} "
                     f"(max |logit difference| {self.max_abs_diff:.3g})")
        return text


def _is_causal_lm(model):
    try:
        import keras_hub
    except ImportError:
        return False
    return isinstance(model, keras_hub.models.CausalLM) and callable(getattr(model, "call_with_cache", None))


def _positive_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


def _plan(causal_lm, path, max_length, prompt_length, precision):
    """Every argument checked before the (slow) conversion; returns (max_length, prompt_length)."""
    if not _is_causal_lm(causal_lm):
        raise TypeError(
            f"tfopt.export_generator: `causal_lm` must be a keras-hub CausalLM with `call_with_cache` (such as "
            f"keras_hub.models.GPT2CausalLM, LlamaCausalLM, MistralCausalLM, GemmaCausalLM). Received: "
            f"causal_lm of type {type(causal_lm).__name__}. Fix: wrap the backbone, e.g. "
            "keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None); for any other Keras model "
            "use tfopt.export(model, path).")
    if not str(path).endswith(".tflite"):
        raise ValueError(
            f"tfopt.export_generator: `path` names the LiteRT file to write and should end in '.tflite'. "
            f"Received: path={str(path)!r}. Fix: path='generator.tflite'.")
    if precision not in PRECISIONS:
        raise ValueError(
            f"tfopt.export_generator: `precision` must be one of {PRECISIONS}. Received: precision={precision!r}. "
            "Fix: precision='float32' (exact), 'float16' (half the size), or a weight-quantized one such as "
            "'int8_weight_only'. Full-integer 'int8'/'int16x8' need calibrated activations and are not offered "
            "for generators.")
    limit = getattr(causal_lm.backbone, "max_sequence_length", None)
    if not _positive_int(max_length) or max_length < 2 or (limit and max_length > limit):
        raise ValueError(
            f"tfopt.export_generator: `max_length` is the longest sequence (prompt plus generated tokens) the "
            f"file generates, an int from 2" + (f" to the backbone's max_sequence_length {limit}" if limit else "")
            + f". Received: max_length={max_length!r}. Fix: pass max_length="
            f"{min(limit or 256, 256)} (the key-value cache grows with it).")
    if prompt_length is None:
        prompt_length = max_length
    if not _positive_int(prompt_length) or prompt_length > max_length:
        raise ValueError(
            f"tfopt.export_generator: `prompt_length` is the longest prompt `prefill` takes (prompts are padded "
            f"to it), an int from 1 to max_length={max_length}. Received: prompt_length={prompt_length!r}. Fix: "
            f"prompt_length={max_length // 2} (or None: max_length).")
    dtype = getattr(causal_lm, "compute_dtype", "float32")
    if dtype != "float32":
        raise ValueError(
            f"tfopt.export_generator: model '{causal_lm.name}' computes in {dtype} (dtype policy "
            f"{causal_lm.dtype_policy.name!r}); the file's cache and logits are float32. Fix: build the model "
            "with dtype='float32' and copy the weights (lm.set_weights), then export that copy.")
    weight_only.require_quantizer(precision)
    check_target(path)
    return int(max_length), int(prompt_length)


def cache_spec(causal_lm, max_length):
    """(shape, dtype) of the model's key-value cache for one sequence of `max_length` tokens.

    Taken from keras-hub's own cache builder (`CausalLM._build_cache`, a
    keras-hub method, not a Keras one; checked on keras-hub 0.32), run once on
    zeros: the layout then is whatever `call_with_cache` of that model expects.
    """
    import keras

    from tfopt import _keras_internal  # lazy: as this module's other imports

    cache = _keras_internal.causal_lm_cache(causal_lm, max_length)
    return tuple(int(d) for d in cache.shape), keras.backend.standardize_dtype(cache.dtype)


def _saved_model(causal_lm, directory, max_length, prompt_length, cache_shape, cache_dtype):
    """Writes the two signatures as a SavedModel in `directory` (see the module docstring)."""
    import keras
    import tensorflow as tf

    def prefill(token_ids, length):
        cache = tf.zeros(cache_shape, cache_dtype)
        logits, _, cache = causal_lm.call_with_cache(token_ids, cache, 0)
        last = tf.clip_by_value(length - 1, 0, prompt_length - 1)  # (in range for any input, zeros included)
        return {"logits": tf.gather(logits[0], last)[None, :], "cache": cache}

    def decode(token_id, cache, position):
        position = tf.clip_by_value(position, 0, max_length - 1)
        logits, _, cache = causal_lm.call_with_cache(token_id, cache, position)
        return {"logits": logits[:, 0, :], "cache": cache}

    archive = keras.export.ExportArchive()
    archive.track(causal_lm)
    archive.add_endpoint("prefill", prefill, input_signature=[
        tf.TensorSpec((1, prompt_length), tf.int32, name="token_ids"), tf.TensorSpec((), tf.int32, name="length")])
    archive.add_endpoint("decode", decode, input_signature=[
        tf.TensorSpec((1, 1), tf.int32, name="token_id"), tf.TensorSpec(cache_shape, cache_dtype, name="cache"),
        tf.TensorSpec((), tf.int32, name="position")])
    archive.write_out(directory, verbose=False)


def _convert(causal_lm, max_length, prompt_length, cache_shape, cache_dtype, precision):
    """The float32 (or float16, or converter int8_dynamic) file's bytes."""
    import contextlib
    import io

    import tensorflow as tf

    directory = tempfile.mkdtemp(prefix="tfopt-generator-")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # (the converter prints the SavedModel's signatures)
            _saved_model(causal_lm, directory, max_length, prompt_length, cache_shape, cache_dtype)
            converter = tf.lite.TFLiteConverter.from_saved_model(directory, signature_keys=list(SIGNATURES))
            # As tfopt.litert.convert: built-in ops only, so the default interpreter loads the file.
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
            optimizations = weight_only.converter_optimizations(precision, None)
            if optimizations:
                converter.optimizations = list(optimizations)
            if precision == "float16":
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
                converter.target_spec.supported_types = [tf.float16]
            return converter.convert()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _keras_logits(causal_lm, tokens):
    """The model's logits (positions, vocabulary) on one whole sequence, no cache."""
    token_ids = np.asarray(tokens, "int32")[None, :]
    logits = causal_lm({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids, bool)}, training=False)
    return np.asarray(logits)[0]


def _check(causal_lm, content, prompt_length, max_length, seed=0):
    """(token agreement, max |logit difference|, number of tokens): a short greedy generation in the
    file against the Keras model's arg-max on the same sequence."""
    vocabulary = int(causal_lm.backbone.token_embedding.input_dim) if hasattr(
        causal_lm.backbone.token_embedding, "input_dim") else None
    generator = litert.Generator(content)
    vocabulary = vocabulary or generator.vocabulary_size
    num_prompt = min(_CHECK_PROMPT, prompt_length, max_length - 1)
    prompt = np.random.default_rng(seed).integers(0, vocabulary, num_prompt)
    steps = min(_CHECK_STEPS, max_length - num_prompt)
    tokens, logits = generator.generate(prompt, steps, return_logits=True)
    reference = _keras_logits(causal_lm, tokens[:-1])[num_prompt - 1:]
    agree = float(np.mean(np.argmax(reference, -1) == tokens[num_prompt:]))
    return agree, float(np.max(np.abs(reference - logits))), steps


def _load_error(content, prompt_length, max_length):
    """None if both signatures run in the default interpreter, else the error."""
    try:
        litert.Generator(content).generate(np.zeros(1, "int32"), min(2, max_length - 1))
    except (RuntimeError, ValueError) as e:
        return e
    return None


def export_generator(causal_lm, path, max_length=256, prompt_length=None, precision="float32", check=True):
    """Writes a keras-hub causal LM as one LiteRT file with "prefill" and "decode" signatures.

    The file generates on device with an explicit key-value cache (see
    `tfopt/_export/generation.py` for the design): `prefill` takes a prompt
    padded to `prompt_length` and its length and returns the last real
    position's logits and the cache; `decode` takes one token, the cache and
    its position and returns the logits and the updated cache. Run it with
    `tfopt.litert.Generator(path).generate(prompt_ids, max_new_tokens)`
    (greedy). In float32 its greedy tokens are Keras's (`lm.generate` with a
    greedy sampler), token for token.

    The file is written atomically, and only after both signatures ran in the
    default `ai_edge_litert` interpreter (XNNPACK): if conversion,
    quantization or that check fails, an existing file at `path` is left as it
    was. Arguments are checked before the (slow) conversion.

    Args:
        causal_lm: a keras-hub `CausalLM` with `call_with_cache` (GPT2CausalLM,
            LlamaCausalLM, MistralCausalLM, GemmaCausalLM, ...), computing in
            float32. Its preprocessor is not exported: the file takes token ids.
        path: the `.tflite` file to write.
        max_length: the longest sequence, prompt plus generated tokens (the
            cache length), from 2 to the backbone's `max_sequence_length`.
        prompt_length: the longest prompt (`prefill` runs on this many
            positions whatever the prompt's length), 1 to `max_length`; None:
            `max_length`. A shorter one makes prefill faster.
        precision: "float32", "float16", or a weight-quantized precision of
            `tfopt.export` ("int8_weight_only", "int8_dynamic",
            "int4_weight_only", "int4_dynamic", "int4_block32/64/128"; all but
            "int8_dynamic" need `pip install 'tfopt[litert-quantizer]'`).
        check: run a short greedy generation (8 tokens after a 4-token seeded
            prompt) in the file and compare it with the Keras model's logits.
            The prompt is random token ids: a trained model may answer it with
            near-ties (logits within 0.1), so a weight-quantized file can show
            low `token_agreement` there while agreeing on real prompts (see
            benchmarks/generation.py); float32 agrees exactly.

    Returns:
        A `GeneratorReport` (file size, signatures, token agreement).

    Example:
    >>> import os, tempfile, keras_hub, tfopt
    >>> backbone = keras_hub.models.GPT2Backbone(vocabulary_size=32, num_layers=1, num_heads=2, hidden_dim=16,
    ...                                          intermediate_dim=32, max_sequence_length=16)
    >>> lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    >>> report = tfopt.export_generator(lm, os.path.join(tempfile.mkdtemp(), "lm.tflite"), max_length=16)
    >>> sorted(report.signatures), report.token_agreement
    (['decode', 'prefill'], 1.0)
    >>> tokens = tfopt.litert.Generator(report.path).generate([1, 2, 3], max_new_tokens=5)
    >>> len(tokens)
    8
    """
    if not _backend.is_tensorflow():
        backend = keras.backend.backend()
        raise NotImplementedError(
            f"tfopt.export_generator: under KERAS_BACKEND={backend}, the LiteRT converter cannot "
            f"take the prefill and decode functions of model '{getattr(causal_lm, 'name', causal_lm)}' (it converts "
            "TensorFlow graphs only), and export_generator has no TensorFlow child process as tfopt.export has. "
            f"Received: KERAS_BACKEND={backend}. Fix: save it (causal_lm.save('lm.keras')) and run export_generator "
            "on keras.saving.load_model('lm.keras') in a process with KERAS_BACKEND=tensorflow.")
    max_length, prompt_length = _plan(causal_lm, path, max_length, prompt_length, precision)
    cache_shape, cache_dtype = cache_spec(causal_lm, max_length)
    content = _convert(causal_lm, max_length, prompt_length, cache_shape, cache_dtype, precision)
    float_size = None
    if weight_only.is_weight_precision(precision):
        content, float_size = weight_only.quantize(content, precision, path)
    error = _load_error(content, prompt_length, max_length)
    if error is not None:
        raise ValueError(
            f"tfopt.export_generator: the {precision} file does not run in the default LiteRT interpreter "
            f"({' '.join(str(error).split())[:300]}), so nothing was written to {str(path)!r}. Fix: try "
            "precision='float32', or report the model to tfopt.")
    signatures = litert.Generator(content).signatures
    missing = [name for name in SIGNATURES if name not in signatures]
    if missing:
        raise ValueError(
            f"tfopt.export_generator: the {precision} file lost its signature(s) {missing} (it has "
            f"{sorted(signatures)}), so nothing was written to {str(path)!r}. Fix: precision='float32'.")
    agreement = difference = None
    num_tokens = 0
    if check:
        agreement, difference, num_tokens = _check(causal_lm, content, prompt_length, max_length)
    report = GeneratorReport(
        path=os.fspath(path), size_bytes=len(content), gzip_bytes=len(gzip.compress(content, compresslevel=9)),
        precision=precision, max_length=max_length, prompt_length=prompt_length, cache_shape=cache_shape,
        signatures=signatures, float_size_bytes=float_size, token_agreement=agreement, max_abs_diff=difference,
        num_check_tokens=num_tokens)
    atomic_write_bytes(path, content)
    return report


__all__ = ["export_generator", "GeneratorReport", "PRECISIONS"]
