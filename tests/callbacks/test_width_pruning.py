"""WidthPruning: whole channel groups pruned in fit, then removed exactly by tfopt.shrink(model)."""

import keras
import numpy as np

import tfopt
from tests.test_shrink import _depthwise_bn, _residual, _sequential, _squeeze_excite, _transformer
from tfopt import testing

L = keras.layers


def _fit(model, callback, steps=4, **compile_kwargs):
    model.compile("adam", "mse", **compile_kwargs)
    rng = np.random.default_rng(0)
    shape = (4 * steps,) + tuple(model.input_shape[1:])
    model.fit(rng.standard_normal(shape).astype("float32"),
              rng.standard_normal((4 * steps,) + tuple(model.output_shape[1:])).astype("float32"),
              batch_size=4, verbose=0, callbacks=[callback])
    return model


class WidthPruningTest(testing.TestCase):
    def test_shrink_after_width_pruning_is_exact(self):
        cases = {
            "residual": (_residual, {"stem": 8, "branch": 8}),
            "depthwise_bn": (_depthwise_bn, {"expand": 8, "sep": 4}),
            "squeeze_excite": (_squeeze_excite, {"conv": 8, "se_reduce": 2, "project": 4}),
            "transformer": (_transformer, {"mha": 2, "ff_in": 32}),
            "sequential": (_sequential, {"h1": 16, "h2": 8}),
        }
        for name, (build, widths) in cases.items():
            with self.subTest(name):
                keras.utils.set_random_seed(0)
                model = _fit(build(), tfopt.callbacks.WidthPruning(
                    tfopt.schedules.ConstantSparsity(0.5, begin_step=0, frequency=1)))
                stripped = tfopt.strip(model)
                small = tfopt.shrink(stripped)
                for layer_name, width in widths.items():
                    layer = small.get_layer(layer_name)
                    self.assertEqual(getattr(layer, "num_heads", None) or getattr(layer, "filters", None)
                                     or layer.units, width, layer_name)
                x = self.make_input((3,) + tuple(model.input_shape[1:]))
                self.assertAllClose(small(x), stripped(x), atol=1e-5, rtol=1e-5)
                self.assertAllClose(stripped(x), model(x), atol=1e-6)

    def test_gradual_schedule_in_percentages_with_steps_per_execution(self):
        schedule = tfopt.schedules.PolynomialDecay(0.0, 0.75, "0%", "50%", frequency=1)
        model = _fit(_sequential(), tfopt.callbacks.WidthPruning(schedule), steps=8, steps_per_execution=2)
        kernel = tfopt.strip(model).get_layer("h1").kernel.numpy()
        self.assertEqual(int(np.sum(np.all(kernel == 0, axis=0))), 24)  # 75% of 32 units, whole columns
        small = tfopt.shrink(tfopt.strip(model))
        self.assertEqual([small.get_layer("h1").units, small.get_layer("h2").units], [8, 4])
        rows = tfopt.summary(model, print_fn=None)
        self.assertEqual(rows[0]["structure"], "width (channel groups)")

    def test_jit_compile(self):
        model = _fit(_sequential(), tfopt.callbacks.WidthPruning(
            tfopt.schedules.ConstantSparsity(0.5, begin_step=0, frequency=1)), jit_compile=True)
        self.assertEqual(tfopt.shrink(tfopt.strip(model)).get_layer("h1").units, 16)

    def test_min_channels_and_layers(self):
        model = _fit(_sequential(), tfopt.callbacks.WidthPruning(
            tfopt.schedules.ConstantSparsity(0.9, begin_step=0, frequency=1), min_channels=6, layers="h2"))
        small = tfopt.shrink(tfopt.strip(model))
        self.assertEqual([small.get_layer("h1").units, small.get_layer("h2").units], [32, 6])

    def test_channel_structure_alone_removes_nothing_and_says_why(self):
        model = _fit(_sequential(), tfopt.callbacks.Pruning(
            tfopt.schedules.ConstantSparsity(0.5, begin_step=0, frequency=1), structure="channel"))
        with self.assertLogs("tfopt", "WARNING") as logs:
            small = tfopt.shrink(tfopt.strip(model))
        self.assertIn("WidthPruning", "\n".join(logs.output))
        self.assertEqual(small.get_layer("h1").units, 32)

    def test_a_softmax_layer_keeps_its_channels_and_shrink_stays_exact(self):
        # Zeroing units a softmax reads still leaves them in its sum: removing them would change
        # what the pruned model computes. WidthPruning reads the same groups as shrink (both
        # tfopt.channel_groups), so neither touches them.
        keras.utils.set_random_seed(0)
        inputs = keras.Input((12,))
        x = L.Dense(32, activation="relu", name="h1")(inputs)
        x = L.Dense(16, activation="softmax", name="mix")(x)
        x = L.Dense(8, activation="relu", name="after")(x)
        model = _fit(keras.Model(inputs, L.Dense(3, name="out")(x)), tfopt.callbacks.WidthPruning(
            tfopt.schedules.ConstantSparsity(0.5, begin_step=0, frequency=1)))
        stripped = tfopt.strip(model)
        self.assertFalse(np.any(np.all(stripped.get_layer("mix").kernel.numpy() == 0, axis=0)))
        small = tfopt.shrink(stripped)
        self.assertEqual([small.get_layer(n).units for n in ("h1", "mix", "after")], [16, 16, 4])
        x = self.make_input((3, 12))
        self.assertAllClose(small(x), stripped(x), atol=1e-5, rtol=1e-5)

    def test_masks_hold_when_weights_turn_non_finite(self):
        # make_constraint's rule, which WidthPruning's constraint goes through: a mask is never
        # computed from NaN/Inf weights; the groups keep their units.
        model = _sequential()
        callback = tfopt.callbacks.WidthPruning(tfopt.schedules.PolynomialDecay(0.0, 0.5, 0, 4, frequency=1))

        class Poison(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if batch == 1:
                    kernel = self.model.get_layer("h2").kernel
                    kernel.assign(np.full(kernel.shape, np.nan, "float32"))

        model.compile("sgd", "mse")
        rng = np.random.default_rng(0)
        model.fit(rng.standard_normal((16, 12)), rng.standard_normal((16, 3)), batch_size=4, verbose=0,
                  callbacks=[callback, Poison()])
        for group in callback._groups:  # pruning stopped with the NaN, short of the final 50%
            pruned = int(np.sum(1.0 - keras.ops.convert_to_numpy(group.keep)))
            self.assertLess(pruned, round(0.5 * group.total))
        for variable, mask, constraint in callback._masks.values():
            self.assertTrue(tfopt.pruning.is_pruning_constraint(constraint))

    def test_misuse(self):
        with self.assertRaisesRegex(ValueError, "needs a `pruning_schedule`"):
            tfopt.callbacks.WidthPruning(None)
        with self.assertRaisesRegex(ValueError, "min_channels=0"):
            tfopt.callbacks.WidthPruning("baseline", min_channels=0)
        single = keras.Sequential([keras.Input((4,)), L.Dense(2)])
        with self.assertRaisesRegex(ValueError, "has no channel, head or unit it can remove"):
            _fit(single, tfopt.callbacks.WidthPruning("baseline"))
