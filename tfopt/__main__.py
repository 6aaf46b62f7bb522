"""The `tfopt` command line (`tfopt ...` or `python -m tfopt ...`).

Commands: `demo`, `inspect MODEL.keras`, `export MODEL.keras -o OUT.tflite`.
User mistakes (missing or non-Keras files, unsafe files, bad arguments) print
one clear message to stderr and exit with status 2 (arguments) or 1 (files and
models), without a traceback.

Each command checks the arguments it can check before loading the model.
TensorFlow 2.21's C++ runtime and the LiteRT converter log through absl
whatever `TF_CPP_MIN_LOG_LEVEL` says, so under `python -m tfopt` the package
(`tfopt/__init__.py`, before TensorFlow loads) drops their routine log lines
from stderr (file descriptor 2, see `tfopt/_logs.py`); anything else, tfopt's
messages and Python tracebacks included, passes through. Set
`TF_CPP_MIN_LOG_LEVEL=0` to see TensorFlow's logs.
"""

import argparse
import os
import sys
import zipfile


# `tfopt.export`'s precisions, written out here so that `--help` does not
# import TensorFlow (tests/test_cli.py checks that they are the same).
PRECISIONS = ("float32", "float16", "int8", "int16x8", "int8_weight_only", "int8_dynamic", "int4_weight_only",
              "int4_dynamic", "int4_block32", "int4_block64", "int4_block128")


class UserError(Exception):
    """A mistake the user can fix: printed without a traceback, exit status 1."""


def _one_line(error):
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def _parser():
    parser = argparse.ArgumentParser(prog="tfopt", description="Model optimization for Keras 3.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="dense vs pruned CNN, and teacher vs distilled+pruned+int8 student, "
                                       "on bundled digits, exported to LiteRT")
    demo.add_argument("--epochs", type=int, default=12, help="dense training epochs (default 12)")
    demo.add_argument("--finetune-epochs", type=int, default=20, help="pruning epochs (default 20)")
    demo.add_argument("--sparsity", type=float, default=0.8, help="target sparsity (default 0.8)")
    demo.add_argument("--out", default=None, help="directory for the .tflite files (default: a temp dir)")
    demo.add_argument("--recipe-epochs", type=int, default=8,
                      help="epochs of the distill + prune + int8 student (default 8; 0 skips that part)")
    demo.add_argument("--transfer", type=int, default=5000,
                      help="unlabelled perturbed digits the teacher labels for the student (default 5000)")
    demo.add_argument("--plot", default=None,
                      help="write an accuracy-vs-size PNG here (default: OUT/accuracy_vs_size.png "
                           "when matplotlib is installed)")
    demo.add_argument("--seed", type=int, default=0)

    inspect = sub.add_parser("inspect", help="per-layer sparsity, bits, sizes and multiply-adds of a saved .keras model")
    inspect.add_argument("model", help="a .keras file")
    inspect.add_argument("--unsafe", action="store_true",
                         help="load files containing Python code (Lambda layers). Only for files you trust.")

    export = sub.add_parser("export", help="strip and export a saved .keras model to LiteRT, with a report")
    export.add_argument("model", help="a .keras file")
    export.add_argument("-o", "--output", required=True, help="the .tflite file to write")
    export.add_argument("--precision", choices=PRECISIONS, default="float32",
                        help="float32 (default); float16 weights; int8 (full integer: QAT ranges, or "
                        "--representative-data); int16x8 (with --representative-data); weight-quantized "
                        "files for language models: int8_weight_only, int8_dynamic, int4_weight_only, "
                        "int4_dynamic, int4_block32/64/128 (blockwise int4, dynamic; needs "
                        "pip install 'tfopt[litert-quantizer]' except int8_dynamic)")
    export.add_argument("--representative-data", default=None,
                        help="a .npy file of typical inputs: calibration for int8 (a model trained "
                        "without QAT, or one whose QAT file keeps float ops) and int16x8")
    export.add_argument("--unsafe", action="store_true",
                        help="load files containing Python code (Lambda layers). Only for files you trust.")
    return parser


