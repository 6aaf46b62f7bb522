"""The convolution tests once more, on TensorFlow's other CPU kernels.

TensorFlow runs oneDNN kernels on some Intel CPUs and its own elsewhere (AMD,
ARM, or wherever `TF_ENABLE_ONEDNN_OPTS=0`), and they differ: the default
kernels cannot differentiate a Conv2D with `dilations > 1`, which oneDNN can. A
suite that passes with one set can fail with the other, so the int8 rows that
train and export the convolutions tfopt computes in its own form (dilated 1-D
and 2-D, separable, 3-D as depth slices) run again here, in a child process with
`TF_ENABLE_ONEDNN_OPTS` flipped from what this process uses.
"""

import os
import subprocess
import sys

import pytest

from tfopt import testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _onednn_on():
    """Whether this process's TensorFlow runs oneDNN kernels."""
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):  # another TensorFlow layout: assume the default kernels
        return os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "1"


@pytest.mark.slow
class OtherCpuKernelsTest(testing.TestCase):
    def test_convolutions_train_and_export_with_the_other_kernels(self):
        flipped = "0" if _onednn_on() else "1"
        env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS=flipped, TF_CPP_MIN_LOG_LEVEL="3")
        command = [sys.executable, "-m", "pytest", "-n", "0", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                   "tests/test_int8_coverage.py", "-k", "dilated or separable or conv3d and not transpose"]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        self.assertEqual(done.returncode, 0, f"TF_ENABLE_ONEDNN_OPTS={flipped}:\n{done.stdout[-4000:]}")
