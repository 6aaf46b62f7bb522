"""PNG plots: sparsity per layer, accuracy against size (matplotlib, an optional extra)."""

import io
import os

from tfopt.exporting import atomic_write_bytes
from tfopt.reporting import summary

__all__ = ["plot_sparsity", "plot_accuracy_vs_size"]


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("tfopt's plots need matplotlib: pip install 'tfopt[plot]'") from e
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_sparsity(model, path):
    """Writes a bar chart of each prunable weight's sparsity (from
    `tfopt.summary`) to `path` (PNG) and returns `path`.

    Example:
    >>> import keras, os, tempfile, tfopt
    >>> model = keras.Sequential([keras.Input((4,)), tfopt.layers.Dense(2, pruning_schedule="baseline")])
    >>> path = tfopt.plot_sparsity(model, os.path.join(tempfile.mkdtemp(), "sparsity.png"))
    >>> os.path.getsize(path) > 0
    True
    """
    plt = _pyplot()
    rows = [r for r in summary(model, print_fn=None) if r["layer"] != "total"]
    if not rows:
        raise ValueError(f"Model '{model.name}' has no prunable weights to plot.")
    labels = [f"{r['layer']}/{r['weight']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(rows) + 2), 3.5))
    ax.bar(range(len(rows)), [r["sparsity"] for r in rows], color="#4c72b0")
    ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("sparsity (fraction of zeros)")
    ax.set_title(f"{model.name}: sparsity per weight")
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_accuracy_vs_size(rows, path, size_key="gzip bytes", accuracy_key="accuracy"):
    """Writes accuracy against file size, one labelled point per row (dicts
    with "model", `size_key` and `accuracy_key`, as `tfopt demo` makes), to
    `path` (PNG, log-scaled size) and returns `path`."""
    plt = _pyplot()
    missing = [k for k in ("model", size_key, accuracy_key) if any(k not in r for r in rows)]
    if not rows or missing:
        raise ValueError(f"plot_accuracy_vs_size needs rows with keys 'model', {size_key!r}, {accuracy_key!r}; "
                         f"missing: {missing or 'all rows'}")
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r[size_key], 100 * r[accuracy_key], s=40)
        ax.annotate(r["model"], (r[size_key], 100 * r[accuracy_key]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"{size_key} (log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy against size")
    ax.grid(alpha=0.3)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)
