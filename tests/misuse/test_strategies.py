"""Misuses of tfopt.strategies and what tfopt says."""

import json
import os
import subprocess
import sys
import unittest
from unittest import mock

import tfopt
from tests.misuse.harness import Misuse, MisuseTestCase
from tfopt.testing import free_loopback_ports


def _with_env(**env):
    def run(action):
        with mock.patch.dict(os.environ, env):
            return action()
    return run


def _auto_with_tf_config(value):
    return lambda: _with_env(TF_CONFIG=value)(tfopt.strategies.auto)


TABLE = [
    Misuse("TF_CONFIG that is not JSON", _auto_with_tf_config("{cluster: [oops"),
           raises=ValueError, match=r"TF_CONFIG is not valid JSON.*Received: TF_CONFIG='\{cluster.*for example"),
    Misuse("TF_CONFIG without a cluster", _auto_with_tf_config(json.dumps({"task": {"type": "worker", "index": 0}})),
           raises=ValueError, match=r'TF_CONFIG has no "cluster".*Received.*for example'),
    Misuse("TF_CONFIG with a task index out of range",
           _auto_with_tf_config(json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                                            "task": {"type": "worker", "index": 2}})),
           raises=ValueError, match=r"task index 2, but cluster\[\"worker\"\] lists 2 address.*for example"),
    Misuse("TF_CONFIG with a task type not in the cluster",
           _auto_with_tf_config(json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                                            "task": {"type": "evaluator", "index": 0}})),
           raises=ValueError, match=r"task type 'evaluator', which is not in the cluster \(\['worker'\]\)"),
    Misuse("a TPU name that does not resolve",
           lambda: tfopt.strategies.TPU("no-such-tpu-tfopt-test"),
           raises=RuntimeError, match=r"TPU no-such-tpu-tfopt-test could not be resolved.*Fix:.*unset TPU_NAME"),
    Misuse("recommended_steps_per_execution(None)",
           lambda: tfopt.strategies.recommended_steps_per_execution(None),
           raises=TypeError, match=r"takes a `tf.distribute.Strategy`.*Received: None"),
]


class StrategiesMisuseTest(MisuseTestCase):
    def test_table(self):
        self.run_table(TABLE)


_WAITING_WORKER = r"""
import logging, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(message)s")
import tfopt
try:
    tfopt.strategies.auto(timeout=float(sys.argv[1]))
except RuntimeError as e:
    print("RuntimeError:", e, flush=True)
os._exit(0)  # the thread blocked in TensorFlow cannot be joined
"""


class WaitingForWorkersTest(unittest.TestCase):
    def test_auto_logs_the_missing_worker_and_times_out(self):
        mine, missing = free_loopback_ports(2)
        env = dict(os.environ, TF_CONFIG=json.dumps({
            "cluster": {"worker": [f"127.0.0.1:{mine}", f"127.0.0.1:{missing}"]},
            "task": {"type": "worker", "index": 0}}))
        out = subprocess.run([sys.executable, "-c", _WAITING_WORKER, "12"], env=env, capture_output=True,
                             text=True, timeout=120).stdout
        self.assertRegex(out, rf"waiting for the other workers of TF_CONFIG \(\d+ s so far\); not answering yet: "
                              rf"\['127.0.0.1:{missing}'\]")
        self.assertRegex(out, rf"RuntimeError: .*did not all start within 12 s; not answering: "
                              rf"\['127.0.0.1:{missing}'\]. Fix: start every worker")
