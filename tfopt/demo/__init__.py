"""`tfopt demo`: dense vs pruned vs shrunk CNN on scikit-learn's bundled digits, end to end.

Trains a small CNN, prunes a copy to 80% sparsity with a polynomial schedule
given in percentages of training, shrinks another copy to half its channels
(`tfopt.shrink`) and distills it from the dense model (the Minitron recipe),
exports all three to LiteRT, and prints one table with the files' sizes,
multiply-adds and latency. Runs offline: the digits ship inside scikit-learn.
"""

import os
import tempfile
import time

import keras
import numpy as np

from tfopt import callbacks, distillation, schedules
from tfopt.demo.data import augment, augment_labelled, build_cnn, compile_classifier, litert_accuracy, load_digits
from tfopt.exporting import export
from tfopt.reporting import render, summary
from tfopt.transforms import prune, quantize_model, shrink

__all__ = ["run", "combined_recipe", "load_digits", "build_cnn"]


def run(epochs=12, finetune_epochs=20, sparsity=0.8, out_dir=None, seed=0, print_fn=print, shrink_fraction=0.5):
    """Runs the demo and returns its table as a list of row dicts."""
    keras.utils.set_random_seed(seed)
    x_train, y_train, x_test, y_test = load_digits(seed)
    out_dir = out_dir or tempfile.mkdtemp(prefix="tfopt-demo-")
    started = time.perf_counter()

    dense = build_cnn()
    compile_classifier(dense)
    dense.fit(x_train, y_train, batch_size=32, epochs=epochs, verbose=0)

    schedule = schedules.PolynomialDecay(0.0, sparsity, "0%", "50%", frequency="5%")
    pruned = prune(dense, schedule)
    compile_classifier(pruned, learning_rate=5e-4)
    pruned.fit(
        x_train, y_train, batch_size=32, epochs=finetune_epochs, verbose=0,
        callbacks=[callbacks.Pruning()],
    )

    # Pruning that makes the model faster: half of every layer's channels removed, then
    # distilled from the dense model (the Minitron recipe).
    dense.trainable = False
    shrunk = shrink(dense, shrink_fraction)
    distiller = distillation.Distiller(dense, shrunk, temperature=4.0, alpha=0.1)
    distiller.compile(keras.optimizers.Adam(1e-3), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x_more, y_more = augment_labelled(x_train, y_train, 4 * len(x_train), seed=seed + 1)
    distiller.fit(np.concatenate([x_train, x_more]), np.concatenate([y_train, y_more]), batch_size=32,
                  epochs=max(1, finetune_epochs // 4), verbose=0)
    dense.trainable = True
    compile_classifier(shrunk)

    rows = []
    for name, model in (("dense", dense), (f"pruned {sparsity:.0%}", pruned),
                        (f"shrunk {shrink_fraction:.0%} + distilled", shrunk)):
        path = os.path.join(out_dir, name.split()[0] + ".tflite")
        report = export(model, path, inputs=x_test[:32], measure_latency=True)
        total = summary(model, print_fn=None)[-1]
        rows.append(
            {
                "model": name,
                "accuracy": float(model.evaluate(x_test, y_test, verbose=0)[1]),
                "litert accuracy": litert_accuracy(path, x_test, y_test),
                "params": total["size"],
                "nonzeros": total["nonzeros"],
                "tflite bytes": report.size_bytes,
                "gzip bytes": report.gzip_bytes,
                "macs": total["macs"],
                "latency ms": round(report.latency_ms, 4),
            }
        )
    columns = ("model", "accuracy", "litert accuracy", "params", "nonzeros", "tflite bytes", "gzip bytes", "macs",
               "latency ms")
    if print_fn is not None:
        print_fn(render(rows, columns))
        ratio = rows[1]["gzip bytes"] / rows[0]["gzip bytes"]
        print_fn(
            f"\ngzipped .tflite: pruned/dense = {ratio:.2f}x (the zeros are still stored and multiplied); "
            f"shrunk/dense: file {rows[2]['tflite bytes'] / rows[0]['tflite bytes']:.2f}x, latency "
            f"{rows[2]['latency ms'] / rows[0]['latency ms']:.2f}x; files in {out_dir}; "
            f"{time.perf_counter() - started:.0f} s"
        )
    return rows


def combined_recipe(epochs=8, sparsity=0.8, transfer=5000, student_widths=(16, 32, 64), seed=0, out_dir=None,
                    print_fn=print):
    """"Make the big model small" in one fit: a student CNN distilled from the
    float teacher (labels plus a transfer set of perturbed digits), pruned to
    `sparsity` and trained int8-aware, exported as a full-integer LiteRT file;
    compared with the float teacher's float32 file. Returns `(rows, note)`."""
    keras.utils.set_random_seed(seed)
    x_train, y_train, x_test, y_test = load_digits(seed)
    out_dir = out_dir or tempfile.mkdtemp(prefix="tfopt-recipe-")
    started = time.perf_counter()
    teacher = build_cnn(name="teacher")
    compile_classifier(teacher)
    teacher.fit(x_train, y_train, batch_size=32, epochs=2 * epochs, verbose=0)
    teacher.trainable = False

    x_fit, y_fit = distillation.attach_teacher((x_train, y_train), teacher,
                                               unlabelled=augment(x_train, transfer, seed=seed + 1))
    schedule = schedules.PolynomialDecay(0.0, sparsity, "10%", "60%", frequency="5%")
    student = quantize_model(prune(build_cnn(widths=student_widths, name="student"), schedule), "int8")
    student.compile(keras.optimizers.Adam(2e-3), distillation.DistillationLoss(),
                    metrics=[distillation.LabelAccuracy()])
    student.fit(x_fit, y_fit, batch_size=64, epochs=epochs, verbose=0,
                callbacks=[callbacks.Pruning(), callbacks.QuantizationSchedule(start=0.1)])

    rows = []
    for name, model, precision in (("teacher (float32)", teacher, "float32"),
                                   (f"student distilled + {sparsity:.0%} pruned + int8", student, "int8")):
        path = os.path.join(out_dir, name.split()[0] + ".tflite")
        report = export(model, path, inputs=x_test, precision=precision, measure_latency=True)
        total = summary(model, print_fn=None)[-1]
        rows.append({
            "model": name,
            "litert accuracy": round(litert_accuracy(path, x_test, y_test), 4),
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
