"""Quantization-aware training: digits accuracy by precision, and MobileNetV2
LiteRT int8 vs float32 (size, interpreter latency), tfopt vs tfmot.

`--part accuracy`: for each seed, train the demo CNN (`tfopt.demo.data.build_cnn`)
in float for `--epochs`, then from that checkpoint fine-tune for
`--finetune-epochs` either in float (the baseline, same total epochs) or as a
`tfopt.quantize_model` copy at int8, int4 and binary weights (8-bit
activations), and int8 combined with 80% pruning (prune, then quantize; the
sparsity survives QAT). Each QAT model is exported to an int8 `.tflite` and
evaluated in the LiteRT interpreter too.

`--part mobilenet`: `keras.applications.MobileNetV2` (alpha 1.0, 224x224,
`weights=None`: size and speed do not depend on training) quantized with
`tfopt.quantize_model`, a few fit steps on random images (to set ranges and BN
statistics), exported as int8 and as float32; the file sizes and the median
single-image interpreter latency (one thread, `--rounds` interleaved rounds of
50 runs). In the same run, a worker process does the same with tfmot's
`quantize_model` on tf_keras's MobileNetV2.

`--part sequence`: the models of sequences, float vs int8 vs int16x8 in LiteRT:
a small transformer classifier (digits read as 8 rows of 8 pixels; Dense
embedding, 2 pre-norm blocks of LayerNormalization, MultiHeadAttention, GELU
MLP, residual adds) and a keyword-spotting-shaped Conv1D network (49 frames of
40 features, generated: each of 10 classes is a smooth template, shifted in
time and noised). Each is trained in float, then fine-tuned as a
`tfopt.quantize_model` copy; exported as float32 (the plain Keras model), int8
(the transformer with `representative_data`: LayerNormalization and attention
are calibrated) and int16x8 (calibrated); accuracy in the LiteRT interpreter,
file size, and median single-input latency (one thread, `--rounds`
interleaved rounds of 50 runs). tfmot has no QAT for LayerNormalization or
MultiHeadAttention, and no Keras 3 path, so it has no row here.

Usage:
    python benchmarks/quantization.py --part accuracy [--seeds 3]
    python benchmarks/quantization.py --part mobilenet [--rounds 5]
    python benchmarks/quantization.py --part sequence [--rounds 5]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

PRECISIONS = [("int8 QAT", "int8", None), ("int4 QAT", "int4", None), ("binary QAT", "binary", None),
              ("int8 QAT + 80% pruned", "int8", 0.8)]


def run_seed(seed, epochs, finetune_epochs, out_dir):

    import tfopt
    from tfopt.demo.data import compile_classifier, litert_accuracy, build_cnn

    from _common import pretrained_digits_cnn

    snapshot, (x_train, y_train, x_test, y_test) = pretrained_digits_cnn(seed, epochs)

    def start():
        model = build_cnn()
        model.set_weights(snapshot)
        return model

    results = {}
    dense = start()
    compile_classifier(dense, 5e-4)
    dense.fit(x_train, y_train, batch_size=32, epochs=finetune_epochs, verbose=0)
    report = tfopt.export(dense, os.path.join(out_dir, f"float-{seed}.tflite"), check=False)
    results["float"] = (float(dense.evaluate(x_test, y_test, verbose=0)[1]), None, report.size_bytes,
                        report.gzip_bytes, 0.0)
    for name, precision, sparsity in PRECISIONS:
        model, callbacks = start(), []
        if sparsity:
            schedule = tfopt.schedules.PolynomialDecay(0.0, sparsity, "0%", "50%", frequency="5%")
            model, callbacks = tfopt.prune(model, schedule), [tfopt.callbacks.Pruning()]
        qat = tfopt.quantize_model(model, precision)
        compile_classifier(qat, 5e-4)
        qat.fit(x_train, y_train, batch_size=32, epochs=finetune_epochs, verbose=0, callbacks=callbacks)
        path = os.path.join(out_dir, f"{precision}-{sparsity}-{seed}.tflite")
        report = tfopt.export(qat, path, inputs=x_test, precision="int8")
        assert report.float_ops == [], report.float_ops
        results[name] = (float(qat.evaluate(x_test, y_test, verbose=0)[1]), litert_accuracy(path, x_test, y_test),
                         report.size_bytes, report.gzip_bytes, report.sparsity or 0.0)
    return results


def accuracy(args):
    from _common import table, write_section

    out_dir = tempfile.mkdtemp(prefix="tfopt-bench-")
    per_seed = [run_seed(s, args.epochs, args.finetune_epochs, out_dir) for s in range(args.seeds)]
    float_acc = statistics.mean(r["float"][0] for r in per_seed)
    rows = []
    for name in ["float"] + [p[0] for p in PRECISIONS]:
        keras_accs = [r[name][0] for r in per_seed]
        mean = statistics.mean(keras_accs)
        litert = [r[name][1] for r in per_seed if r[name][1] is not None]
        rows.append({
            "model": name,
            "Keras accuracy (mean ± sd)": f"{100 * mean:.2f} ± {100 * statistics.pstdev(keras_accs):.2f}",
            "vs float (points)": f"{100 * (mean - float_acc):+.2f}" if name != "float" else "",
            "LiteRT int8 accuracy": f"{100 * statistics.mean(litert):.2f}" if litert else "(float32 file)",
            "kernel sparsity": f"{statistics.mean(r[name][4] for r in per_seed):.2f}",
            ".tflite bytes": f"{statistics.mean(r[name][2] for r in per_seed):,.0f}",
            "gzip bytes": f"{statistics.mean(r[name][3] for r in per_seed):,.0f}",
        })
    body = table(rows, list(rows[0]))
    body += (
        f"\n\n{args.seeds} seeds; digits (scikit-learn, 20% held out); demo CNN; {args.epochs} float epochs, "
        f"then {args.finetune_epochs} epochs of float training or of QAT (`tfopt.quantize_model`, 8-bit "
        "activations; int4/binary are the weights' precision, stored in an int8 file). The pruned row prunes "
        "to 80% over the first half of its QAT epochs. Targets: int8 within 0.5 points of float; int4 within 1.5."
    )
    print(body)
    if not args.no_write:
        write_section("qat-accuracy", "QAT: digits accuracy by precision",
                      f"python benchmarks/quantization.py --part accuracy --seeds {args.seeds} "
                      f"--epochs {args.epochs} --finetune-epochs {args.finetune_epochs}", body)


# --- MobileNetV2 ------------------------------------------------------------------
def _random_images(n, size, seed=0):
    import numpy as np

    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def worker(framework, size, steps):
    """Builds, quantizes, fits `steps` steps, converts int8 and float32; prints
    the two flatbuffers' paths as JSON."""
    import numpy as np

    out_dir = tempfile.mkdtemp(prefix=f"tfopt-mnv2-{framework}-")
    x = _random_images(8 * steps, size)
    y = np.random.default_rng(1).integers(0, 1000, len(x))
    if framework == "tfopt":
        import keras

        import tfopt

        model = keras.applications.MobileNetV2(input_shape=(size, size, 3), weights=None)
        model.compile("sgd", "sparse_categorical_crossentropy")
        qat = tfopt.quantize_model(model, "int8")
        qat.compile("sgd", "sparse_categorical_crossentropy")
        qat.fit(x, y, batch_size=8, epochs=1, verbose=0)
        int8 = tfopt.export(qat, os.path.join(out_dir, "int8.tflite"), inputs=x[:8], precision="int8")
        fp32 = tfopt.export(model, os.path.join(out_dir, "float32.tflite"), inputs=x[:8])
        extra = {"float_ops": int8.float_ops, "top1_agreement": int8.top1_agreement}
    else:
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
        import tensorflow as tf
        import tensorflow_model_optimization as tfmot
        import tf_keras

        model = tf_keras.applications.MobileNetV2(input_shape=(size, size, 3), weights=None)
        qat = tfmot.quantization.keras.quantize_model(model)
        qat.compile("sgd", "sparse_categorical_crossentropy")
        qat.fit(x, y, batch_size=8, epochs=1, verbose=0)

        def convert(m, quantize):
            converter = tf.lite.TFLiteConverter.from_keras_model(m)
            if quantize:
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
            return converter.convert()

        paths = {}
        for name, m, q in (("int8", qat, True), ("float32", model, False)):
            paths[name] = os.path.join(out_dir, f"{name}.tflite")
            with open(paths[name], "wb") as f:
                f.write(convert(m, q))
        from tfopt.litert import float_ops

        with open(paths["int8"], "rb") as f:
            extra = {"float_ops": float_ops(f.read()), "top1_agreement": None}

        class R:
            def __init__(self, path):
                self.path = path

        int8, fp32 = R(paths["int8"]), R(paths["float32"])
    print("RESULT " + json.dumps({"int8": int8.path, "float32": fp32.path, **extra}))


