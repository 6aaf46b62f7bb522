"""The command line, run as a user would: a subprocess."""

import os
import re
import subprocess
import sys
import tempfile

import pytest

from tfopt import testing


@pytest.mark.slow
class CliTest(testing.TestCase):
    def test_demo_end_to_end_tiny(self):
        out = tempfile.mkdtemp()
        result = subprocess.run(
            [sys.executable, "-m", "tfopt", "demo", "--epochs", "1", "--finetune-epochs", "2", "--out", out,
             "--recipe-epochs", "1", "--transfer", "200"],
            capture_output=True, text=True, timeout=600,
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        lines = result.stdout.splitlines()
        self.assertTrue(lines[0].startswith("model"), result.stdout)
        dense = next(line for line in lines if line.startswith("dense"))
        pruned = next(line for line in lines if line.startswith("pruned 80%"))
        params, nonzeros = int(pruned.split()[4]), int(pruned.split()[5])
        self.assertEqual(int(dense.split()[3]), int(dense.split()[4]))
        self.assertLess(nonzeros, 0.3 * params)
        student = next(line for line in lines if line.startswith("student distilled + 80% pruned + int8"))
        self.assertTrue(any(line.startswith("teacher (float32)") for line in lines), result.stdout)
        self.assertEqual(len(student.split()), 13)  # name (7 words) + 6 figures
        self.assertEqual(sorted(os.listdir(out)), ["accuracy_vs_size.png", "dense.tflite", "pruned.tflite", "shrunk.tflite",
                                                  "student.tflite", "teacher.tflite"])
        self.assertGreater(os.path.getsize(os.path.join(out, "accuracy_vs_size.png")), 1000)


def _saved_models(directory):
    """A pruned model, a QAT model, and a model with a Lambda layer, saved as .keras files."""
    import keras
    import numpy as np

    import tfopt

    x = np.random.default_rng(0).standard_normal((32, 8)).astype("float32")
    pruned = keras.Sequential([keras.Input((8,)), tfopt.layers.Dense(16, pruning_schedule=tfopt.schedules.ConstantSparsity(
        0.5, 0, frequency=1), name="hidden"), keras.layers.Dense(3, name="head")])
    pruned.compile("adam", "mse")
    pruned.fit(x, np.zeros((32, 3)), verbose=0)
    qat = tfopt.quantize_model(keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="relu"),
                                                 keras.layers.Dense(3)]))
    qat(x, training=True)
    lam = keras.Sequential([keras.Input((8,)), keras.layers.Lambda(lambda t: t * 2.0), keras.layers.Dense(3)])
    paths = {}
    for name, model in (("pruned", pruned), ("qat", qat), ("lambda", lam)):
        paths[name] = os.path.join(directory, f"{name}.keras")
        model.save(paths[name])
    paths["data"] = os.path.join(directory, "data.npy")
    np.save(paths["data"], x)
    return paths


