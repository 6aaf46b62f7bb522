"""The tests marked `backend_neutral` pass under JAX too: this TensorFlow run starts
`KERAS_BACKEND=jax pytest -m backend_neutral` in a child process (a process keeps one
Keras backend) over the modules that hold them; tests/conftest.py keeps only those
tests there. Its failures are this test's message."""

import os
import subprocess
import sys
import unittest

import pytest

from tfopt.testing.backends import HAS_JAX

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _neutral_modules():
    """The test modules that mark tests `backend_neutral` (by their text: collecting
    them here would import them under this process's backend)."""
    found = []
    for folder, _, files in os.walk(os.path.join(_ROOT, "tests")):
        for name in sorted(files):
            path = os.path.join(folder, name)
            if name.startswith("test_") and name.endswith(".py") and path != os.path.abspath(__file__):
                with open(path) as f:
                    if "pytest.mark.backend_neutral" in f.read():
                        found.append(os.path.relpath(path, _ROOT))
    return sorted(found)


@unittest.skipUnless(HAS_JAX, "jax is not installed (pip install jax[cpu])")
class BackendNeutralTest(unittest.TestCase):
    @pytest.mark.slow  # the neutral tests once more, in one process under JAX (about 2 min)
    def test_backend_neutral_tests_pass_under_jax(self):
        modules = _neutral_modules()
        self.assertGreaterEqual(len(modules), 5, modules)
        env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-n", "0", "-q", "-p", "no:cacheprovider", "--no-header",
             "-o", "addopts=", "-m", "backend_neutral", *modules],
            cwd=_ROOT, env=env, capture_output=True, text=True, timeout=600)
        summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        self.assertEqual(done.returncode, 0, done.stdout[-6000:] + done.stderr[-2000:])
        self.assertIn("passed", summary)
        self.assertNotIn("failed", summary)
