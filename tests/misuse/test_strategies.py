"""Misuses of tfopt.strategies and what tfopt says.

The log of `auto()` waiting for a worker, seen from two real processes, is
tested in tests/test_strategies.py (WaitingForWorkersTest).
"""

import json
import os
from unittest import mock

import tfopt
from tests.misuse.harness import Misuse, MisuseTestCase
from tfopt.testing import free_loopback_ports


def _auto_with(timeout=None, **env):
    """Runs `auto(timeout)` with only `env` among the variables that choose the strategy."""

    def run():
        with mock.patch.dict(os.environ, env):
            for key in {"TF_CONFIG", "TPU_NAME", "COLAB_TPU_ADDR"} - set(env):
                os.environ.pop(key, None)
            return tfopt.strategies.auto() if timeout is None else tfopt.strategies.auto(timeout=timeout)

    return run


def _cluster(index=0, kind="worker"):
    return json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": kind, "index": index}})


def _worker_that_never_starts():
    mine, missing = free_loopback_ports(2)  # nothing listens on `missing`
    config = json.dumps({"cluster": {"worker": [f"127.0.0.1:{mine}", f"127.0.0.1:{missing}"]},
                         "task": {"type": "worker", "index": 0}})
    return _auto_with(timeout=1, TF_CONFIG=config)()  # raises before TensorFlow's own wait


TABLE = [
    Misuse("TF_CONFIG that is not JSON", _auto_with(TF_CONFIG="{cluster: [oops"),
           raises=ValueError, match=r"TF_CONFIG is not valid JSON.*Received: TF_CONFIG='\{cluster.*for example"),
    Misuse("TF_CONFIG without a cluster", _auto_with(TF_CONFIG=json.dumps({"task": {"type": "worker", "index": 0}})),
           raises=ValueError, match=r'TF_CONFIG has no "cluster".*Received: TF_CONFIG=.*for example'),
    Misuse("TF_CONFIG with a task index out of range", _auto_with(TF_CONFIG=_cluster(index=2)),
           raises=ValueError, match=r"task index 2, but cluster\[\"worker\"\] lists 2 address.*for example"),
    Misuse("TF_CONFIG with a task type not in the cluster", _auto_with(TF_CONFIG=_cluster(kind="evaluator")),
           raises=ValueError, match=r"task type 'evaluator', which is not in the cluster \(\['worker'\]\).*for example"),
    Misuse("TF_CONFIG naming a worker that never starts", _worker_that_never_starts,
           raises=RuntimeError, match=r"did not all start within 1 s; not answering: \['127\.0\.0\.1:\d+'\]\. "
                                      r"Fix: start every worker"),
    Misuse("a TPU name that does not resolve", _auto_with(TPU_NAME="no-such-tpu-tfopt-test"),
           raises=RuntimeError, match=r"TPU named by TPU_NAME='no-such-tpu-tfopt-test' could not be resolved"
                                      r".*Fix: to train on the CPU/GPU instead, unset TPU_NAME"),
    Misuse("recommended_steps_per_execution(None)",
           lambda: tfopt.strategies.recommended_steps_per_execution(None),
           raises=TypeError, match=r"takes a `tf.distribute.Strategy`.*tfopt.strategies.auto\(\).*Received: None"),
]


class StrategiesMisuseTest(MisuseTestCase):
    def test_table(self):
        # Every row raised, warned or logged what it says (a failing row fails its subtest).
        self.assertEqual(self.run_table(TABLE), len(TABLE))
