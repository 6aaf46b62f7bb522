"""int8 coverage of `keras.applications`: which architectures reach a full-integer LiteRT file.

Every application in `keras.applications` is built with `weights=None` at a
small input (32x32x3; 75 for the Inception family, 71 for Xception), copied by
`tfopt.quantize_model`, fit for one step on random images (to set ranges and
BatchNorm statistics), and exported with `precision="int8"`: first from its
quantization-aware ranges alone, then, if that file keeps float ops, with 16
random images as `representative_data` (every range calibrated). Each
architecture runs in its own process, with a time limit. Reported: the float
ops each file keeps (QUANTIZE/DEQUANTIZE at the edges aside), the file's
top-1 agreement with the Keras model on the check images (untrained models:
agreement, not accuracy), and the time taken.

Usage:
    python benchmarks/applications.py [--only MobileNetV2,ResNet50] [--timeout 600]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

_SIZES = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71}


def worker(name):
    import keras
    import numpy as np

    import tfopt

    size = _SIZES.get(name, 32)
    model = getattr(keras.applications, name)(input_shape=(size, size, 3), weights=None, classes=10)
    result = {"params": model.count_params()}
    try:
        qat = tfopt.quantize_model(model)
    except ValueError as e:  # layers tfopt does not know: say which, and go on with them in float
        result["refused"] = str(e).splitlines()[0][:200]
        qat = tfopt.quantize_model(model, unsupported="float")
    qat.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=False))
    x = np.random.default_rng(0).uniform(0, 255, (16, size, size, 3)).astype("float32")
    qat.fit(x[:8], np.arange(8), verbose=0)
    path = os.path.join(tempfile.mkdtemp(), f"{name}.tflite")
    report = tfopt.export(qat, path, inputs=x[:4], precision="int8")
    result["qat"] = {"float_ops": sorted(set(report.float_ops)), "agreement": report.top1_agreement,
                     "bytes": report.size_bytes}
    if report.float_ops:
        report = tfopt.export(qat, path, inputs=x[:4], precision="int8", representative_data=x)
        result["calibrated"] = {"float_ops": sorted(set(report.float_ops)), "agreement": report.top1_agreement,
                                "bytes": report.size_bytes}
    print("RESULT " + json.dumps(result))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--only", default="")
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    import keras

    from _common import table, write_section

    names = [n for n in dir(keras.applications) if n[0].isupper()]
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    rows, full = [], 0
    for name in names:
        start = time.perf_counter()
        try:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", name],
                                 capture_output=True, text=True, timeout=args.timeout)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            result = json.loads(lines[0][7:]) if lines else {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
        except subprocess.TimeoutExpired:
            result = {"error": f"over the {args.timeout} s limit"}
        seconds = time.perf_counter() - start

        def ops(part):
            return "" if part not in result else (", ".join(result[part]["float_ops"]) or "none (full integer)")

        integer = any(part in result and not result[part]["float_ops"] for part in ("qat", "calibrated"))
        full += integer
        best = result.get("calibrated", result.get("qat"))
        rows.append({
            "application": name, "params": f"{result['params']:,}" if "params" in result else "",
            "int8 from QAT ranges: float ops": ops("qat") or result.get("error", ""),
            "unknown layers (left float)": result.get("refused", "")[:120],
            "with representative_data: float ops": ops("calibrated"),
            "full integer": "yes" if integer else "**no**",
            "agreement": "" if not best else f"{best['agreement']:.0%}",
            "seconds": f"{seconds:.0f}",
        })
        print(rows[-1], flush=True)
    body = table(rows, list(rows[0]))
    body += (
        f"\n\n{full} of {len(rows)} applications reach a full-integer file. Built with `weights=None` at 32x32x3 "
        "(Inception family 75, Xception 71), `tfopt.quantize_model`, one fit step on 8 random images, "
        "`tfopt.export(precision='int8')`; where that file keeps float ops, again with 16 random images as "
        "representative_data. Agreement: top-1 of the file vs the Keras model on 4 random images (untrained "
        "models). One process per application."
    )
    print(body)
    if not args.no_write:
        only = f" --only {args.only}" if args.only else ""
        write_section("int8-applications", "int8 coverage of keras.applications",
                      f"python benchmarks/applications.py --timeout {args.timeout}{only}", body)


if __name__ == "__main__":
    main()
