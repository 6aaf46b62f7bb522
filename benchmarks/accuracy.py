"""Digits accuracy and LiteRT size: dense vs 50/80/90% unstructured and 2:4.

For each seed: train the demo CNN (`tfopt.demo.data.build_cnn`) for `--epochs`,
then from that checkpoint either keep training it dense for `--finetune-epochs`
(the dense baseline, same total epochs) or prune a copy with
`PolynomialDecay(0 -> target, "0%" -> "50%")` while fine-tuning for the same
epochs. Accuracy is measured on the held-out 20% of digits; sizes are the
exported `.tflite` file raw and gzipped.

Usage:
    python benchmarks/accuracy.py [--seeds 3] [--no-write]
"""

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

CONFIGS = [("unstructured 50%", 0.5, None), ("unstructured 80%", 0.8, None),
           ("unstructured 90%", 0.9, None), ("2:4 (50%)", 0.5, "2:4")]


def run_seed(seed, epochs, finetune_epochs, out_dir):

    import tfopt
    from tfopt.demo.data import compile_classifier, build_cnn

    from _common import pretrained_digits_cnn

    snapshot, (x_train, y_train, x_test, y_test) = pretrained_digits_cnn(seed, epochs)

    def finish(model, callbacks):
        compile_classifier(model, learning_rate=5e-4)
        model.fit(x_train, y_train, batch_size=32, epochs=finetune_epochs, verbose=0, callbacks=callbacks)
        accuracy = float(model.evaluate(x_test, y_test, verbose=0)[1])
        return accuracy

    results = {}
    dense = build_cnn()
    dense.set_weights(snapshot)
    acc = finish(dense, [])
    report = tfopt.export(dense, os.path.join(out_dir, f"dense-{seed}.tflite"), check=False)
    results["dense"] = (acc, 0.0, report.size_bytes, report.gzip_bytes)
    for name, target, structure in CONFIGS:
        start = build_cnn()
        start.set_weights(snapshot)
        schedule = tfopt.schedules.PolynomialDecay(0.0, target, "0%", "50%", frequency="5%")
        pruned = tfopt.prune(start, schedule, structure=structure)
        acc = finish(pruned, [tfopt.callbacks.Pruning()])
        report = tfopt.export(pruned, os.path.join(out_dir, f"{name.split()[0]}-{seed}.tflite"),
                              inputs=x_test[:16])
        results[name] = (acc, tfopt.summary(pruned, print_fn=None)[-1]["sparsity"],
                         report.size_bytes, report.gzip_bytes)
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--finetune-epochs", type=int, default=20)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    from _common import table, write_section

    out_dir = tempfile.mkdtemp(prefix="tfopt-bench-")
    per_seed = [run_seed(s, args.epochs, args.finetune_epochs, out_dir) for s in range(args.seeds)]
    names = ["dense"] + [c[0] for c in CONFIGS]
    dense_acc = statistics.mean(r["dense"][0] for r in per_seed)
    dense_gz = statistics.mean(r["dense"][3] for r in per_seed)
    rows = []
    for name in names:
        accs = [r[name][0] for r in per_seed]
        mean = statistics.mean(accs)
        spread = statistics.pstdev(accs)
        gz = statistics.mean(r[name][3] for r in per_seed)
        rows.append({
            "model": name,
            "accuracy (mean ± sd)": f"{100 * mean:.2f} ± {100 * spread:.2f}",
            "drop vs dense (points)": f"{100 * (dense_acc - mean):+.2f}" if name != "dense" else "",
            "model sparsity": f"{statistics.mean(r[name][1] for r in per_seed):.3f}",
            ".tflite bytes": f"{statistics.mean(r[name][2] for r in per_seed):,.0f}",
            "gzip bytes": f"{gz:,.0f}",
            "gzip vs dense": f"{gz / dense_gz:.3f}x",
        })
    body = table(rows, list(rows[0]))
    body += (
        f"\n\n{args.seeds} seeds; digits (scikit-learn, 1,797 8x8 images, 20% held out); demo CNN "
        f"(Conv2D 32, pool, Conv2D 64, pool, Dense 128, Dense 10); {args.epochs} dense epochs, then "
        f"{args.finetune_epochs} epochs of dense training or pruning fine-tune (PolynomialDecay 0 -> target "
        "over the first 50%). 'model sparsity' counts zeros over all parameters (biases included; "
        "2:4 leaves the 1-input-channel first conv dense). Targets: <= 1 point drop at 80%; gzip <= 0.35x at 80%."
    )
    print(body)
    if not args.no_write:
        write_section("accuracy", "Digits accuracy and LiteRT size by sparsity",
                      f"python benchmarks/accuracy.py --seeds {args.seeds} --epochs {args.epochs} "
                      f"--finetune-epochs {args.finetune_epochs}", body)


if __name__ == "__main__":
    main()
