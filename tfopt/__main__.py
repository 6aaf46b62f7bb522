"""The `tfopt` command line (`python -m tfopt ...`)."""

import argparse
import os
import sys


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
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.command == "demo":
        from tfopt import demo

        if not 0.0 <= args.sparsity < 1.0:
            print(f"tfopt demo: --sparsity must be in [0, 1). Received: {args.sparsity}", file=sys.stderr)
            return 2
        if args.epochs < 1 or args.finetune_epochs < 1 or args.recipe_epochs < 0 or args.transfer < 0:
            print("tfopt demo: --epochs and --finetune-epochs must be >= 1, --recipe-epochs and "
                  "--transfer >= 0.", file=sys.stderr)
            return 2
        demo.run(epochs=args.epochs, finetune_epochs=args.finetune_epochs, sparsity=args.sparsity,
                 out_dir=args.out, seed=args.seed)
        if args.recipe_epochs:
            print("\nDistilled, pruned and int8 in one fit, vs the float teacher:\n")
            demo.combined_recipe(epochs=args.recipe_epochs, sparsity=args.sparsity, transfer=args.transfer,
                                 seed=args.seed, out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
