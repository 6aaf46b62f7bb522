"""Training step time of pruned (or QAT) vs plain models: tfopt on Keras 3, tfmot on tf_keras.

Each framework runs in its own worker process (importing tfmot switches
`tf.keras` to Keras 2 for the whole process). Inside a worker, the plain and
pruned variants of the same model alternate round by round; the driver also
alternates the workers. The figure per variant is the median over rounds of
the mean time of a training step (batches after a warm-up, measured by a
callback around each `train_on_batch`-sized step of `fit`).

With `--baseline DIR` (another checkout of tfopt, e.g. `git worktree add
/tmp/base <rev>`), a third worker runs the same Keras 3 variants on that
tfopt, alternating with the others, and the table gains its rows and the
ratio of this tree's tfopt step time to the baseline's: the check that a
change costs nothing per step.

`--device cpu` hides any GPU from the workers (CUDA_VISIBLE_DEVICES=-1);
`--device gpu` requires one (TensorFlow places the training on it); `auto`
(the default) uses a GPU when TensorFlow sees one. The device is written with
the figures (a separate RESULTS.md section for GPU runs).

`--backend jax` measures tfopt on Keras's JAX backend instead (workers with
KERAS_BACKEND=jax, every variant jit-compiled, as Keras does by default under
JAX): plain, pruning (tfopt layers and the callback, mask update every
`--frequency` steps) and int8 QAT interleaved in one worker; and a second
worker on 2 devices (2 forced host devices on a CPU,
XLA_FLAGS=--xla_force_host_platform_device_count=2) under
`keras.distribution.DataParallel` from `tfopt.strategies.auto_distribution()`,
plain against the pruning callback. tfmot has no JAX counterpart.

Usage:
    python benchmarks/step_time.py [--mode prune|qat] [--rounds 5] [--steps 60] [--no-write]
                                   [--baseline DIR] [--device auto|cpu|gpu] [--frequency 100] [--jit]
                                   [--schedule constant|polynomial] [--backend tensorflow|jax]
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SPARSITY, BATCH = 0.8, 64
FREQUENCY = int(os.environ.get("TFOPT_BENCH_FREQUENCY", "100"))  # mask updates every N steps (--frequency)
JIT = os.environ.get("TFOPT_BENCH_JIT") == "1"  # compile(jit_compile=True) for every variant (--jit)
# "constant": ConstantSparsity (after its first update, each update finds the same mask);
# "polynomial": a ramp from 0 that never ends within the run, so every update searches (--schedule).
SCHEDULE = os.environ.get("TFOPT_BENCH_SCHEDULE", "constant")


def _schedule(schedules):
    """The benchmark's schedule from a module with tfopt's / tfmot's schedule classes."""
    if SCHEDULE == "polynomial":
        return schedules.PolynomialDecay(0.0, SPARSITY, begin_step=0, end_step=100_000, frequency=FREQUENCY)
    return schedules.ConstantSparsity(SPARSITY, begin_step=0, frequency=FREQUENCY)


