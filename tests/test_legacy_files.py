"""`.keras` files written by an earlier tfopt still load, with the same outputs and state.

The files in `tests/data/` were written by tfopt before its layout changed
(issue 10: geometry registry, weights saved by name); see
`tests/data/make_legacy_files.py`.
"""

import os

import keras
import numpy as np
from absl.testing import parameterized

import tfopt
from tfopt import testing

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def _short(path):
    """'layer/weight' (a Sequential model's paths start with its name, unless reloaded)."""
    return "/".join(path.split("/")[-2:])


class LegacyFilesTest(testing.TestCase, parameterized.TestCase):
    @parameterized.parameters("pruned_layers", "qat_cnn", "folded", "sequence")
    def test_loads_with_same_outputs_and_state(self, name):
        model = tfopt.load_model(os.path.join(DATA, f"legacy_{name}.keras"))
        saved = np.load(os.path.join(DATA, f"legacy_{name}.npz"))
        self.assertAllClose(model(saved["inputs"]), saved["outputs"], atol=1e-5)
        state = {_short(key.split(":", 1)[1]): saved[key] for key in saved.files if key.startswith("w")}
        # Every saved variable (kernels, masks, steps, ranges, folded BN) is back, by name.
        self.assertEqual(sorted(state), sorted(_short(v.path) for v in model.weights))
        for variable in model.weights:
            self.assertAllEqual(variable, state[_short(variable.path)], msg=variable.path)

    def test_stripped_legacy_model_exports(self):
        model = tfopt.load_model(os.path.join(DATA, "legacy_pruned_layers.keras"))
        stripped = tfopt.strip(model)
        self.assertTrue(all(type(layer).__module__.startswith("keras") for layer in stripped.layers))
        saved = np.load(os.path.join(DATA, "legacy_pruned_layers.npz"))
        self.assertAllClose(stripped(saved["inputs"]), saved["outputs"], atol=1e-5)
