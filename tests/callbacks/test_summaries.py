"""TensorBoardSummaries: sparsity and activation ranges written as TensorBoard events."""

import glob
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

import tfopt
from tfopt import testing


class TensorBoardSummariesTest(testing.TestCase):
    def test_sparsity_ranges_and_histograms_are_written(self):
        model = keras.Sequential([
            keras.Input((8,)), tfopt.layers.QuantizeActivation(name="q_in"),
            tfopt.layers.Dense(16, pruning_schedule=tfopt.schedules.ConstantSparsity(0.5, 0, frequency=1),
                               quantization_aware="int8", name="d"),
        ])
        model.compile("sgd", "mse")
        log_dir = tempfile.mkdtemp()
        model.fit(np.random.default_rng(0).standard_normal((32, 8)), np.zeros((32, 16)), epochs=2, verbose=0,
                  callbacks=[tfopt.callbacks.TensorBoardSummaries(log_dir)])
        values = {}
        for path in glob.glob(os.path.join(log_dir, "tfopt", "events.*")):
            for event in tf.compat.v1.train.summary_iterator(path):
                for value in event.summary.value:
                    values.setdefault(value.tag, []).append((event.step, value))
        self.assertEqual([s for s, _ in values["sparsity/d/kernel"]], [0, 1])
        self.assertAllClose(tf.make_ndarray(values["sparsity/d/kernel"][-1][1].tensor), 0.5)
        self.assertIn("sparsity/total", values)
        self.assertIn("weights/d/kernel", values)
        for tag in ("range/q_in/range/min", "range/q_in/range/max", "range/d/output_range/min"):
            self.assertIn(tag, values)
        self.assertAllClose(tf.make_ndarray(values["range/q_in/range/max"][-1][1].tensor),
                            model.get_layer("q_in").range_max.numpy())
