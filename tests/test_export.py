"""export(): LiteRT parity, sizes, and never destroying a good file."""

import gzip
import os
import tempfile
from unittest import mock

import keras
import numpy as np

import tfopt
from tfopt import exporting as export_lib
from tfopt import testing


def _pruned_trained(sparsity=0.8):
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        tfopt.layers.Conv2D(16, 3, activation="relu", pruning_schedule=tfopt.schedules.ConstantSparsity(sparsity, frequency=1)),
        keras.layers.Flatten(),
        tfopt.layers.Dense(64, activation="relu", pruning_schedule=tfopt.schedules.ConstantSparsity(sparsity, frequency=1)),
        keras.layers.Dense(10),
    ])
    model.compile("adam", "mse")
    model.fit(np.random.default_rng(0).standard_normal((32, 8, 8, 1)), np.ones((32, 10)), verbose=0)
    return model


class ExportTest(testing.TestCase):
    def test_report_parity_and_sizes(self):
        model = _pruned_trained()
        path = os.path.join(tempfile.mkdtemp(), "m.tflite")
        x = self.make_input((5, 8, 8, 1))
        report = tfopt.export(model, path, inputs=x)
        with open(path, "rb") as f:
            content = f.read()
        self.assertEqual(report.size_bytes, len(content))
        self.assertEqual(report.gzip_bytes, len(gzip.compress(content, compresslevel=9)))
        self.assertEqual(report.num_check_samples, 5)
        self.assertLess(report.max_abs_diff, 1e-4)
        self.assertGreater(report.sparsity, 0.5)
        out = export_lib.run_litert(content, [x], input_names=["input_layer"])[0]
        self.assertAllClose(out, model(x), atol=1e-4)
        self.assertIn("gzipped", str(report))

    def test_pruned_file_compresses_much_better_than_dense(self):
        dense = _pruned_trained(sparsity=0.0)
        pruned = _pruned_trained(sparsity=0.8)
        d = tempfile.mkdtemp()
        dense_report = tfopt.export(dense, os.path.join(d, "dense.tflite"), check=False)
        pruned_report = tfopt.export(pruned, os.path.join(d, "pruned.tflite"), check=False)
        self.assertIsNone(dense_report.max_abs_diff)
        self.assertLess(pruned_report.gzip_bytes, 0.5 * dense_report.gzip_bytes)

    def test_multi_input_model_random_inputs(self):
        a, b = keras.Input((4,), name="a"), keras.Input((3,), name="b")
        out = tfopt.layers.Dense(2, pruning_schedule="baseline")(keras.layers.Concatenate()([a, b]))
        model = keras.Model([a, b], [out, keras.layers.Dense(5)(a)])
        report = tfopt.export(model, os.path.join(tempfile.mkdtemp(), "two.tflite"))
        self.assertLess(report.max_abs_diff, 1e-5)
        self.assertEqual(report.num_check_samples, 8)

    def test_failed_conversion_keeps_existing_file(self):
        path = os.path.join(tempfile.mkdtemp(), "keep.tflite")
        with open(path, "wb") as f:
            f.write(b"previous good file")
        with mock.patch.object(export_lib, "_convert", side_effect=RuntimeError("converter crashed")):
            with self.assertRaisesRegex(RuntimeError, "converter crashed"):
                tfopt.export(_pruned_trained(), path)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"previous good file")

    def test_interrupted_write_keeps_existing_file_and_leaves_no_temp(self):
        directory = tempfile.mkdtemp()
        path = os.path.join(directory, "keep.tflite")
        with open(path, "wb") as f:
            f.write(b"previous good file")
        with mock.patch.object(export_lib.os, "replace", side_effect=KeyboardInterrupt):
            with self.assertRaises(KeyboardInterrupt):
                tfopt.export(_pruned_trained(), path, check=False)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"previous good file")
        self.assertEqual(os.listdir(directory), ["keep.tflite"])

    def test_bad_path(self):
        with self.assertRaisesRegex(ValueError, r"'\.tflite'.*path='model.h5'"):
            tfopt.export(_pruned_trained(), "model.h5")
