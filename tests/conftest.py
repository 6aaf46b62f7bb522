"""Shared test setup: quiet TensorFlow, and 4 logical CPUs for MirroredStrategy.

The CPU must be split before TensorFlow runs its first op, so it happens here,
at collection time, before any test module builds a model.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 4
)

# A script run by the multi-worker tests in child processes, not a test module.
collect_ignore = ["multi_worker_job.py"]