def mobilenet(args):
    from _common import table, write_section
    from tfopt.litert import litert_latency_ms

    files = {}
    for framework in ("tfopt", "tfmot"):
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--worker", framework, "--size", str(args.size)],
            capture_output=True, text=True,
        )
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            print(out.stdout[-2000:], out.stderr[-4000:])
            raise SystemExit(f"{framework} worker failed")
        files[framework] = json.loads(lines[0][len("RESULT "):])
    images = [_random_images(1, args.size, seed=2)]
    content = {(fw, p): open(files[fw][p], "rb").read() for fw in files for p in ("int8", "float32")}
    times = {key: [] for key in content}
    for _ in range(args.rounds):  # interleaved
        for key, blob in content.items():
            times[key].append(litert_latency_ms(blob, images, runs=50))
    rows = []
    for fw, label in (("tfopt", "Keras 3 + tfopt"), ("tfmot", "tf_keras + tfmot")):
        f32, i8 = len(content[(fw, "float32")]), len(content[(fw, "int8")])
        t32, t8 = statistics.median(times[(fw, "float32")]), statistics.median(times[(fw, "int8")])
        rows.append({
            "framework": label,
            "float32 bytes": f"{f32:,}", "int8 bytes": f"{i8:,}", "size int8/float": f"{i8 / f32:.3f}x",
            "float32 ms": f"{t32:.2f}", "int8 ms": f"{t8:.2f}", "latency int8/float": f"{t8 / t32:.3f}x",
            "float ops left in int8": ", ".join(sorted(set(files[fw]["float_ops"]))) or "none",
        })
    body = table(rows, list(rows[0]))
    agreement = files["tfopt"]["top1_agreement"]
    body += (
        f"\n\nMobileNetV2 (alpha 1.0, {args.size}x{args.size}x3, 1000 classes, `weights=None`), QAT for one epoch "
        f"of 8 random batches of 8 to set ranges; LiteRT interpreter, batch 1, one thread, median over "
        f"{args.rounds} interleaved rounds of 50 runs. tfopt's int8 file agrees with its Keras QAT model on "
        f"{agreement:.0%} of the check images (untrained model: not an accuracy figure). "
        "Targets: size <= 0.27x, latency <= 0.6x."
    )
    print(body)
    if not args.no_write:
        write_section("qat-mobilenet", "QAT: MobileNetV2 LiteRT int8 vs float32",
                      f"python benchmarks/quantization.py --part mobilenet --rounds {args.rounds} --size {args.size}",
                      body)


