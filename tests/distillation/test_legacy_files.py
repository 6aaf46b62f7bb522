"""`.keras` files written by the single-module `tfopt/distillation.py` load into the package.

The files beside this test (`data/`) were written once by `data/make_legacy_distillation_files.py`
before the split; never regenerate them.
"""

import os
import warnings

import keras
import numpy as np

from tfopt import distillation as D
from tfopt import testing

DATA = os.path.join(os.path.dirname(__file__), "data")


class LegacyDistillationFilesTest(testing.TestCase):
    def setUp(self):
        super().setUp()
        self.expected = np.load(os.path.join(DATA, "legacy_distillation.npz"))

    def test_distiller_with_a_feature_hint_and_a_compiled_loss(self):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no warning: everything was resolved when it was saved
            loaded = keras.models.load_model(os.path.join(DATA, "legacy_distiller.keras"))
        self.assertIsInstance(loaded, D.Distiller)
        self.assertIsInstance(loaded.feature_losses[0], D.FeatureHint)
        self.assertEqual((loaded.temperature, loaded.alpha, loaded.teacher_outputs), (2.0, 0.3, "logits"))
        x, y = self.expected["x"], self.expected["y"]
        self.assertAllClose(loaded.student.predict(x, verbose=0), self.expected["distiller_student"], atol=1e-6)
        self.assertAllClose(float(loaded.compute_loss(x, y, loaded.student(x), training=False)),
                            float(self.expected["distiller_loss"]), rtol=1e-5)
        loaded.fit(x, y, batch_size=16, verbose=0)

    def test_student_compiled_with_distillation_loss_and_label_accuracy(self):
        loaded = keras.models.load_model(os.path.join(DATA, "legacy_cached_student.keras"))
        self.assertIsInstance(loaded.loss, D.DistillationLoss)
        self.assertEqual((loaded.loss.temperature, loaded.loss.alpha, loaded.loss.method), (3.0, 0.2, "mse"))
        x, y_fit = self.expected["x"], self.expected["y_fit"]
        self.assertAllClose(loaded.predict(x, verbose=0), self.expected["cached_student"], atol=1e-6)
        self.assertAllClose(loaded.evaluate(x, y_fit, verbose=0), self.expected["cached_evaluate"], rtol=1e-5)
        loaded.fit(x, y_fit, batch_size=16, verbose=0)
