"""`tfopt.export` under another Keras backend than TensorFlow: the TensorFlow child process.

The LiteRT converter takes TensorFlow graphs only. A JAX model reaches it through jax2tf,
where fake quantization is plain arithmetic (ROUND, FLOOR, DIV, ...), so an int8 file
stays float. A process keeps one Keras backend for life, so `export` saves the model as a
`.keras` file in a private temporary directory and runs TensorFlow's export of it in a
child process (`run` here, `serve` there). The arguments go as a pickle (arrays as NumPy),
and what comes back is the report's fields, the file's bytes, and the outputs the parent
needs to check the rebuild (`check_rebuild`) and to measure parity against its own model.
An exception of the child reaches the caller as itself (same type and message); the
child's tfopt warnings are warned again here; its other output (TensorFlow's logs) is
dropped unless the child dies, when its last lines are in the error.
"""

import contextlib
import importlib
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
import warnings
import zipfile

import keras
import numpy as np

from tfopt import _keras_internal

# The TensorFlow rebuild of a model computes what the model computes under its own backend up to
# float rounding: outputs at most this fraction of their largest magnitude apart (plus 1e-5).
FLOAT_TOLERANCE = 1e-3
# With fake quantization on, a value that float rounding puts on the other side of a rounding
# boundary moves by one quantization step (1/255 of its range), and so do the outputs it feeds.
QUANTIZED_TOLERANCE = 0.05
_TFOPT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_NOTE = ("(Raised in the TensorFlow child process that tfopt.export runs under KERAS_BACKEND={backend}: "
         "the model rebuilt there from a .keras file.)")


def _numpy(value):
    """`value` with its arrays (JAX, torch, ...) as NumPy arrays, in the same containers."""
    if isinstance(value, dict):
        return {k: _numpy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_numpy(v) for v in value)
    if not isinstance(value, np.ndarray) and hasattr(value, "__array__"):
        return np.asarray(keras.ops.convert_to_numpy(value))
    return value


def _modules(model):
    """The modules of the model's layer classes, for the child to import (their registered
    classes load then): not Keras's, not `__main__`'s (a script cannot be imported again)."""
    names = {type(model).__module__} | {type(layer).__module__ for layer in _keras_internal.all_layers(model)}
    return sorted(n for n in names if n != "__main__" and n.split(".")[0] not in ("keras", "builtins"))


def _save(model, directory):
    backend = keras.backend.backend()
    path = os.path.join(directory, "model.keras")
    try:
        model.save(path)
    except Exception as error:
        raise ValueError(
            f"tfopt.export: under KERAS_BACKEND={backend}, export rebuilds model '{model.name}' under TensorFlow "
            f"from a .keras file, and saving it failed: {type(error).__name__}: {error}. Fix: make the model "
            "savable (model.save('m.keras') shows the same error; custom layers need get_config), or export "
            "under KERAS_BACKEND=tensorflow.") from error
    with zipfile.ZipFile(path) as archive:
        return b"keras_hub" in archive.read("config.json")


def run(model, path, arguments, entry):
    """Exports `model` to `path` with `arguments` (`tfopt.export`'s) in a TensorFlow child
    process that calls `entry` (module, function name) there on the rebuilt model; returns
    what that function returned, and writes nothing at `path`. Raises the child's exception."""
    backend = keras.backend.backend()
    directory = tempfile.mkdtemp(prefix="tfopt-export-")
    try:
        keras_hub = _save(model, directory)
        job = {"arguments": {k: _numpy(v) for k, v in arguments.items()}, "path": path, "entry": entry,
               "modules": _modules(model), "keras_hub": keras_hub, "backend": backend}
        with open(os.path.join(directory, "job.pkl"), "wb") as f:
            try:
                pickle.dump(job, f)
            except Exception as error:
                names = [k for k, v in job["arguments"].items() if not _picklable(v)]
                raise TypeError(
                    f"tfopt.export: under KERAS_BACKEND={backend}, export passes its arguments to a TensorFlow "
                    f"child process, and {names or ['path']} cannot be pickled ({error}). Fix: pass NumPy arrays "
                    "(np.asarray(x)).") from error
        done = _spawn(directory)
        result_path = os.path.join(directory, "result.pkl")
        if not os.path.exists(result_path):
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise RuntimeError(
                f"tfopt.export: under KERAS_BACKEND={backend}, export rebuilds model '{model.name}' under "
                f"TensorFlow in a child process, and it ended with exit status {done.returncode} before "
                f"reporting (nothing was written to {str(path)!r}). Its last output:\n{tail}\nFix: export "
                "under KERAS_BACKEND=tensorflow (save the model as .keras, load it there), or report it to tfopt.")
        with open(result_path, "rb") as f:
            result = pickle.load(f)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    for category, message in result["warnings"]:
        warnings.warn(message, _category(category), stacklevel=4)
    if "error" in result:
        raise _error(result["error"], backend)
    return result["value"]


