"""Shared test setup: quiet TensorFlow, and 4 logical CPUs for MirroredStrategy.

The CPU must be split before TensorFlow runs its first op, so it happens here,
at collection time, before any test module builds a model.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

if os.environ["KERAS_BACKEND"] == "tensorflow":
    import tensorflow as tf  # noqa: E402

    _cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 4
    )

# A script run by the multi-worker tests in child processes, not a test module.
collect_ignore = ["multi_worker_job.py"]


def pytest_collection_finish(session):
    """Moves everything alive after collection (TensorFlow, Keras, keras-hub, the test
    modules) out of the garbage collector's sight (`gc.freeze`): the harness's `setUp`
    calls `keras.utils.clear_session()`, which runs a full `gc.collect()`, and that
    traversed all of it before every test (0.2 s each here; the automatic collections
    during tracing too). Only these long-lived objects are frozen; what tests create
    is collected as before."""
    import gc

    gc.collect()
    gc.freeze()


def pytest_collection_modifyitems(config, items):
    """Under another backend (`KERAS_BACKEND=jax pytest`, run by
    tests/backends/test_backend_neutral.py) only the tests marked `backend_neutral` (and not
    `tensorflow_only`) run: the others use TensorFlow itself (tf.data, tf.distribute, the LiteRT converter)."""
    if os.environ["KERAS_BACKEND"] == "tensorflow":
        return
    kept = [item for item in items
            if item.get_closest_marker("backend_neutral") and not item.get_closest_marker("tensorflow_only")]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept
