"""Distribution strategies: the same tfopt training on one device, several GPUs,
several machines and Colab TPUs.

`auto()` picks the strategy for the machine it runs on. `Mirrored`, `TPU` and
`MultiWorker` are the `tf.distribute` strategies themselves (subclasses: use
them wherever a `tf.distribute.Strategy` goes) with the helpers a training
script needs every time: `global_batch_size`, `recommended_steps_per_execution`,
`prepare_dataset`, `is_chief` and `chief_path`. The same helpers are module
functions taking any strategy, so code written against `auto()` works when it
returns the default strategy too.

Under `KERAS_BACKEND=jax`, distribution is Keras's own (`keras.distribution`),
not `tf.distribute`: `auto()` (or `auto_distribution()`) returns a
`keras.distribution.DataParallel` over every device JAX sees (TPU cores
included), to pass to `keras.distribution.set_distribution(...)` before the
model is built. The helpers take it too. `Mirrored`, `TPU` and `MultiWorker`
refuse to be made under JAX (they would train on one device). Nothing in
tfopt changes under it: masks, ranges and folded statistics are computed on
the global batch, and XLA inserts the collectives.

Everything tfopt keeps during training (pruning masks and steps, activation
ranges, folded BatchNorm statistics) is equal on every replica: the
statistics are reduced over replicas in the train step, in one collective
per step (`tfopt._backend.batched_statistics`).

Known upstream limits, checked up front by `check(model)` (tfopt's callbacks
call it at the start of `fit`):

- On several logical CPU devices, `MirroredStrategy` fails with
  `jit_compile=True` (XLA: a variable on another device) and with
  `steps_per_execution > 1` ("You must feed a value for placeholder tensor",
  keras-team/keras#19246), for any Keras model. GPUs and TPUs are not
  affected as far as we know; we could not measure them here.
- Keras 3 `fit` under `MultiWorkerMirroredStrategy` fails as shipped
  (tensorflow/tensorflow#72388): `MultiWorker` applies a narrow fix to Keras's
  TensorFlow trainer when it is created (see `_multi_worker_fix`).
"""

import json
import logging
import os
import socket
import tempfile
import time

import keras

from tfopt import _keras_internal

__all__ = [
    "auto",
    "auto_distribution",
    "Mirrored",
    "TPU",
    "MultiWorker",
    "global_batch_size",
    "recommended_steps_per_execution",
    "prepare_dataset",
    "is_chief",
    "chief_path",
    "check",
]

log = logging.getLogger("tfopt")


class _TensorFlow:
    """`tensorflow`, imported when first used: under another Keras backend,
    `import tfopt` (whose callbacks import this module) loads no TensorFlow."""

    def __getattr__(self, name):
        import tensorflow  # lazy: only what uses tf.distribute needs it

        return getattr(tensorflow, name)


tf = _TensorFlow()


# --- helpers for any strategy ----------------------------------------------------------
def _is_distribution(strategy):
    """True for a `keras.distribution` (JAX's counterpart of a strategy; Keras exports no base class)."""
    return isinstance(strategy, (keras.distribution.DataParallel, keras.distribution.ModelParallel))


def _replicas(strategy):
    if _is_distribution(strategy):
        return strategy.num_model_replicas  # the mesh's size along the batch axis
    return strategy.num_replicas_in_sync


def _process_index():
    import jax  # lazy: only a keras.distribution (JAX backend) asks

    return jax.process_index()


def global_batch_size(strategy, per_replica_batch_size):
    """The batch size to give `fit` so that each replica gets `per_replica_batch_size`.

    Example:
    >>> import tensorflow as tf
    >>> global_batch_size(tf.distribute.get_strategy(), 32)
    32
    """
    if isinstance(per_replica_batch_size, bool) or not isinstance(per_replica_batch_size, int) \
            or per_replica_batch_size < 1:
        raise ValueError(
            f"`per_replica_batch_size` must be an int >= 1. Received: {per_replica_batch_size!r}"
        )
    return per_replica_batch_size * _replicas(strategy)


def _is_tpu(strategy):
    if _is_distribution(strategy):
        return "tpu" in str(strategy.device_mesh.devices.flat[0]).lower()  # devices are "tpu:0"-like names
    return isinstance(strategy, (tf.distribute.TPUStrategy, tf.distribute.experimental.TPUStrategy))


def _is_multi_worker(strategy):
    if _is_distribution(strategy):
        return False  # Keras's `fit` gives each JAX process its share of the batches itself
    return _keras_internal.is_multi_worker(strategy)


def _cpu_mirrored(strategy):
    """True for a MirroredStrategy over several devices that are all CPUs."""
    if keras.backend.backend() != "tensorflow" or not isinstance(strategy, tf.distribute.MirroredStrategy):
        return False
    devices = list(strategy.extended.worker_devices)
    return len(devices) > 1 and all("CPU" in d.upper() for d in devices)


def recommended_steps_per_execution(strategy):
    """The `steps_per_execution` to compile with under `strategy`.

    Takes a `keras.distribution.DataParallel` or `ModelParallel` (JAX) too.

    32 on TPUs (each execution is a host round trip; Keras and Google's TPU
    guides use 32 or more), 1 on several CPU devices (more fails upstream,
    see the module docstring), 1 elsewhere (on GPUs and one device, >1 helps
    only models whose steps take well under a millisecond; measure first).

    Example:
    >>> import tensorflow as tf
    >>> recommended_steps_per_execution(tf.distribute.get_strategy())
    1
    """
    if not _is_distribution(strategy) and not isinstance(strategy, tf.distribute.Strategy):
        raise TypeError(
            "recommended_steps_per_execution takes a `tf.distribute.Strategy` (from "
            "`tfopt.strategies.auto()`, or `tf.distribute.get_strategy()` for one device) or, under "
            "JAX, a `keras.distribution.DataParallel` (`tfopt.strategies.auto_distribution()`). "
            f"Received: {strategy!r} of type {type(strategy).__name__}"
        )
    return 32 if _is_tpu(strategy) else 1


def prepare_dataset(strategy, dataset, per_replica_batch_size=None, shuffle_buffer=None, seed=None):
    """Readies a `tf.data.Dataset` for `fit` under `strategy`.

    Batches it to the global batch size (if `per_replica_batch_size` is
    given; on TPUs with `drop_remainder=True`, as XLA needs static shapes),
    shuffles first if asked, shards by data across workers under
    `MultiWorker` (each worker reads every element and keeps its share, the
    policy that works with in-memory datasets), and prefetches. Keras then
    distributes the batches over replicas itself.

    Example:
    >>> import numpy as np, tensorflow as tf
    >>> data = tf.data.Dataset.from_tensor_slices(np.arange(10))
    >>> [b.shape[0] for b in prepare_dataset(tf.distribute.get_strategy(), data, 4)]
    [4, 4, 2]
    """
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(
            f"`prepare_dataset` takes a tf.data.Dataset. Received: {type(dataset).__name__}. Make one with "
            "`tf.data.Dataset.from_tensor_slices((x, y))`."
        )
    if shuffle_buffer:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed)
    if per_replica_batch_size is not None:
        dataset = dataset.batch(global_batch_size(strategy, per_replica_batch_size), drop_remainder=_is_tpu(strategy))
    if _is_multi_worker(strategy):
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        dataset = dataset.with_options(options)
    return dataset.prefetch(tf.data.AUTOTUNE)


def is_chief(strategy):
    """True on the one worker that should write checkpoints, exports and logs
    (always True outside multi-worker training; for a `keras.distribution`,
    JAX's process 0)."""
    if _is_distribution(strategy):
        return _process_index() == 0
    if not _is_multi_worker(strategy):
        return True
    resolver = strategy.cluster_resolver
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == "chief":
        return True
    has_chief = "chief" in (resolver.cluster_spec().as_dict() or {})
    return not has_chief and task_type == "worker" and task_id == 0