class CliCommandsTest(testing.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.dir = tempfile.mkdtemp()
        cls.paths = _saved_models(cls.dir)

    def _main(self, *argv):
        import contextlib
        import io

        from tfopt.__main__ import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def test_export_of_a_qat_model_is_full_integer(self):
        out = os.path.join(self.dir, "qat.tflite")
        code, stdout, err = self._main("export", self.paths["qat"], "-o", out, "--precision", "int8")
        self.assertEqual(code, 0, err)
        self.assertIn("float ops left: none", stdout)
        self.assertGreater(os.path.getsize(out), 0)

    def test_bad_arguments_exit_2_without_traceback(self):
        code, _, err = self._main("demo", "--sparsity", "1.5")
        self.assertEqual(code, 2)
        self.assertIn("--sparsity must be in [0, 1). Received: 1.5", err)
        self.assertNotIn("Traceback", err)

    def test_export_float16_and_post_training_int8(self):
        out = os.path.join(self.dir, "p16.tflite")
        code, stdout, _ = self._main("export", self.paths["pruned"], "-o", out, "--precision", "float16")
        self.assertEqual(code, 0)
        self.assertIn("bytes", stdout)
        out8 = os.path.join(self.dir, "p8.tflite")
        code, _, err = self._main("export", self.paths["pruned"], "-o", out8, "--precision", "int8")
        self.assertEqual(code, 1)
        self.assertIn("representative_data", err)
        self.assertNotIn("Traceback", err)
        code, stdout, err = self._main("export", self.paths["pruned"], "-o", out8, "--precision", "int8",
                                       "--representative-data", self.paths["data"])
        self.assertEqual(code, 0, err)
        self.assertIn("float ops left: none", stdout)
        out16 = os.path.join(self.dir, "p16x8.tflite")
        code, stdout, err = self._main("export", self.paths["pruned"], "-o", out16, "--precision", "int16x8",
                                       "--representative-data", self.paths["data"])
        self.assertEqual(code, 0, err)
        self.assertIn("float ops left: none", stdout)

    def test_precisions_are_the_exports(self):
        from tfopt import exporting
        from tfopt.__main__ import PRECISIONS

        self.assertEqual(PRECISIONS, exporting._PRECISIONS)

    def test_export_weight_quantized(self):
        out = os.path.join(self.dir, "weights.tflite")
        code, stdout, err = self._main("export", self.paths["pruned"], "-o", out, "--precision", "int8_weight_only",
                                       "--representative-data", self.paths["data"])
        self.assertEqual(code, 0, err)
        self.assertIn("the float32 file, top-1 agreement", stdout)
        self.assertGreater(os.path.getsize(out), 0)

    def test_user_mistakes_are_one_line_and_exit_1(self):
        text = os.path.join(self.dir, "notes.txt")
        with open(text, "w") as f:
            f.write("hello")
        import zipfile

        bare_zip = os.path.join(self.dir, "bare.keras")
        with zipfile.ZipFile(bare_zip, "w") as z:
            z.writestr("x.txt", "x")
        cases = [
            (("inspect", os.path.join(self.dir, "missing.keras")), "no such file"),
            (("inspect", text), "is not a Keras file"),
            (("inspect", bare_zip), "not a Keras model (no config.json"),
            (("inspect", self.dir), "is a directory"),
            (("export", self.paths["pruned"], "-o", os.path.join(self.dir, "x.bin")), "-o should name a .tflite"),
            (("inspect", self.paths["lambda"]), "pass --unsafe"),
        ]
        import numpy as np

        wrong = os.path.join(self.dir, "wrong.npy")
        np.save(wrong, np.zeros((4, 9), "float32"))  # the model takes 8 features
        empty = os.path.join(self.dir, "empty.npy")
        np.save(empty, np.zeros((0, 8), "float32"))
        directory = os.path.join(self.dir, "out.tflite")
        os.makedirs(directory, exist_ok=True)
        cases += [
            (("export", self.paths["pruned"], "-o", os.path.join(self.dir, "w.tflite"), "--precision", "int8",
              "--representative-data", wrong),
             "`representative_data` does not fit model 'sequential', input 'input_layer': expected shape (None, 8)"),
            (("export", self.paths["pruned"], "-o", os.path.join(self.dir, "w.tflite"), "--representative-data", wrong),
             "`inputs` does not fit model"),
            (("export", self.paths["pruned"], "-o", os.path.join(self.dir, "e.tflite"), "--precision", "int8",
              "--representative-data", empty), "holds no samples (shape (0, 8))"),
            (("export", self.paths["pruned"], "-o", directory), f"-o {directory} is a directory"),
            (("demo", "--out", text), f"--out {text} is a file"),
            (("demo", "--plot", self.dir), f"--plot {self.dir} is a directory"),
        ]
        for argv, needle in cases:
            code, _, err = self._main(*argv)
            self.assertEqual(code, 1, argv)
            self.assertIn(needle, err, argv)
            self.assertNotIn("Traceback", err, argv)
            self.assertEqual(len(err.strip().splitlines()), 1, err)

    def test_unsafe_flag_loads_trusted_code(self):
        code, stdout, err = self._main("inspect", self.paths["lambda"], "--unsafe")
        self.assertEqual(code, 0, err)

    def test_inspect_counts_recurrent_layers(self):
        import keras

        bidirectional = keras.Sequential([keras.Input((10, 4)), keras.layers.Bidirectional(keras.layers.LSTM(8)),
                                          keras.layers.Dense(2)])
        open_length = keras.Sequential([keras.Input((None, 4)), keras.layers.LSTM(8, name="lstm"),
                                        keras.layers.Dense(2)])
        paths = {}
        for name, model in (("bidirectional", bidirectional), ("open_length", open_length)):
            paths[name] = os.path.join(self.dir, f"{name}.keras")
            model.save(paths[name])
        # 2 directions x 10 timesteps x (4 x 32 + 8 x 32), then 16 x 2 (before: 32, the LSTMs left out)
        code, stdout, err = self._main("inspect", paths["bidirectional"])
        self.assertEqual(code, 0, err)
        self.assertIn("multiply-adds per example: 7712", stdout)
        code, stdout, err = self._main("inspect", paths["open_length"])  # before: a TypeError
        self.assertEqual(code, 0, err)
        self.assertIn("multiply-adds per example: 16 + 384 per timestep", stdout)
        self.assertIn("macs: layers ['lstm'] run over a time axis of unknown length", stdout)

    def test_failed_export_keeps_the_previous_file(self):
        out = os.path.join(self.dir, "keep.tflite")
        with open(out, "wb") as f:
            f.write(b"previous good file")
        code, _, _ = self._main("export", self.paths["pruned"], "-o", out, "--precision", "int8")
        self.assertEqual(code, 1)
        with open(out, "rb") as f:
            self.assertEqual(f.read(), b"previous good file")


# What TensorFlow's C++ runtime, the converter and the interpreter print on their own.
_TF_SPAM = re.compile(r"absl::InitializeLog|oneDNN|cuda|cuInit|cpu_feature_guard|To enable the following instructions|"
                      r"Ignored output_format|Ignored drop_control|SavedModel|MLIR|XNNPACK|fully_quantize|"
                      r"^[IWEF]\d{4} ")


def _cli_runs():
    """`inspect`, `export` and a mistaken `export` of a tiny model, each as a user runs it: a
    fresh process whose environment does not set TF_CPP_MIN_LOG_LEVEL."""
    directory = tempfile.mkdtemp()
    paths = _saved_models(directory)
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "GRPC_VERBOSITY")}
    os.makedirs(os.path.join(directory, "dir.tflite"))
    runs = {}
    # `inspect` through the console script pip writes where there is one (every check of "inspect"
    # then holds for it too), else as `python -m tfopt`, which `export` and the mistake use.
    script = os.path.join(os.path.dirname(sys.executable), "tfopt")
    tfopt_command = [script] if os.path.exists(script) else [sys.executable, "-m", "tfopt"]
    for name, command in (("inspect", [*tfopt_command, "inspect", paths["pruned"]]),
                          ("export", [sys.executable, "-m", "tfopt", "export", paths["pruned"], "-o",
                                      os.path.join(directory, "p.tflite"), "--precision", "int8",
                                      "--representative-data", paths["data"]]),
                          ("mistake", [sys.executable, "-m", "tfopt", "export", paths["pruned"], "-o",
                                       os.path.join(directory, "p8.tflite"), "--precision", "int8"]),
                          ):
        runs[name] = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    runs["directory"] = directory
    return runs


