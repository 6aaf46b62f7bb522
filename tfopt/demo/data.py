"""The demo's data and models, which tests, benchmarks and notebooks reuse.

scikit-learn's bundled digits (no download: `keras.datasets` needs the
network), the demo's CNN, and a LiteRT accuracy helper. Public, so that
people trying their own layers and recipes can use them too.
"""

import keras
import numpy as np

from tfopt.litert import run_litert

__all__ = ["load_digits", "augment", "build_cnn", "compile_classifier", "litert_accuracy"]


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


def augment_labelled(x, y, n, seed=0):
    """`augment(x, n, seed)` and the labels `y` of the images it perturbed."""
    picks = np.random.default_rng(seed).integers(0, len(x), n)  # the first draw `augment` makes
    return augment(x, n, seed=seed), y[picks]


def build_cnn(input_shape=(8, 8, 1), classes=10, widths=(32, 64, 128), name="digits_cnn"):
    """The demo's small CNN, in plain Keras (`widths`: the two convolutions' and the hidden Dense's)."""
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


def compile_classifier(model, learning_rate=1e-3):
    """Adam, sparse categorical cross-entropy on logits, accuracy."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )


def litert_accuracy(path, x, y):
    """Top-1 accuracy of the LiteRT file at `path` on `(x, y)`."""
    with open(path, "rb") as f:
        content = f.read()
    logits = run_litert(content, [x])[0]
    return float(np.mean(np.argmax(logits, axis=-1) == y))
