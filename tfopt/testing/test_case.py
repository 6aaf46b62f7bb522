"""`TestCase.run_layer_test`: the shared layer harness (after Keras's `run_layer_test`).

It checks, for one layer class and its arguments:

1. `from_config(get_config())` gives the same config (compared as JSON);
2. `build` creates the expected weights, by count and by name;
3. a symbolic call on a `keras.KerasTensor` and an eager call agree on shape;
4. one `fit` step in a tiny model runs and changes the weights;
5. a `.keras` save/load round trip keeps outputs and every weight, tfopt's
   masks and steps included.

Example:
>>> import tfopt
>>> class MyTest(tfopt.testing.TestCase):
...     def test_dense(self):
...         self.run_layer_test(tfopt.layers.Dense, {"units": 3}, input_shape=(2, 4),
...                             expected_weight_names=["kernel", "bias"])
"""

import json
import os
import tempfile
import unittest

import keras
import numpy as np

from tfopt.testing import backends


class TestCase(unittest.TestCase):
    """`unittest.TestCase` with `run_layer_test` and numeric assertions."""

    def setUp(self):
        super().setUp()
        keras.utils.clear_session()
        keras.utils.set_random_seed(1337)

    def assertAllClose(self, a, b, atol=1e-6, rtol=1e-6, msg=None):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), atol=atol, rtol=rtol, err_msg=msg or ""
        )

    def assertAllEqual(self, a, b, msg=None):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), err_msg=msg or ""
        )

    def make_input(self, shape, dtype="float32", seed=0):
        rng = np.random.default_rng(seed)
        if "int" in dtype:
            return rng.integers(0, 10, size=shape).astype(dtype)
        return rng.standard_normal(shape).astype(dtype)

    def run_layer_test(
        self,
        layer_cls,
        init_kwargs,
        input_shape,
        input_dtype="float32",
        expected_weight_names=None,
        expected_output_shape=None,
        run_training_step=True,
        run_saving=True,
    ):
        # 1. config round trip, compared as JSON.
        layer = layer_cls(**init_kwargs)
        config = layer.get_config()
        revived = layer_cls.from_config(config)
        self.assertEqual(
            json.dumps(keras.saving.serialize_keras_object(layer), sort_keys=True, default=str),
            json.dumps(keras.saving.serialize_keras_object(revived), sort_keys=True, default=str),
            "from_config(get_config()) changed the config",
        )

        # 2. build -> weights by count and name.
        layer.build(input_shape)
        names = [w.name for w in layer.weights]
        if expected_weight_names is not None:
            self.assertEqual(names, list(expected_weight_names))

        # 3. symbolic then eager call.
        symbolic = layer_cls(**init_kwargs)(keras.KerasTensor(input_shape, dtype=input_dtype))
        x = self.make_input(input_shape, input_dtype)
        eager = layer(x)
        self.assertEqual(tuple(symbolic.shape), tuple(eager.shape))
        if expected_output_shape is not None:
            self.assertEqual(tuple(eager.shape), tuple(expected_output_shape))

        # 4. one fit step in a tiny model.
        inputs = keras.Input(input_shape[1:], batch_size=None, dtype=input_dtype)
        fresh = layer_cls(**init_kwargs)
        outputs = keras.layers.Flatten()(fresh(inputs))
        outputs = keras.layers.Dense(1)(outputs)
        model = keras.Model(inputs, outputs)
        if run_training_step:
            model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
            before = [keras.ops.convert_to_numpy(w).copy() for w in fresh.trainable_weights]
            y = np.ones((input_shape[0], 1), "float32")
            model.fit(x, y, batch_size=input_shape[0], epochs=1, verbose=0, callbacks=backends.layer_callbacks(model))
            after = [keras.ops.convert_to_numpy(w) for w in fresh.trainable_weights]
            self.assertTrue(
                any(not np.array_equal(b, a) for b, a in zip(before, after)),
                "one training step did not change any trainable weight",
            )

        # 5. .keras round trip: outputs and every weight (tfopt state included).
        if run_saving:
            path = os.path.join(tempfile.mkdtemp(), "layer_test.keras")
            model.save(path)
            loaded = keras.models.load_model(path)
            self.assertAllClose(model(x), loaded(x), atol=1e-6)
            for original, restored in zip(model.weights, loaded.weights):
                self.assertEqual(original.name, restored.name)
                self.assertAllEqual(original, restored, msg=f"weight {original.name} not restored")
        return layer
