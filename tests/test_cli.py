"""The command line, run as a user would: a subprocess."""

import os
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
        self.assertEqual(len(student.split()), 12)  # name (6 words) + 6 figures
        self.assertEqual(sorted(os.listdir(out)), ["dense.tflite", "pruned.tflite", "student.tflite", "teacher.tflite"])

    def test_bad_arguments_exit_2_without_traceback(self):
        result = subprocess.run([sys.executable, "-m", "tfopt", "demo", "--sparsity", "1.5"],
                                capture_output=True, text=True, timeout=300)
        self.assertEqual(result.returncode, 2)
        self.assertIn("--sparsity must be in [0, 1). Received: 1.5", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