def chief_path(strategy, path):
    """`path` on the chief; on other workers a fresh temporary directory's
    counterpart, so that every worker can run the same save/export code
    (collective ops need all of them) while only the chief's files count.

    Example:
    >>> import tensorflow as tf
    >>> chief_path(tf.distribute.get_strategy(), "model.keras")
    'model.keras'
    """
    if is_chief(strategy):
        return path
    if _is_distribution(strategy):
        task = f"process-{_process_index()}"
    else:
        task = f"{strategy.cluster_resolver.task_type}-{strategy.cluster_resolver.task_id}"
    directory = tempfile.mkdtemp(prefix=f"tfopt-{task}-")
    return os.path.join(directory, os.path.basename(os.path.normpath(str(path))))


def check(model):
    """Raises a clear error, before any tracing, for a compile setting that is
    known to fail under the model's strategy (see the module docstring)."""
    strategy = getattr(model, "distribute_strategy", None)
    if strategy is None or not _cpu_mirrored(strategy):
        return
    steps = int(getattr(model, "steps_per_execution", 1) or 1)
    jit = getattr(model, "jit_compile", False) is True
    if steps > 1 or jit:
        what = "jit_compile=True" if jit else f"steps_per_execution={steps}"
        raise ValueError(
            f"Model '{model.name}' is compiled with {what} under a MirroredStrategy over several CPU "
            f"devices ({len(strategy.extended.worker_devices)}), which fails inside TensorFlow "
            "(XLA cannot place the replicas' variables; `steps_per_execution > 1` loses a placeholder, "
            "keras-team/keras#19246) for any Keras model. Compile with jit_compile=False and "
            "steps_per_execution=1 on CPUs (`tfopt.strategies.recommended_steps_per_execution(strategy)`); "
            "GPUs and TPUs are not affected."
        )


class _Helpers:
    """The module's helpers as methods of a strategy."""

    def global_batch_size(self, per_replica_batch_size):
        return global_batch_size(self, per_replica_batch_size)

    def recommended_steps_per_execution(self):
        return recommended_steps_per_execution(self)

    def prepare_dataset(self, dataset, per_replica_batch_size=None, shuffle_buffer=None, seed=None):
        return prepare_dataset(self, dataset, per_replica_batch_size, shuffle_buffer, seed)

    @property
    def is_chief(self):
        return is_chief(self)

    def chief_path(self, path):
        return chief_path(self, path)


# --- the strategies ---------------------------------------------------------------------
_TPU_SYSTEMS = {}