def _load(path, unsafe):
    if not os.path.exists(path):
        raise UserError(f"no such file: {path}")
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory; expected a .keras file (a SavedModel directory is not supported).")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a Keras file (.keras files are zip archives written by `model.save`).")
    with zipfile.ZipFile(path) as archive:
        if "config.json" not in archive.namelist():
            raise UserError(f"{path} is a zip archive but not a Keras model (no config.json inside).")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tfopt  # lazy: see the module docstring

    try:
        return tfopt.load_model(path, safe_mode=not unsafe)
    except ValueError as e:
        if "safe_mode" in str(e) or "unsafe" in str(e).lower():
            raise UserError(
                f"{path} contains Python code (e.g. a Lambda layer), which Keras will not load in safe mode: "
                "it could run anything. If you trust the file, pass --unsafe."
            ) from None
        raise UserError(f"cannot load {path}: {e}") from None


def _inspect(args):
    import tfopt  # lazy: see the module docstring

    model = _load(args.model, args.unsafe)
    print(f"{args.model}: model '{model.name}' ({type(model).__name__})")
    rows = tfopt.summary(model)
    print(f"multiply-adds per example: {rows[-1]['macs']}")


def _export(args):
    import numpy as np

    if not args.output.endswith(".tflite"):
        raise UserError(f"-o should name a .tflite file. Received: {args.output}")
    if os.path.isdir(args.output):
        raise UserError(f"-o {args.output} is a directory; expected the .tflite file to write. "
                        f"Fix: -o {os.path.join(args.output, 'model.tflite')}")
    data = None
    if args.representative_data:
        if not os.path.exists(args.representative_data):
            raise UserError(f"no such file: {args.representative_data}")
        try:
            data = np.load(args.representative_data)
        except (ValueError, OSError) as e:
            raise UserError(f"cannot read {args.representative_data} as a .npy array: {_one_line(e)}") from None
        if data.ndim == 0 or len(data) == 0:
            raise UserError(f"--representative-data {args.representative_data} holds no samples (shape "
                            f"{data.shape}). Fix: save a few hundred typical inputs, e.g. "
                            "np.save(path, x_train[:500]).")
    model = _load(args.model, args.unsafe)
    import tfopt  # lazy: see the module docstring

    try:
        report = tfopt.export(model, args.output, precision=args.precision,
                              representative_data=data if args.precision in ("int8", "int16x8") else None,
                              inputs=data[:64] if data is not None else None)
    except (ValueError, OSError) as e:
        raise UserError(_one_line(e).removeprefix("tfopt.export: ")) from None
    print(report)
    if args.precision in ("int8", "int16x8"):
        print(f"float ops left: {', '.join(sorted(set(report.float_ops))) or 'none'}")


def _demo(args):
    if not 0.0 <= args.sparsity < 1.0:
        print(f"tfopt demo: --sparsity must be in [0, 1). Received: {args.sparsity}", file=sys.stderr)
        return 2
    if args.epochs < 1 or args.finetune_epochs < 1 or args.recipe_epochs < 0 or args.transfer < 0:
        print("tfopt demo: --epochs and --finetune-epochs must be >= 1, --recipe-epochs and "
              "--transfer >= 0.", file=sys.stderr)
        return 2
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a file; expected a directory for the .tflite files. "
                        "Fix: --out a new or existing directory.")
    if args.plot is not None and os.path.isdir(args.plot):
        raise UserError(f"--plot {args.plot} is a directory; expected the .png file to write. "
                        f"Fix: --plot {os.path.join(args.plot, 'accuracy_vs_size.png')}")
    from tfopt import demo  # lazy: see the module docstring

    rows = demo.run(epochs=args.epochs, finetune_epochs=args.finetune_epochs, sparsity=args.sparsity,
                    out_dir=args.out, seed=args.seed)
    if args.recipe_epochs:
        print("\nDistilled, pruned and int8 in one fit, vs the float teacher:\n")
        recipe_rows, _ = demo.combined_recipe(epochs=args.recipe_epochs, sparsity=args.sparsity,
                                              transfer=args.transfer, seed=args.seed, out_dir=args.out)
        rows = rows + recipe_rows
    plot = args.plot or (os.path.join(args.out, "accuracy_vs_size.png") if args.out else None)
    if plot:
        from tfopt import plots  # lazy: see the module docstring

        try:
            plots.plot_accuracy_vs_size(rows, plot, accuracy_key="litert accuracy")
            print(f"\nplot: {plot}")
        except ImportError as e:
            if args.plot:
                raise UserError(str(e)) from None
    return 0


def main(argv=None):
    args = _parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        if args.command == "demo":
            return _demo(args)
        if args.command == "inspect":
            _inspect(args)
        elif args.command == "export":
            _export(args)
    except UserError as e:
        print(f"tfopt {args.command}: {_one_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