def _timer_callback(keras_module, warmup):
    # A callback that is not async-safe gets Python numbers as logs, so under JAX (whose
    # dispatch is asynchronous) `on_train_batch_end` runs after the step has finished.
    class StepTimer(keras_module.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_train_batch_begin(self, batch, logs=None):
            self._t = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            if batch >= warmup:
                self.times.append(time.perf_counter() - self._t)

    return StepTimer()


def _build(layers, model, keras_module):
    if model == "cnn":
        return keras_module.Sequential([
            keras_module.Input((28, 28, 1)),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dense(10),
        ])
    return keras_module.Sequential([
        keras_module.Input((784,)),
        layers.Dense(512, activation="relu"),
        layers.Dense(512, activation="relu"),
        layers.Dense(10),
    ])


def _data(model, steps, np):
    rng = np.random.default_rng(0)
    shape = (28, 28, 1) if model == "cnn" else (784,)
    n = steps * BATCH
    return rng.standard_normal((n,) + shape).astype("float32"), rng.integers(0, 10, n)


def worker_keras3(model_name, rounds, steps, mode="prune"):
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import keras
    import numpy as np

    import tfopt

    x, y = _data(model_name, steps, np)
    schedule = _schedule(tfopt.schedules)

    def compiled(model):
        model.compile(keras.optimizers.Adam(1e-3),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=JIT)
        return model

    keras.utils.set_random_seed(0)
    plain = compiled(_build(keras.layers, model_name, keras))
    if mode == "qat":
        qat = compiled(tfopt.quantize_model(_build(keras.layers, model_name, keras)))
        return _run_rounds({"plain": (plain, []), "tfopt QAT int8": (qat, [])}, x, y, rounds, keras)
    layers_model = compiled(tfopt.prune(_build(keras.layers, model_name, keras), schedule))
    callback_model = compiled(_build(keras.layers, model_name, keras))
    variants = {
        "plain": (plain, []),
        "tfopt layers": (layers_model, []),
        "tfopt callback": (callback_model, [tfopt.callbacks.Pruning(schedule)]),
    }
    return _run_rounds(variants, x, y, rounds, keras)


def worker_jax(model_name, rounds, steps, devices=1):
    """Plain, pruning and QAT variants under KERAS_BACKEND=jax (set by the driver); with
    `devices` > 1, plain and the pruning callback under DataParallel over that many devices."""
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import jax
    import keras
    import numpy as np

    import tfopt

    assert keras.backend.backend() == "jax", keras.backend.backend()
    x, y = _data(model_name, steps, np)
    schedule = _schedule(tfopt.schedules)
    if devices > 1:
        distribution = tfopt.strategies.auto_distribution()
        if distribution.num_model_replicas != devices:
            raise SystemExit(f"--backend jax: asked for {devices} devices, JAX sees {len(jax.devices())}")
        keras.distribution.set_distribution(distribution)

    def compiled(model):
        model.compile(keras.optimizers.Adam(1e-3),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
        return model

    keras.utils.set_random_seed(0)
    variants = {
        "plain": (compiled(_build(keras.layers, model_name, keras)), []),
        "tfopt callback": (compiled(_build(keras.layers, model_name, keras)), [tfopt.callbacks.Pruning(schedule)]),
    }
    if devices == 1:
        # Under JAX, layers with their own schedule train with a bare Pruning() (it carries their masks).
        variants["tfopt layers"] = (compiled(tfopt.prune(_build(keras.layers, model_name, keras), schedule)),
                                    [tfopt.callbacks.Pruning()])
        variants["tfopt QAT int8"] = (compiled(tfopt.quantize_model(_build(keras.layers, model_name, keras))), [])
    results = _run_rounds(variants, x, y, rounds, keras)
    results["_device"] = [f"{len(jax.devices()[:devices])} {jax.devices()[0].platform.upper()}"]
    return results


def worker_tfmot(model_name, rounds, steps, mode="prune"):
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import numpy as np
    import tensorflow_model_optimization as tfmot
    import tf_keras

    x, y = _data(model_name, steps, np)
    tf_keras.utils.set_random_seed(0)
    schedule = _schedule(tfmot.sparsity.keras)

    def build(prune):
        model = _build(tf_keras.layers, model_name, tf_keras)
        if prune:
            model = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
        model.compile(tf_keras.optimizers.Adam(1e-3),
                      tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=JIT)
        return model

    if mode == "qat":
        def build_qat():
            model = tfmot.quantization.keras.quantize_model(_build(tf_keras.layers, model_name, tf_keras))
            model.compile(tf_keras.optimizers.Adam(1e-3),
                          tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=JIT)
            return model

        variants = {"plain": (build(False), []), "tfmot QAT int8": (build_qat(), [])}
        return _run_rounds(variants, x, y, rounds, tf_keras)
    variants = {
        "plain": (build(False), []),
        "tfmot": (build(True), [tfmot.sparsity.keras.UpdatePruningStep()]),
    }
    return _run_rounds(variants, x, y, rounds, tf_keras)


def _run_rounds(variants, x, y, rounds, keras_module):
    import numpy as np

    results = {name: [] for name in variants}
    for name, (model, callbacks) in variants.items():  # trace and warm up
        model.fit(x[: 4 * BATCH], y[: 4 * BATCH], batch_size=BATCH, epochs=1, verbose=0, callbacks=callbacks)
    for _ in range(rounds):
        for name, (model, callbacks) in variants.items():
            timer = _timer_callback(keras_module, warmup=3)
            model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, shuffle=False, callbacks=callbacks + [timer])
            results[name].append(float(np.mean(timer.times)))
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per worker run")
    parser.add_argument("--repeats", type=int, default=2, help="times each worker is started, alternating")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--baseline", help="another tfopt checkout to compare this one with (same run)")
    parser.add_argument("--worker", choices=["keras3", "tfmot", "jax", "jax2"])
    parser.add_argument("--backend", choices=["tensorflow", "jax"], default="tensorflow",
                        help="the Keras backend of tfopt's runs (jax: pruning, QAT and a 2-device DataParallel row)")
    parser.add_argument("--model", choices=["cnn", "mlp"], default="cnn")
    parser.add_argument("--mode", choices=["prune", "qat"], default="prune",
                        help="compare pruning (default) or quantization-aware training with plain training")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--frequency", type=int, default=100, help="pruning: steps between mask updates")
    parser.add_argument("--jit", action="store_true", help="compile every variant with jit_compile=True (XLA)")
    parser.add_argument("--schedule", choices=["constant", "polynomial"], default="constant",
                        help="pruning: ConstantSparsity, or a PolynomialDecay ramp in which every update searches")
    args = parser.parse_args()
    os.environ["TFOPT_BENCH_SCHEDULE"] = args.schedule
    os.environ["TFOPT_BENCH_FREQUENCY"] = str(args.frequency)  # (read by the workers at import)
    os.environ["TFOPT_BENCH_JIT"] = "1" if args.jit else "0"
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"  # (inherited by the workers)
        if args.backend == "jax":
            os.environ["JAX_PLATFORMS"] = "cpu"
    elif args.backend == "jax":
        pass  # JAX picks its default platform itself (the workers report it)
    elif not args.worker:
        probe = "import os; os.environ['TF_CPP_MIN_LOG_LEVEL']='3'; import tensorflow as tf; " \
                "print(len(tf.config.list_physical_devices('GPU')))"
        gpus = int((subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.split()
                    or ["0"])[-1])
        if args.device == "gpu" and not gpus:
            raise SystemExit("--device gpu: TensorFlow sees no GPU here.")
        args.device = "gpu" if gpus else "cpu"

    if args.worker in ("jax", "jax2"):
        print("RESULT " + json.dumps(worker_jax(args.model, args.rounds, args.steps, 2 if args.worker == "jax2" else 1)))
        return
    if args.worker:
        fn = worker_keras3 if args.worker == "keras3" else worker_tfmot
        print("RESULT " + json.dumps(fn(args.model, args.rounds, args.steps, args.mode)))
        return

    from _common import median, table, write_section

    if args.backend == "jax":
        return main_jax(args, median, table, write_section)

    rows, versus = [], []
    workers = ["keras3", "tfmot"] + (["baseline"] if args.baseline else [])
    for model_name in ("cnn", "mlp"):
        merged = {worker: {} for worker in workers}
        for _ in range(args.repeats):
            for worker in workers:
                env = dict(os.environ)
                if worker == "baseline":
                    env["PYTHONPATH"] = os.path.abspath(args.baseline) + os.pathsep + env.get("PYTHONPATH", "")
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", "tfmot" if worker == "tfmot" else "keras3",
                     "--model", model_name, "--mode", args.mode,
                     "--rounds", str(args.rounds), "--steps", str(args.steps)],
                    capture_output=True, text=True, check=True, env=env,
                )
                line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
                for name, times in json.loads(line[7:]).items():
                    merged[worker].setdefault(name, []).extend(times)
        k3, tm = merged["keras3"], merged["tfmot"]
        ours = ("tfopt QAT int8",) if args.mode == "qat" else ("tfopt layers", "tfopt callback")
        theirs = ("tfmot QAT int8",) if args.mode == "qat" else ("tfmot",)
        frameworks = [("Keras 3 + tfopt", k3, ours), ("tf_keras + tfmot", tm, theirs)]
        if args.baseline:
            frameworks.append(("Keras 3 + tfopt (baseline)", merged["baseline"], ours))
            for variant in ours:
                now, before = median(k3[variant]) / median(k3["plain"]), \
                    median(merged["baseline"][variant]) / median(merged["baseline"]["plain"])
                versus.append(f"{model_name} {variant}: this tree {now:.3f}x of plain, baseline {before:.3f}x "
                              f"(this / baseline step time, each against its own plain run: {now / before:.3f})")
        for framework, runs, variants in frameworks:
            base = median(runs["plain"])
            for variant in variants:
                ratios = [p / b for p, b in zip(runs[variant], runs["plain"])]
                rows.append({
                    "model": model_name,
                    "framework": framework,
                    "variant": variant,
                    "plain ms/step": f"{1000 * base:.2f}",
                    "optimized ms/step": f"{1000 * median(runs[variant]):.2f}",
                    "ratio (median of per-round ratios)": f"{median(ratios):.3f}x",
                })
    body = table(rows, ["model", "framework", "variant", "plain ms/step", "optimized ms/step",
                        "ratio (median of per-round ratios)"])
    what = ("int8 QAT (`tfopt.quantize_model` / `tfmot.quantization.keras.quantize_model`)"
            if args.mode == "qat" else
            f"Sparsity {SPARSITY} (`ConstantSparsity`, frequency {args.frequency})" if args.schedule == "constant" else
            f"Sparsity rising from 0 towards {SPARSITY} (`PolynomialDecay` to step 100000, frequency "
            f"{args.frequency}: every mask update searches for a new threshold)")
    target = ("Target: tfopt <= 1.10x and below tfmot's ratio." if args.mode == "qat"
              else "Target: tfopt <= 1.05x and below tfmot's ratio.")
    body += (
        f"\n\n{what}, batch {BATCH}, "
        f"{args.steps} steps per round, {args.rounds} rounds x {args.repeats} worker starts per framework, "
        "plain and optimized variants interleaved within each worker. CNN: Conv2D 32, pool, Conv2D 64, pool, Dense 128, "
        "Dense 10 on 28x28x1; MLP: 784-512-512-10. " + ("Every variant compiled with jit_compile=True (XLA). "
                                                        if args.jit else "") + target
    )
    if versus:
        body += "\n\nThis tree against the baseline checkout, same run:\n\n" + "\n".join(f"- {v}" for v in versus)
    print(body)
    if not args.no_write:
        section, title = (("qat_step_time", "Training step time, int8 QAT / plain") if args.mode == "qat"
                          else ("step_time", "Training step time, pruned / plain"))
        if args.mode == "prune" and args.frequency != 100:
            section, title = f"{section}_f{args.frequency}", f"{title}, mask update every {args.frequency} steps"
        if args.mode == "prune" and args.schedule == "polynomial":
            section, title = section + "_polynomial", title + ", rising sparsity (PolynomialDecay)"
        if args.device == "gpu":
            section, title = section + "_gpu", title + " (GPU)"
        if args.jit:
            section, title = section + "_jit", title + ", jit_compile=True"
        mode = " --mode qat" if args.mode == "qat" else ""
        write_section(section, title,
                      f"python benchmarks/step_time.py{mode} --rounds {args.rounds} --repeats {args.repeats} --steps {args.steps}"
                      + (" --baseline BASELINE_CHECKOUT" if args.baseline else "")
                      + (" --device gpu" if args.device == "gpu" else "")
                      + (f" --frequency {args.frequency}" if args.mode == "prune" and args.frequency != 100 else "")
                      + (" --jit" if args.jit else "")
                      + (" --schedule polynomial" if args.mode == "prune" and args.schedule == "polynomial" else ""),
                      body)