def _require_tensorflow(name):
    """Raises, under any backend but TensorFlow, for the tf.distribute strategy `name`."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return
    raise ValueError(
        f"tfopt.strategies.{name}() is a tf.distribute strategy: it distributes Keras's TensorFlow backend "
        f"only, and this process runs Keras on the {backend!r} backend (KERAS_BACKEND={backend}), where its scope "
        "would leave training on one device. Fix: under JAX, distribute with Keras's own API, "
        "`keras.distribution.set_distribution(tfopt.strategies.auto_distribution())` before building the "
        "model (`tfopt.strategies.auto()` returns the same under JAX); or run with KERAS_BACKEND=tensorflow. "
        f"Received: tfopt.strategies.{name}() under backend {backend!r}"
    )


def _tpu_resolver(tpu=None):
    """A connected, initialized TPU cluster resolver (each TPU system is
    initialized once per process: initializing again wipes its memory)."""
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    except Exception as e:  # URLError, ValueError, NotFoundError: the name does not resolve
        announced = [k for k in ("TPU_NAME", "COLAB_TPU_ADDR") if os.environ.get(k)]
        if tpu:
            received = f"tpu={tpu!r}"
            fix = ("check the name or address passed as `tpu`; to train on the CPU/GPU instead, use "
                   "`tfopt.strategies.auto()` rather than `TPU()`")
        elif announced:
            received = " and ".join(f"{k}={os.environ[k]!r}" for k in announced)
            fix = f"to train on the CPU/GPU instead, unset {' and '.join(announced)}; otherwise check its value"
        else:
            received = "tpu=None on a TPU VM (/dev/accel0 exists)"
            fix = "pass the TPU's name or address as `TPU(tpu=...)`"
        raise RuntimeError(
            f"tfopt.strategies: the TPU named by {received} could not be resolved "
            f"({type(e).__name__}: {e}). Received: {received}. Fix: {fix} "
            "(in Colab, pick Runtime > Change runtime type > TPU)."
        ) from e
    key = resolver.master() or str(tpu)
    if key not in _TPU_SYSTEMS:
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        _TPU_SYSTEMS[key] = resolver
    return _TPU_SYSTEMS[key]


def _multi_worker_fix():
    """Makes Keras 3's `fit` work under MultiWorkerMirroredStrategy (see
    `tfopt._keras_internal.patch_multi_worker_trainer`)."""
    _keras_internal.patch_multi_worker_trainer()


def _define_strategies():
    """Defines `Mirrored`, `TPU` and `MultiWorker`, subclasses of `tf.distribute`'s
    strategies (so TensorFlow is imported): at import under the TensorFlow
    backend, else when one is first asked for (`__getattr__`)."""
    if "Mirrored" in globals():
        return

    class Mirrored(_Helpers, tf.distribute.MirroredStrategy):
        """`tf.distribute.MirroredStrategy` (synchronous replicas on one machine)
        with tfopt's helpers.

        Args:
            devices: device names; None for all GPUs (or the CPU if there is none).
            cross_device_ops: as in `tf.distribute.MirroredStrategy`.

        Example:
        >>> strategy = Mirrored(["/cpu:0"])
        >>> strategy.num_replicas_in_sync, strategy.global_batch_size(16)
        (1, 16)
        """

        def __init__(self, devices=None, cross_device_ops=None):
            _require_tensorflow("Mirrored")
            super().__init__(devices=devices, cross_device_ops=cross_device_ops)

    class TPU(_Helpers, tf.distribute.TPUStrategy):
        """`tf.distribute.TPUStrategy` that resolves, connects to and initializes the TPU itself.

        Args:
            tpu: the TPU's name or address; None finds Colab's (or a TPU VM's
                with "local").
        """

        def __init__(self, tpu=None):
            _require_tensorflow("TPU")
            super().__init__(_tpu_resolver(tpu))

    class MultiWorker(_Helpers, tf.distribute.MultiWorkerMirroredStrategy):
        """`tf.distribute.MultiWorkerMirroredStrategy` (synchronous training over
        several machines, configured by `TF_CONFIG`) with Keras 3's `fit` made to
        work under it (see `_multi_worker_fix`) and tfopt's helpers.

        Write checkpoints and exports to `strategy.chief_path(path)`: every worker
        runs the same code, only the chief's files land at `path`.

        Args:
            cluster_resolver, communication_options: as in
                `tf.distribute.MultiWorkerMirroredStrategy`.
        """

        def __init__(self, cluster_resolver=None, communication_options=None):
            _require_tensorflow("MultiWorker")
            if cluster_resolver is None:
                tf_config()  # a clear error for a malformed TF_CONFIG, before TF reads it
            _multi_worker_fix()
            super().__init__(cluster_resolver=cluster_resolver, communication_options=communication_options)

    for cls in (Mirrored, TPU, MultiWorker):
        cls.__qualname__ = cls.__name__  # as if defined at module level (pickling, repr)
        globals()[cls.__name__] = cls


def __getattr__(name):
    if name in ("Mirrored", "TPU", "MultiWorker"):
        _define_strategies()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if keras.backend.backend() == "tensorflow":
    _define_strategies()  # Keras has imported TensorFlow already: the classes exist at import, as always


# --- auto -------------------------------------------------------------------------------
_TF_CONFIG_EXAMPLE = ('{"cluster": {"worker": ["10.0.0.1:12345", "10.0.0.2:12345"]}, '
                      '"task": {"type": "worker", "index": 0}}')


def tf_config():
    """The parsed, checked `TF_CONFIG` environment variable, or None if unset.

    Raises a ValueError quoting the bad part (and showing a well-formed
    example) instead of the AttributeError/KeyError TensorFlow gives later.
    """
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None

    def bad(what):
        return ValueError(f"TF_CONFIG {what}. Received: TF_CONFIG={raw!r}. Expected, for example: "
                          f"TF_CONFIG='{_TF_CONFIG_EXAMPLE}' (the same cluster on every worker, its own task).")

    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise bad(f"is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise bad("must be a JSON object")
    cluster = config.get("cluster")
    if not isinstance(cluster, dict) or not cluster:
        raise bad('has no "cluster" (a mapping from task type to a list of "host:port" addresses)')
    for kind, addresses in cluster.items():
        if not isinstance(addresses, list) or not all(isinstance(a, str) and ":" in a for a in addresses):
            raise bad(f'lists cluster["{kind}"] = {addresses!r}; each task type needs a list of "host:port" strings')
    task = config.get("task")
    if not isinstance(task, dict) or "type" not in task:
        raise bad('has no "task" ({"type": ..., "index": ...}: which of the cluster\'s tasks this process is)')
    if task["type"] not in cluster:
        raise bad(f'names task type {task["type"]!r}, which is not in the cluster ({sorted(cluster)})')
    index = task.get("index", 0)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(cluster[task["type"]]):
        raise bad(f'has task index {index!r}, but cluster["{task["type"]}"] lists {len(cluster[task["type"]])} '
                  "address(es) (indices from 0)")
    return config


def _tf_config_workers():
    config = tf_config() or {}
    cluster = config.get("cluster") or {}
    return len(cluster.get("worker", [])) + len(cluster.get("chief", []))


def _listening(address, timeout=0.5):
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _own_address(config):
    task = config["task"]
    return config["cluster"][task["type"]][task.get("index", 0)]


def _wait_for_peers(config, timeout, interval=10.0):
    """Waits until every other task of TF_CONFIG's cluster accepts connections,
    logging the missing ones every `interval` seconds, and raises RuntimeError
    after `timeout` seconds (None: no limit).

    TensorFlow's MultiWorkerMirroredStrategy blocks in its constructor, holding
    the interpreter, until all workers join, so the waiting happens before it:
    meanwhile this worker answers on its own port with a plain listener (so
    that peers waiting the same way see it), closed just before TensorFlow's
    server takes the port."""
    peers = [a for kind in ("chief", "worker") for a in config["cluster"].get(kind, [])
             if a != _own_address(config)]
    host, _, port = _own_address(config).rpartition(":")
    listener = None
    try:
        listener = socket.socket(socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host.strip("[]") if host not in ("localhost",) else "127.0.0.1", int(port)))
        listener.listen(64)
        listener.settimeout(0.2)
    except OSError:  # the address is not this machine's, or taken: just wait
        if listener is not None:
            listener.close()
        listener = None
    started, last_log = time.monotonic(), 0.0
    try:
        while True:
            missing = [p for p in peers if not _listening(p)]
            if not missing:
                return
            waited = time.monotonic() - started
            if timeout is not None and waited >= timeout:
                raise RuntimeError(
                    f"tfopt.strategies.auto: the workers named in TF_CONFIG did not all start within {timeout:g} s; "
                    f"not answering: {missing}. Fix: start every worker of TF_CONFIG's cluster (each with the "
                    "same cluster and its own task index), check the addresses and that the ports are open, or "
                    "pass a larger timeout."
                )
            if waited - last_log >= interval or last_log == 0.0:
                last_log = max(waited, 1e-9)
                log.warning("tfopt.strategies.auto: waiting for the other workers of TF_CONFIG (%.0f s so far); "
                            "not answering yet: %s", waited, missing)
            deadline = time.monotonic() + 0.5
            while listener is not None and time.monotonic() < deadline:
                try:
                    connection, _ = listener.accept()
                    connection.close()
                except OSError:
                    pass
            if listener is None:
                time.sleep(0.5)
    finally:
        if listener is not None:
            listener.close()


def _tpu_available():
    """A TPU is worth trying: Colab's TPU runtime or a TPU VM says so."""
    return bool(os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_NAME")) or os.path.exists("/dev/accel0")


def _choose():
    """(kind, reason) for this machine: "tpu", "multi_worker", "mirrored" or "default"."""
    if _tpu_available():
        return "tpu", "a TPU is reachable"
    workers = _tf_config_workers()
    if workers > 1:
        return "multi_worker", f"TF_CONFIG names {workers} workers"
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return "mirrored", f"{len(gpus)} GPUs"
    return "default", "one device" + (" (a GPU)" if gpus else " (no GPU or TPU found)")


def auto(timeout=None):
    """The strategy for this machine, logged with the reason (logger "tfopt").

    - `TPU()` when a TPU is reachable (Colab's TPU runtime, a TPU VM), resolved,
      connected and initialized once per process;
    - `MultiWorker()` when `TF_CONFIG` names several workers;
    - `Mirrored()` over all GPUs when there are several;
    - otherwise the default strategy (`tf.distribute.get_strategy()`: one
      device, no overhead). Use the module functions (`global_batch_size(strategy,
      32)`, ...) to write code that runs under any of them.

    Under `KERAS_BACKEND=jax` it returns `auto_distribution()` instead: a
    `keras.distribution.DataParallel` over every device (see there), whose
    `scope()` works like a strategy's; the helpers take it too.

    If a TPU is announced but cannot be reached, the error says so instead of
    quietly training on the CPU. A malformed `TF_CONFIG` is a ValueError that
    quotes it. Under `TF_CONFIG`, it first waits for every other worker to
    answer on its address: meanwhile the peers not answering are logged every
    10 seconds (WARNING), and after `timeout` seconds (None: no limit, as
    TensorFlow) a RuntimeError names them. (TensorFlow's own wait, inside the
    strategy's constructor, holds the interpreter: it cannot be interrupted or
    logged, `CommunicationOptions(timeout_seconds=...)` does not bound it, and
    a worker stuck there ignores SIGTERM.)

    Args:
        timeout: seconds to wait for the other workers of `TF_CONFIG` (a
            number >= 0), or None to wait as long as it takes.

    Example:
    >>> import tfopt
    >>> strategy = tfopt.strategies.auto()
    >>> strategy.num_replicas_in_sync
    1
    """
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not timeout >= 0):
        raise ValueError(
            "`timeout` is the number of seconds `auto()` waits for the other workers of TF_CONFIG: a number "
            f">= 0, or None to wait as long as it takes. Received: timeout={timeout!r}"
        )
    if keras.backend.backend() == "jax":
        return auto_distribution()
    kind, reason = _choose()
    _define_strategies()
    if kind == "tpu":
        try:
            strategy = TPU()  # a name that does not resolve is already a clear RuntimeError
        except (ValueError, tf.errors.OpError) as e:
            raise RuntimeError(
                f"tfopt.strategies.auto: this machine announces a TPU (COLAB_TPU_ADDR, TPU_NAME or "
                f"/dev/accel0) but it could not be reached: {e}. In Colab, pick Runtime > Change runtime "
                "type > TPU, or unset the variable to train on the CPU."
            ) from e
    elif kind == "multi_worker":
        _wait_for_peers(tf_config(), timeout)
        strategy = MultiWorker()
    elif kind == "mirrored":
        strategy = Mirrored()
    else:
        strategy = tf.distribute.get_strategy()
    log.info("tfopt.strategies.auto: %s with %d replica(s), because %s.", type(strategy).__name__,
             strategy.num_replicas_in_sync, reason)
    return strategy