def _picklable(value):
    try:
        pickle.dumps(value)
        return True
    except Exception:  # noqa: BLE001 - any failure means: not picklable
        return False


def _spawn(directory):
    environ = dict(os.environ)
    environ.update(KERAS_BACKEND="tensorflow", CUDA_VISIBLE_DEVICES="-1",  # (the parent may hold the GPU)
                   PYTHONPATH=os.pathsep.join(os.path.abspath(p) if p else os.getcwd() for p in sys.path))
    environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    code = "import sys\nfrom tfopt._export import child\nchild.serve(sys.argv[1])\n"
    return subprocess.run([sys.executable, "-c", code, directory], env=environ, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, errors="replace")


def _named_class(name, base):
    """The class `name` ("module.Qualified") if it imports and subclasses `base`, else None."""
    module, _, qualname = name.rpartition(".")
    with contextlib.suppress(Exception):
        found = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
        if isinstance(found, type) and issubclass(found, base):
            return found
    return None


def _category(name):
    return _named_class(name, Warning) or UserWarning


def _error(record, backend):
    """The child's exception, unpickled (same type, same message), with a note saying where it was raised."""
    error = None
    if record.get("pickled") is not None:
        with contextlib.suppress(Exception):
            error = pickle.loads(record["pickled"])
    if not isinstance(error, BaseException):
        kind = _category_of_error(record["type"])
        error = kind(record["message"]) if kind is not None else RuntimeError(f"{record['type']}: {record['message']}")
    error.add_note(_NOTE.format(backend=backend))
    return error


def _category_of_error(name):
    """The exception class `name` if it is made from a message alone, else None."""
    found = _named_class(name, BaseException)
    with contextlib.suppress(Exception):
        if found is not None and str(found("probe")) == "probe":
            return found
    return None