def main_jax(args, median, table, write_section):
    """The driver of `--backend jax`: the 1-device and 2-device workers alternate, `--repeats` times each."""
    rows = []
    for model_name in ("cnn", "mlp"):
        merged = {"jax": {}, "jax2": {}}
        for _ in range(args.repeats):
            for worker in merged:
                env = {**os.environ, "KERAS_BACKEND": "jax"}
                if worker == "jax2" and env.get("JAX_PLATFORMS", "cpu") == "cpu":
                    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
                out = subprocess.run(
                    [sys.executable, __file__, "--worker", worker, "--model", model_name, "--frequency",
                     str(args.frequency), "--rounds", str(args.rounds), "--steps", str(args.steps)],
                    capture_output=True, text=True, env=env,
                )
                if out.returncode:
                    raise SystemExit(f"worker {worker} ({model_name}) failed:\n{out.stderr[-4000:]}")
                line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
                for name, times in json.loads(line[7:]).items():
                    merged[worker].setdefault(name, []).extend(times)
        for worker, variants in (("jax", ("tfopt layers", "tfopt callback", "tfopt QAT int8")),
                                 ("jax2", ("tfopt callback",))):
            runs = merged[worker]
            base = median(runs["plain"])
            for variant in variants:
                ratios = [p / b for p, b in zip(runs[variant], runs["plain"])]
                rows.append({
                    "model": model_name,
                    "devices": runs["_device"][0] + (" DataParallel" if worker == "jax2" else ""),
                    "variant": variant,
                    "plain ms/step": f"{1000 * base:.2f}",
                    "optimized ms/step": f"{1000 * median(runs[variant]):.2f}",
                    "ratio (median of per-round ratios)": f"{median(ratios):.3f}x",
                })
    body = table(rows, ["model", "devices", "variant", "plain ms/step", "optimized ms/step",
                        "ratio (median of per-round ratios)"])
    pruning = (f"`ConstantSparsity({SPARSITY}, frequency={args.frequency})`" if args.schedule == "constant" else
               f"`PolynomialDecay` from 0 towards {SPARSITY} to step 100000, frequency {args.frequency}")
    body += (
        f"\n\nKERAS_BACKEND=jax, every variant jit-compiled (Keras's default under JAX), Adam, batch {BATCH} "
        f"(global: 32 a device on 2 devices). Pruning: {pruning}; QAT: `tfopt.quantize_model` (int8). "
        f"{args.steps} steps per round (the first 3 not timed), {args.rounds} rounds x {args.repeats} worker "
        "starts, plain and optimized variants interleaved within each worker; the 1-device and 2-device "
        "workers alternate. 2 devices on a CPU are 2 forced host devices "
        "(XLA_FLAGS=--xla_force_host_platform_device_count=2) sharing its cores, under "
        "`keras.distribution.DataParallel` from `tfopt.strategies.auto_distribution()`. CNN: Conv2D 32, pool, "
        "Conv2D 64, pool, Dense 128, Dense 10 on 28x28x1; MLP: 784-512-512-10. For reference, TensorFlow on this "
        "machine: pruning at frequency 10 1.01-1.07x, QAT 1.14-1.26x (sections above)."
    )
    from importlib.metadata import version

    body = f"JAX {version('jax')}.\n\n" + body
    print(body)
    if not args.no_write:
        write_section("step_time_jax", "Step time on JAX: pruned and QAT / plain, 1 and 2 devices",
                      f"python benchmarks/step_time.py --backend jax --rounds {args.rounds} --repeats {args.repeats} "
                      f"--steps {args.steps} --frequency {args.frequency}"
                      + (" --schedule polynomial" if args.schedule == "polynomial" else "")
                      + (" --device cpu" if args.device == "cpu" else ""), body)


if __name__ == "__main__":
    main()