def auto_distribution():
    """The `keras.distribution` for this machine under `KERAS_BACKEND=jax`: data
    parallelism over every device JAX sees (all TPU cores, all GPUs, else the
    CPU), logged with the device count (logger "tfopt").

    The JAX counterpart of `auto()` (which returns it under JAX). Make it the
    current distribution with `keras.distribution.set_distribution(...)` (or
    use its `scope()` around building, compiling and `fit`) before the model
    is built: its variables are then replicated on every device and each batch
    is split along its first axis, so give `fit` the global batch size
    (`global_batch_size(distribution, per_device_batch)`). tfopt's pruning,
    quantization-aware training and distillation need nothing more: masks,
    activation ranges and folded BatchNormalization statistics are computed on
    the global batch inside the jitted step (XLA adds the collectives), the
    same values on every device as on one.

    Multi-host JAX (several processes) starts with
    `keras.distribution.initialize()` on every host, before this call;
    `TF_CONFIG` is TensorFlow's and is refused here. A TPU announced by the
    environment (COLAB_TPU_ADDR, TPU_NAME, /dev/accel0) that JAX does not see
    is an error, not a quiet fall back to the CPU.

    Example (under `KERAS_BACKEND=jax`):
    >>> import jax, keras, numpy as np, tfopt  # doctest: +SKIP
    >>> distribution = tfopt.strategies.auto_distribution()  # doctest: +SKIP
    >>> keras.distribution.set_distribution(distribution)  # doctest: +SKIP
    >>> batch = tfopt.strategies.global_batch_size(distribution, 4)  # doctest: +SKIP
    >>> batch == 4 * len(jax.devices())  # doctest: +SKIP
    True
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])  # doctest: +SKIP
    >>> model.compile("sgd", "mse")  # doctest: +SKIP
    >>> _ = model.fit(np.ones((2 * batch, 3)), np.ones((2 * batch, 2)), batch_size=batch,
    ...               callbacks=[tfopt.callbacks.Pruning(tfopt.schedules.ConstantSparsity(0.5))],
    ...               verbose=0)  # doctest: +SKIP
    >>> keras.distribution.set_distribution(None)  # doctest: +SKIP
    """
    backend = keras.backend.backend()
    if backend != "jax":
        raise ValueError(
            "tfopt.strategies.auto_distribution() returns a keras.distribution, which Keras implements for the "
            f"JAX backend; this process runs Keras on {backend!r} (KERAS_BACKEND={backend}). Fix: use "
            "`tfopt.strategies.auto()` (a tf.distribute strategy) under TensorFlow, or run with "
            f"KERAS_BACKEND=jax. Received: backend {backend!r}"
        )
    import jax  # lazy: the JAX backend only

    if os.environ.get("TF_CONFIG"):
        raise ValueError(
            "tfopt.strategies.auto_distribution: TF_CONFIG is set, but it configures TensorFlow's multi-worker "
            "training, and Keras runs on JAX here, which does not read it. Fix: unset TF_CONFIG and start JAX's "
            "processes with `keras.distribution.initialize(job_addresses, num_processes, process_id)` on every "
            f"host before this call (or run with KERAS_BACKEND=tensorflow). Received: TF_CONFIG={os.environ['TF_CONFIG']!r}"
        )
    devices = jax.devices()  # the default platform's: TPU, else GPU, else CPU; every process's under multi-host
    platform = devices[0].platform
    if _tpu_available() and platform != "tpu":
        announced = [k for k in ("COLAB_TPU_ADDR", "TPU_NAME") if os.environ.get(k)] or ["/dev/accel0"]
        raise RuntimeError(
            f"tfopt.strategies.auto_distribution: this machine announces a TPU ({', '.join(announced)}) but JAX "
            f"sees only {platform} devices ({len(devices)}). Fix: install JAX for TPUs (`pip install "
            "'jax[tpu]'`), or unset the variable to train on the CPU/GPU."
        )
    distribution = keras.distribution.DataParallel(devices=devices)
    log.info("tfopt.strategies.auto_distribution: DataParallel over %d %s device(s) in %d process(es).",
             len(devices), platform, jax.process_count())
    return distribution
