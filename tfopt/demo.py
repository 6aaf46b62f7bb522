"""`tfopt demo`: dense vs pruned CNN on scikit-learn's bundled digits, end to end.

Trains a small CNN, prunes a copy to 80% sparsity with a polynomial schedule
given in percentages of training, strips and exports both to LiteRT, and
prints one table. Runs offline: the digits ship inside scikit-learn.
"""

import os
import tempfile
import time

import numpy as np


def load_digits(seed=0, test_fraction=0.2):
    """Returns `(x_train, y_train, x_test, y_test)`: 8x8x1 float32 images in [0, 1]."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise SystemExit(
            "The demo needs scikit-learn for its bundled digits data set: "
            "pip install 'tfopt[demo]'"
        ) from e
    digits = sk_load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target.astype("int32")
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def build_cnn(input_shape=(8, 8, 1), classes=10):
    """The demo's small CNN, in plain Keras."""
    import keras

    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(classes),
        ],
        name="digits_cnn",
    )


def _compile(model, learning_rate=1e-3):
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def _litert_accuracy(path, x, y):
    from tfopt.exporting import run_litert

    with open(path, "rb") as f:
        content = f.read()
    logits = run_litert(content, [x])[0]
    return float(np.mean(np.argmax(logits, axis=-1) == y))


def run(epochs=12, finetune_epochs=20, sparsity=0.8, out_dir=None, seed=0, print_fn=print):
    """Runs the demo and returns its table as a list of row dicts."""
    import keras

    import tfopt
    from tfopt.reporting import render

    keras.utils.set_random_seed(seed)
    x_train, y_train, x_test, y_test = load_digits(seed)
    out_dir = out_dir or tempfile.mkdtemp(prefix="tfopt-demo-")
    started = time.perf_counter()

    dense = build_cnn()
    _compile(dense)
    dense.fit(x_train, y_train, batch_size=32, epochs=epochs, verbose=0)

    schedule = tfopt.schedules.PolynomialDecay(0.0, sparsity, "0%", "50%", frequency="5%")
    pruned = tfopt.prune(dense, schedule)
    _compile(pruned, learning_rate=5e-4)
    pruned.fit(
        x_train, y_train, batch_size=32, epochs=finetune_epochs, verbose=0,
        callbacks=[tfopt.callbacks.Pruning()],
    )

    rows = []
    for name, model in (("dense", dense), (f"pruned {sparsity:.0%}", pruned)):
        path = os.path.join(out_dir, name.split()[0] + ".tflite")
        report = tfopt.export(model, path, inputs=x_test[:32])
        total = tfopt.summary(model, print_fn=None)[-1]
        rows.append(
            {
                "model": name,
                "accuracy": float(model.evaluate(x_test, y_test, verbose=0)[1]),
                "litert accuracy": _litert_accuracy(path, x_test, y_test),
                "params": total["size"],
                "nonzeros": total["nonzeros"],
                "tflite bytes": report.size_bytes,
                "gzip bytes": report.gzip_bytes,
            }
        )
    columns = ("model", "accuracy", "litert accuracy", "params", "nonzeros", "tflite bytes", "gzip bytes")
    if print_fn is not None:
        print_fn(render(rows, columns))
        ratio = rows[1]["gzip bytes"] / rows[0]["gzip bytes"]
        print_fn(
            f"\ngzipped .tflite: pruned/dense = {ratio:.2f}x; files in {out_dir}; "
            f"{time.perf_counter() - started:.0f} s"
        )
    return rows
