"""Shared helpers for the benchmarks: result sections, medians, environment line."""

import os
import platform
import re
import statistics
import subprocess
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def median(values):
    return statistics.median(values)


def environment():
    """One line naming the software and machine the figures come from."""
    code = (
        "import os; os.environ['TF_CPP_MIN_LOG_LEVEL']='3'\n"
        "import tensorflow as tf, keras; print(tf.__version__, keras.__version__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split()
    tf_version, keras_version = (out + ["?", "?"])[:2]
    return (
        f"TensorFlow {tf_version}, Keras {keras_version}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPU cores, {platform.machine()}"
    )


def write_section(name, title, command, body):
    """Replaces (or appends) the section `name` of RESULTS.md."""
    header = "# Benchmark results\n\nEach section is written by the script that measured it; re-run the command to refresh it.\n"
    text = open(RESULTS).read() if os.path.exists(RESULTS) else header
    section = (
        f"<!-- {name} -->\n## {title}\n\nCommand: `{command}`\n\n{environment()}\n\n{body.strip()}\n<!-- /{name} -->"
    )
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    with open(RESULTS, "w") as f:
        f.write(text)


def table(rows, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def pretrained_digits_cnn(seed, epochs):
    """The demo CNN trained `epochs` on digits from seed `seed`: returns its
    weights and `(x_train, y_train, x_test, y_test)` (the split of seed 0)."""
    import keras

    from tfopt.demo.data import compile_classifier, build_cnn, load_digits

    keras.utils.set_random_seed(seed)
    data = load_digits(seed=0)
    base = build_cnn()
    compile_classifier(base)
    base.fit(data[0], data[1], batch_size=32, epochs=epochs, verbose=0)
    return base.get_weights(), data


def keras_source_files():
    """(root, paths): the Python files of the installed Keras (`keras/src`), sorted, then shuffled
    with seed 0: local text for the language-model benchmarks (nothing can be downloaded)."""
    import keras
    import numpy as np

    root = os.path.join(os.path.dirname(keras.__file__), "src")
    paths = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
                   if f.endswith(".py"))
    order = np.random.default_rng(0).permutation(len(paths))
    return root, [paths[i] for i in order]


def byte_windows(root, paths, seq, limit):
    """Non-overlapping (seq + 1)-byte windows of the files' bytes, concatenated, up to `limit` windows."""
    import numpy as np

    chunks, total = [], 0
    for path in paths:
        with open(os.path.join(root, path), "rb") as f:
            chunks.append(f.read())
        total += len(chunks[-1])
        if total >= limit * (seq + 1):
            break
    data = np.frombuffer(b"".join(chunks), np.uint8).astype("int32")
    n = min(len(data) // (seq + 1), limit)
    return data[: n * (seq + 1)].reshape(n, seq + 1)