def serve(directory):
    """The child process: loads the job `run` wrote in `directory`, rebuilds the model, calls the
    entry function on it, and writes its value (or its exception) and the tfopt warnings it raised."""
    with open(os.path.join(directory, "job.pkl"), "rb") as f:
        job = pickle.load(f)
    result = {"warnings": []}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = _load(directory, job)
            module, name = job["entry"]
            function = getattr(importlib.import_module(module), name)
            result["value"] = function(model, job["path"], job["arguments"])
        except Exception as error:  # noqa: BLE001 - every error goes back to the parent, as itself
            result["error"] = _error_record(error)
    # tfopt's own warnings only (TensorFlow's and Keras's are the child's noise).
    result["warnings"] = [(f"{w.category.__module__}.{w.category.__qualname__}", str(w.message)) for w in caught
                          if os.path.abspath(w.filename).startswith(_TFOPT_DIR + os.sep)
                          and not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    with open(os.path.join(directory, "result.pkl"), "wb") as f:
        pickle.dump(result, f)


def _error_record(error):
    record = {"type": f"{type(error).__module__}.{type(error).__qualname__}", "message": str(error),
              "traceback": "".join(traceback.format_exception(error))}
    try:
        record["pickled"] = pickle.dumps(error)
        pickle.loads(record["pickled"])
    except Exception:  # noqa: BLE001 - then type and message go back as text
        record["pickled"] = None
    return record


def _load(directory, job):
    """The model from the `.keras` file, under TensorFlow (tfopt's classes are registered by `import
    tfopt`; keras-hub's quantization-aware twins by `keras_hub_quantization.register()`)."""
    for module in job["modules"]:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    if job["keras_hub"]:
        from tfopt.adapters import keras_hub_quantization  # lazy: keras-hub is optional, and only its models need it

        keras_hub_quantization.register()
    try:
        return keras.saving.load_model(os.path.join(directory, "model.keras"), compile=False, safe_mode=False)
    except Exception as error:
        raise RuntimeError(
            f"tfopt.export: under KERAS_BACKEND={job['backend']}, export rebuilds the model under TensorFlow "
            f"from a .keras file (written by this export, so loaded with safe_mode=False), and loading it failed: "
            f"{_load_failure(error)}. A custom layer defined in the "
            "script itself (__main__) cannot be loaded there. Fix: define custom layers in an importable module "
            "with @keras.saving.register_keras_serializable, or export under KERAS_BACKEND=tensorflow.") from error


def _load_failure(error):
    """What failed to load: Keras's "Could not locate class ..." (of the innermost error that says it)
    when one does, else the start of the error's message."""
    seen = error
    while seen is not None:
        found = re.search(r"Could not locate class '[^']+'", str(seen))
        if found:
            return found.group(0)
        seen = seen.__cause__ or seen.__context__
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


def check_rebuild(model, rebuilt, own, quantized, counterpart=False):
    """Raises a RuntimeError when the TensorFlow rebuild's outputs `rebuilt` are not `model`'s own
    outputs `own` (on the same inputs) up to float rounding (`FLOAT_TOLERANCE`), or, with fake
    quantization on (`quantized`), up to a few quantization steps (`QUANTIZED_TOLERANCE`);
    `counterpart`: the outputs are those of its float counterpart (`tfopt.strip`)."""
    tolerance = QUANTIZED_TOLERANCE if quantized else FLOAT_TOLERANCE
    difference = rebuild_difference(rebuilt, own, tolerance)
    if difference is None:
        return
    what = " with its fake quantization on" if quantized else " (its float counterpart)" if counterpart else ""
    raise RuntimeError(
        f"tfopt.export: model '{model.name}', rebuilt under TensorFlow from a .keras file to export it, computes "
        f"something else than under KERAS_BACKEND={keras.backend.backend()}{what} on the check inputs "
        f"({difference}; allowed: {tolerance:g} of the outputs' magnitude), so nothing was written. A layer "
        "computes differently per backend (a custom layer with backend-specific code, or state its .keras file "
        "does not hold). Fix: export under KERAS_BACKEND=tensorflow, or report the model to tfopt.")


def rebuild_difference(rebuilt, own, tolerance):
    """None when the outputs `rebuilt` are `own` within `tolerance` of their largest finite
    magnitude (plus 1e-5), else a description of the difference.

    Example:
    >>> import numpy as np
    >>> rebuild_difference([np.ones(3)], [np.ones(3) + 1e-6], 1e-3) is None
    True
    >>> rebuild_difference([np.ones(3)], [np.zeros(3)], 1e-3)
    'max |TensorFlow - own backend| 1 against outputs up to 0'
    """
    if len(rebuilt) != len(own):
        return f"{len(rebuilt)} outputs against {len(own)}"
    scale, diff = 0.0, 0.0
    for r, o in zip(rebuilt, own):
        r, o = np.asarray(r, "float64"), np.asarray(o, "float64")
        if r.shape != o.shape:
            return f"output shapes {r.shape} against {o.shape}"
        if not np.array_equal(np.isfinite(r), np.isfinite(o)):
            return "NaN/Inf outputs in one and not in the other"
        both = np.isfinite(o)
        scale = max(scale, float(np.max(np.abs(o), initial=0.0, where=both)))
        diff = max(diff, float(np.max(np.abs(r - o), initial=0.0, where=both)))
    if diff <= tolerance * scale + 1e-5:
        return None
    return f"max |TensorFlow - own backend| {diff:.3g} against outputs up to {scale:.3g}"
