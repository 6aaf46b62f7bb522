"""One worker of the 2-process MultiWorkerMirroredStrategy tests (run as a script).

    python tests/multi_worker_job.py INDEX PORT0,PORT1 OUT_DIR [--crash-after-epoch K] [--unpatched]

Trains a pruned + int8 QAT CNN on digits for 4 epochs with BackupAndRestore
(one backup directory per worker), then writes its final weights to
OUT_DIR/weights-INDEX.npz. With --crash-after-epoch K it exits abruptly after
epoch K's backup; with --unpatched it uses tf.distribute's strategy without
tfopt's fix of Keras's trainer.
"""

import json
import os
import sys

index, ports, out = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3]
crash = int(sys.argv[sys.argv.index("--crash-after-epoch") + 1]) if "--crash-after-epoch" in sys.argv else None
os.environ["TF_CONFIG"] = json.dumps({
    "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
    "task": {"type": "worker", "index": index},
})
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfopt  # noqa: E402
from tfopt.demo.data import load_digits  # noqa: E402

if "--unpatched" in sys.argv:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
else:
    strategy = tfopt.strategies.MultiWorker()
x, y, _, _ = load_digits(0)
x, y = x[:256], y[:256]
epochs, batch = 4, tfopt.strategies.global_batch_size(strategy, 16)
steps = epochs * (len(x) // batch)
keras.utils.set_random_seed(0)
with strategy.scope():
    schedule = tfopt.schedules.PolynomialDecay(0.0, 0.75, 0, steps // 2, frequency=2)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        tfopt.layers.QuantizeActivation(),
        tfopt.layers.Conv2D(8, 3, activation="relu", pruning_schedule=schedule, quantization_aware="int8"),
        keras.layers.Flatten(),
        tfopt.layers.Dense(10, pruning_schedule=schedule, quantization_aware="int8"),
    ])
    model.compile(keras.optimizers.SGD(0.05), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
data = tfopt.strategies.prepare_dataset(strategy, tf.data.Dataset.from_tensor_slices((x, y)), 16)


class Crash(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if crash is not None and epoch == crash:
            os._exit(3)


callbacks = [keras.callbacks.BackupAndRestore(os.path.join(out, f"backup-{index}")), Crash()]
model.fit(data, epochs=epochs, verbose=0, callbacks=callbacks)
np.savez(os.path.join(out, f"weights-{index}.npz"), *[v.numpy() for v in model.weights])
print("DONE", index, flush=True)