# --- sequence models: transformer and keyword spotting ------------------------------
def _transformer(dim=64, heads=4, blocks=2):
    import keras

    layers = keras.layers
    inputs = keras.Input((8, 8))
    x = layers.Dense(dim)(inputs)
    for _ in range(blocks):
        h = layers.LayerNormalization(epsilon=1e-6)(x)
        x = layers.Add()([x, layers.MultiHeadAttention(heads, dim // heads)(h, h)])
        h = layers.LayerNormalization(epsilon=1e-6)(x)
        x = layers.Add()([x, layers.Dense(dim)(layers.Dense(2 * dim, activation="gelu")(h))])
    x = layers.GlobalAveragePooling1D()(layers.LayerNormalization(epsilon=1e-6)(x))
    return keras.Model(inputs, layers.Dense(10)(x), name="transformer")


def _keyword_spotter():
    import keras

    layers = keras.layers
    inputs = keras.Input((49, 40))
    x = inputs
    for filters, stride in ((64, 1), (64, 2), (96, 2), (128, 1)):
        x = layers.Conv1D(filters, 3, strides=stride, padding="same", use_bias=False)(x)
        x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, layers.Dense(10)(x), name="keyword_spotter")


def _keyword_data(seed=0, per_class=200):
    """Generated keyword-spotting-shaped data: (n, 49, 40) 'MFCC frames', 10 classes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    templates = rng.normal(size=(10, 49 + 10, 40))
    kernel = np.ones(5) / 5  # smooth in time
    templates = np.apply_along_axis(lambda v: np.convolve(v, kernel, "same"), 1, templates)
    x, y = [], []
    for c in range(10):
        for _ in range(per_class):
            shift = rng.integers(0, 11)
            x.append(templates[c, shift:shift + 49] + rng.normal(scale=1.0, size=(49, 40)))
            y.append(c)
    x, y = np.asarray(x, "float32"), np.asarray(y, "int32")
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    n_test = len(x) // 5
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def _sequence_case(name, build, data, epochs, finetune_epochs, out_dir):
    import keras

    import tfopt
    from tfopt.demo.data import compile_classifier, litert_accuracy

    x_train, y_train, x_test, y_test = data
    keras.utils.set_random_seed(0)
    model = build()
    compile_classifier(model, 2e-3)
    model.fit(x_train, y_train, batch_size=64, epochs=epochs, verbose=0)
    float_accuracy = float(model.evaluate(x_test, y_test, verbose=0)[1])
    files = {"float32": tfopt.export(model, os.path.join(out_dir, f"{name}-f32.tflite"), check=False).path}
    qat = tfopt.quantize_model(model, "int8")
    compile_classifier(qat, 5e-4)
    qat.fit(x_train, y_train, batch_size=64, epochs=finetune_epochs, verbose=0)
    qat_accuracy = float(qat.evaluate(x_test, y_test, verbose=0)[1])
    calibration = x_train[:500]
    reports = {}
    for precision in ("int8", "int16x8"):
        # int8 from the ranges QAT trained alone (no data: what the file holds is what trained);
        # int16x8 has no quantization-aware path and is calibrated.
        reports[precision] = tfopt.export(
            qat, os.path.join(out_dir, f"{name}-{precision}.tflite"), inputs=x_test, precision=precision,
            representative_data=calibration if precision == "int16x8" else None)
        files[precision] = reports[precision].path
    accuracy = {p: litert_accuracy(path, x_test, y_test) for p, path in files.items()}
    return dict(float_accuracy=float_accuracy, qat_accuracy=qat_accuracy, files=files, accuracy=accuracy,
                reports=reports, x_test=x_test)


def sequence(args):
    from _common import table, write_section
    from tfopt.litert import litert_latency_ms
    from tfopt.demo.data import load_digits

    out_dir = tempfile.mkdtemp(prefix="tfopt-bench-")
    digits = load_digits(0)
    digits = (digits[0][..., 0], digits[1], digits[2][..., 0], digits[3])
    cases = {
        "transformer (digits rows)": _sequence_case("transformer", _transformer, digits, args.epochs * 3,
                                                    args.finetune_epochs, out_dir),
        "keyword spotting Conv1D (generated)": _sequence_case("kws", _keyword_spotter, _keyword_data(),
                                                              args.epochs, args.finetune_epochs, out_dir),
    }
    content = {(c, p): open(path, "rb").read() for c, r in cases.items() for p, path in r["files"].items()}
    times = {key: [] for key in content}
    for _ in range(args.rounds):  # interleaved
        for (case, precision), blob in content.items():
            times[(case, precision)].append(litert_latency_ms(blob, [cases[case]["x_test"][:1]], runs=50))
    rows = []
    for case, r in cases.items():
        f32_bytes, f32_ms = len(content[(case, "float32")]), statistics.median(times[(case, "float32")])
        for precision in ("float32", "int8", "int16x8"):
            size, ms = len(content[(case, precision)]), statistics.median(times[(case, precision)])
            report = r["reports"].get(precision)
            rows.append({
                "model": case, "file": precision,
                "LiteRT accuracy": f"{100 * r['accuracy'][precision]:.2f}",
                "vs float (points)": "" if precision == "float32" else
                f"{100 * (r['accuracy'][precision] - r['accuracy']['float32']):+.2f}",
                "agreement with Keras": "" if report is None else f"{report.top1_agreement:.1%}",
                "bytes": f"{size:,}", "size vs float": f"{size / f32_bytes:.2f}x",
                "ms": f"{ms:.3f}", "latency vs float": f"{ms / f32_ms:.2f}x",
                "float ops": "" if report is None else (", ".join(sorted(set(report.float_ops))) or "none"),
                "ranges": "" if report is None else report.activation_ranges,
            })
    body = table(rows, list(rows[0]))
    body += "\n\n" + "; ".join(
        f"{case}: Keras float {100 * r['float_accuracy']:.2f}%, Keras QAT {100 * r['qat_accuracy']:.2f}%"
        for case, r in cases.items())
    body += (
        f".\n\nFloat training then {args.finetune_epochs} epochs of QAT (`tfopt.quantize_model`, int8); int8 and "
        "int16x8 files exported from the QAT model: int8 without representative_data, from the ranges "
        "trained in QAT alone (the transformer's LayerNormalization and attention are quantization-aware "
        "twins), int16x8 calibrated on 500 training inputs ('ranges' column). LiteRT interpreter, batch 1, one thread, median over "
        f"{args.rounds} interleaved rounds of 50 runs. Targets: int8 within 1 point of float at >= 99% "
        "agreement; file <= 0.3x; latency <= 0.6x."
    )
    print(body)
    if not args.no_write:
        write_section("qat-sequence", "QAT: transformer and keyword-spotting Conv1D, float vs int8 vs int16x8",
                      f"python benchmarks/quantization.py --part sequence --rounds {args.rounds} "
                      f"--epochs {args.epochs} --finetune-epochs {args.finetune_epochs}", body)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["accuracy", "mobilenet", "sequence"], default="accuracy")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--worker", choices=["tfopt", "tfmot"])
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.size, steps=8)
    elif args.part == "accuracy":
        accuracy(args)
    elif args.part == "sequence":
        sequence(args)
    else:
        mobilenet(args)


if __name__ == "__main__":
    main()
