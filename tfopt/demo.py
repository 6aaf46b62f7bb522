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


def augment(x, n, seed=0):
    """`n` perturbed copies of images `x` (N, 8, 8, 1) in [0, 1]: a random
    shift of up to one pixel, intensity scaled by 0.8-1.2, Gaussian noise
    (sd 0.05). A transfer set for distillation: the teacher labels them."""
    rng = np.random.default_rng(seed)
    picks = x[rng.integers(0, len(x), n)]
    out = np.zeros_like(picks)
    shifts = rng.integers(-1, 2, size=(n, 2))
    for i, (dy, dx) in enumerate(shifts):
        out[i] = np.roll(picks[i], (dy, dx), axis=(0, 1))
        if dy:
            out[i, (0 if dy > 0 else -1), :] = 0
        if dx:
            out[i, :, (0 if dx > 0 else -1)] = 0
    out *= rng.uniform(0.8, 1.2, size=(n, 1, 1, 1))
    out += rng.normal(0.0, 0.05, size=out.shape)
    return np.clip(out, 0.0, 1.0).astype("float32")


def build_cnn(input_shape=(8, 8, 1), classes=10, widths=(32, 64, 128), name="digits_cnn"):
    """The demo's small CNN, in plain Keras (`widths`: the two convolutions' and the hidden Dense's)."""
    import keras

    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Conv2D(widths[0], 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(widths[1], 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(widths[2], activation="relu"),
            keras.layers.Dense(classes),
        ],
        name=name,
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


def combined_recipe(epochs=8, sparsity=0.8, transfer=5000, student_widths=(16, 32, 64), seed=0, out_dir=None,
                    print_fn=print):
    """"Make the big model small" in one fit: a student CNN distilled from the
    float teacher (labels plus a transfer set of perturbed digits), pruned to
    `sparsity` and trained int8-aware, exported as a full-integer LiteRT file;
    compared with the float teacher's float32 file. Returns `(rows, note)`."""
    import keras

    import tfopt
    from tfopt import distillation
    from tfopt.reporting import render

    keras.utils.set_random_seed(seed)
    x_train, y_train, x_test, y_test = load_digits(seed)
    out_dir = out_dir or tempfile.mkdtemp(prefix="tfopt-recipe-")
    started = time.perf_counter()
    teacher = build_cnn(name="teacher")
    _compile(teacher)
    teacher.fit(x_train, y_train, batch_size=32, epochs=2 * epochs, verbose=0)
    teacher.trainable = False

    x_fit, y_fit = distillation.attach_teacher((x_train, y_train), teacher,
                                               unlabelled=augment(x_train, transfer, seed=seed + 1))
    schedule = tfopt.schedules.PolynomialDecay(0.0, sparsity, "10%", "60%", frequency="5%")
    student = tfopt.quantize_model(tfopt.prune(build_cnn(widths=student_widths, name="student"), schedule), "int8")
    student.compile(keras.optimizers.Adam(2e-3), distillation.DistillationLoss(),
                    metrics=[distillation.LabelAccuracy()])
    student.fit(x_fit, y_fit, batch_size=64, epochs=epochs, verbose=0,
                callbacks=[tfopt.callbacks.Pruning(), tfopt.callbacks.QuantizationSchedule(start=0.1)])

    rows = []
    for name, model, precision in (("teacher (float32)", teacher, "float32"),
                                   (f"student distilled + {sparsity:.0%} pruned + int8", student, "int8")):
        path = os.path.join(out_dir, name.split()[0] + ".tflite")
        report = tfopt.export(model, path, inputs=x_test, precision=precision, measure_latency=True)
        total = tfopt.summary(model, print_fn=None)[-1]
        rows.append({
            "model": name,
            "litert accuracy": round(_litert_accuracy(path, x_test, y_test), 4),
            "params": total["size"],
            "nonzeros": total["nonzeros"],
            "tflite bytes": report.size_bytes,
            "gzip bytes": report.gzip_bytes,
            "latency ms": round(report.latency_ms, 4),
        })
    t, s = rows
    note = (
        f"Student/teacher: accuracy {100 * (s['litert accuracy'] - t['litert accuracy']):+.2f} points, "
        f"gzip size {s['gzip bytes'] / t['gzip bytes']:.3f}x, latency {s['latency ms'] / t['latency ms']:.2f}x "
        f"(LiteRT interpreter, 1 thread, batch 1). Teacher {2 * epochs} epochs on the 1,437 training digits; "
        f"student widths {student_widths} (teacher (32, 64, 128)), {epochs} epochs on the labelled digits plus "
        f"{transfer:,} perturbed ones labelled by the teacher; {time.perf_counter() - started:.0f} s."
    )
    if print_fn is not None:
        print_fn(render(rows, list(rows[0])))
        print_fn("\n" + note)
    return rows, note
