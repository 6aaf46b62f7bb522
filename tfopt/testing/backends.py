"""`run_script`: runs a script under another Keras backend, in a child process.

A process has one Keras backend for its life, so a test running under TensorFlow checks
JAX (or the reverse) through a child: the script prints one JSON line after "RESULT ",
and `run_script` returns it. `PRELUDE` runs first: `set_weights` (numpy weights, since
each backend's initializers draw other numbers), `data` and `report` (a model's
sparsity and masks as JSON). Runs are cached, so a script's JAX run serves both the
test of JAX and the test that compares JAX with TensorFlow.

Example:
>>> from tfopt.testing.backends import run_script
>>> run_script('print("RESULT " + json.dumps(keras.backend.backend()))', "jax")  # doctest: +SKIP
'jax'
"""

import functools
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

HAS_JAX = importlib.util.find_spec("jax") is not None

PRELUDE = """
import json, warnings
import numpy as np, keras, tfopt

def set_weights(model):
    rng = np.random.default_rng(0)
    model.set_weights([(0.1 * rng.standard_normal(w.shape)).astype(w.dtype) if w.ndim > 1 or "bias" in w.path
                       else np.asarray(w) for w in model.weights])

def data():
    rng = np.random.default_rng(1)
    return rng.standard_normal((16, 8, 8, 1)).astype("float32"), rng.standard_normal((16, 4)).astype("float32")

def report(model, masks, **extra):
    out = {"backend": keras.backend.backend(), **extra}
    for layer in model.layers:
        if getattr(layer, "kernel", None) is not None:
            kernel = keras.ops.convert_to_numpy(layer.kernel)
            assert np.all(np.isfinite(kernel)), layer.name
            out[layer.name] = {"sparsity": float((kernel == 0).mean()), "size": int(kernel.size),
                               "mask": (kernel != 0).astype(int).ravel().tolist() if masks else None}
    print("RESULT " + json.dumps(out))
"""


@functools.lru_cache(maxsize=None)
def run_script(script, backend, timeout=120, env=()):
    """Runs `script` (dedented, after `PRELUDE`) with `KERAS_BACKEND=backend` and the extra
    environment `env` (pairs); returns its RESULT, or the `subprocess.CompletedProcess`
    when it printed none (its `stderr` says why)."""
    environ = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu",
               **dict(env)}
    code = PRELUDE + textwrap.dedent(script)
    done = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True,
                          timeout=timeout)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return done


def jit(fn):
    """`fn` compiled by XLA the way the current Keras backend compiles a train step
    (`tf.function(jit_compile=True)`, `jax.jit`); as it is under other backends."""
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # lazy: the TensorFlow backend only

        return tf.function(fn, jit_compile=True)
    if keras.backend.backend() == "jax":
        import jax  # lazy: the JAX backend only

        return jax.jit(fn)
    return fn


def layer_callbacks(model):
    """The callbacks that `model.fit` needs for `model`'s tfopt layers with their own
    `pruning_schedule` under the current backend: none under TensorFlow; under JAX a bare
    `tfopt.callbacks.Pruning()`, which carries the layers' masks and steps through the
    stateless train step (the layers say so when it is missing)."""
    import keras

    import tfopt  # lazy: tfopt.testing is imported by tfopt

    own = any(getattr(layer, "pruning_schedule", None) is not None for layer in model.layers)
    return [tfopt.callbacks.Pruning()] if own and keras.backend.backend() != "tensorflow" else []


def synced(model, variable):
    """`variable`'s value now, as numpy, from a callback during `model.fit`: JAX's
    trainer holds the training state apart from the variables until it is synced."""
    import keras

    if hasattr(model, "jax_state_sync"):
        model.jax_state_sync()
    return keras.ops.convert_to_numpy(variable)