@pytest.mark.slow
class CliSubprocessTest(testing.TestCase):
    """Every command started as a user starts it, in one test: each process costs
    a TensorFlow import, so they run once, in `_cli_runs`."""

    def test_commands_as_a_user_runs_them(self):
        runs = _cli_runs()
        for check in (self._no_converter_or_interpreter_logs, self._only_tfopt_output, self._inspect):
            with self.subTest(check.__name__):
                check(runs)

    def _no_converter_or_interpreter_logs(self, runs):
        for name in ("inspect", "export"):
            self.assertEqual(runs[name].returncode, 0, runs[name].stderr[-2000:])
        self.assertIn("total", runs["inspect"].stdout)
        self.assertIn("float ops left: none", runs["export"].stdout)
        for name, run in runs.items():
            if name == "directory":
                continue
            late = [line for line in run.stderr.splitlines()
                    if re.search(r"Ignored output_format|SavedModel|MLIR|XNNPACK|fully_quantize|cuInit", line)]
            self.assertEqual(late, [], f"{name}: {run.stderr[-3000:]}")
        mistake = runs["mistake"]
        self.assertEqual(mistake.returncode, 1)
        self.assertNotIn("Traceback", mistake.stderr)
        self.assertTrue(mistake.stderr.splitlines()[-1].startswith("tfopt export: Model 'sequential' has no "
                                                                   "quantization ranges"), mistake.stderr)

    def _only_tfopt_output(self, runs):
        for name in ("inspect", "export"):
            self.assertEqual(runs[name].returncode, 0, runs[name].stderr[-2000:])
            spam = [line for line in runs[name].stderr.splitlines() if _TF_SPAM.search(line)]
            self.assertEqual(spam, [], f"{name} printed TensorFlow logs")
            self.assertEqual(runs[name].stderr, "")
        self.assertEqual(len(runs["mistake"].stderr.splitlines()), 1, runs["mistake"].stderr)

    def _inspect(self, runs):
        result = runs["inspect"]
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertIn("hidden", result.stdout)
        self.assertIn("total", result.stdout)
