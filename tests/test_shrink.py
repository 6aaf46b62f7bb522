"""tfopt.shrink: channels, heads and units removed through every dependency pattern, exactly."""

import os
import subprocess
import sys
import tempfile

import keras
import numpy as np
import pytest

import tfopt
from tfopt import testing

L = keras.layers


def _randomize_batch_norms(model, seed=0):
    """Moving statistics away from (0, 1), so a wrongly cut BatchNormalization shows."""
    rng = np.random.default_rng(seed)
    for layer in tfopt._keras_internal.all_layers(model):
        if isinstance(layer, L.BatchNormalization):
            layer.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("float32") if i in (0, 3)
                               else rng.normal(0, 0.3, w.shape).astype("float32")
                               for i, w in enumerate(layer.get_weights())])
    return model


@keras.saving.register_keras_serializable(package="tests")
def _sum_normalized(t):
    """An activation tfopt does not know, which mixes channels."""
    return t / keras.ops.sum(keras.ops.abs(t), axis=-1, keepdims=True)


def _residual():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(16, 3, padding="same", name="stem")(inputs)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU()(x)
    y = L.Conv2D(16, 3, padding="same", name="branch")(x)
    x = L.Add(name="add")([x, y])
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(5, name="head")(x), name="residual")


def _concat():
    inputs = keras.Input((8, 8, 3))
    a = L.Conv2D(8, 3, padding="same", name="a")(inputs)
    b = L.Conv2D(12, 1, name="b")(inputs)
    x = L.Concatenate(name="concat")([a, b])
    x = L.AveragePooling2D(2)(x)
    x = L.Conv2D(6, 3, name="after")(x)
    x = L.GlobalMaxPooling2D()(x)
    return keras.Model(inputs, L.Dense(5, name="head")(x), name="concat")


def _depthwise_bn():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(16, 1, name="expand")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = L.BatchNormalization(name="dw_bn")(x)
    x = L.Activation("relu6")(x)
    x = L.SeparableConv2D(8, 3, name="sep")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(5, name="head")(x), name="depthwise")


def _squeeze_excite():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(16, 3, padding="same", activation="swish", name="conv")(inputs)
    s = L.GlobalAveragePooling2D()(x)
    s = L.Reshape((1, 1, 16))(s)
    s = L.Conv2D(4, 1, activation="relu", name="se_reduce")(s)
    s = L.Conv2D(16, 1, activation="sigmoid", name="se_expand")(s)
    x = L.Multiply(name="excite")([x, s])
    x = L.Conv2D(8, 1, name="project")(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, L.Dense(5, name="head")(x), name="se")


def _flatten_dense():
    inputs = keras.Input((6, 6, 2))
    x = L.Conv2D(8, 3, name="conv")(inputs)
    x = L.Flatten()(x)
    x = L.Dense(32, activation="relu", name="fc")(x)
    x = L.Dropout(0.1)(x)
    return keras.Model(inputs, L.Dense(5, name="head")(x), name="flatten")


def _transformer():
    inputs = keras.Input((10, 16))
    a = L.MultiHeadAttention(4, 8, name="mha")(inputs, inputs)
    x = L.LayerNormalization()(L.Add()([inputs, a]))
    f = L.Dense(64, activation="gelu", name="ff_in")(x)
    f = L.Dense(16, name="ff_out")(f)
    x = L.LayerNormalization()(L.Add()([x, f]))
    x = L.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, L.Dense(5, name="head")(x), name="transformer")


def _nested():
    block = keras.Sequential([keras.Input((8,)), L.Dense(32, activation="relu", name="inner")], name="block")
    inputs = keras.Input((4, 4, 2))
    x = L.Conv2D(8, 3, name="conv")(inputs)
    x = L.GlobalAveragePooling2D()(x)
    x = block(x)
    return keras.Model(inputs, L.Dense(5, name="head")(x), name="nested")


def _sequential():
    return keras.Sequential([keras.Input((12,)), L.Dense(32, activation="relu", name="h1"),
                             L.Dense(16, activation="tanh", name="h2"), L.Dense(3, name="out")], name="mlp")


CASES = {
    # model, expected widths after removing half of each group
    "residual": (_residual, {"stem": 8, "branch": 8, "head": 5}),
    "concat": (_concat, {"a": 4, "b": 6, "after": 3}),
    "depthwise_bn": (_depthwise_bn, {"expand": 8, "sep": 4}),
    "squeeze_excite": (_squeeze_excite, {"conv": 8, "se_reduce": 2, "se_expand": 8, "project": 4}),
    "flatten_dense": (_flatten_dense, {"conv": 4, "fc": 16}),
    "transformer": (_transformer, {"mha": 2, "ff_in": 32, "ff_out": 16}),  # residual stream kept (LayerNorm)
    "nested": (_nested, {"conv": 8, "inner": 16}),  # a nested model's inputs are kept
    "sequential": (_sequential, {"h1": 16, "h2": 8, "out": 3}),
}


def _width(layer):
    if isinstance(layer, L.MultiHeadAttention):
        return layer.num_heads
    for key in ("filters", "units"):
        if hasattr(layer, key):
            return getattr(layer, key)
    return None


class _ShrinkCase(testing.TestCase):
    def _check(self, model, fraction=0.5, **kwargs):
        x = self.make_input((3,) + tuple(model.input_shape[1:]))
        plan = tfopt.plan_shrink(model, fraction, **kwargs)
        small = plan.apply()
        self.assertAllClose(small(x), plan.masked()(x), atol=1e-5, rtol=1e-5)
        self.assertLess(small.count_params(), model.count_params())
        return plan, small


class ShrinkTest(_ShrinkCase):
    def test_every_dependency_pattern_matches_the_masked_model(self):
        for name, (build, widths) in CASES.items():
            with self.subTest(name):
                keras.utils.set_random_seed(1)
                model = _randomize_batch_norms(build())
                plan, small = self._check(model)
                layers = {layer.name: layer for layer in tfopt._keras_internal.all_layers(small)}
                self.assertEqual({k: _width(layers[k]) for k in widths}, widths)
                self.assertEqual([l.name for l in small.layers], [l.name for l in model.layers])
                for layer_name, (before, after) in plan.removed.items():
                    self.assertLess(after, before, layer_name)

    def test_masked_slices_are_the_removed_ones(self):
        # The masked model differs from the model, and only through the removed channels.
        model = _residual()
        plan = tfopt.plan_shrink(model, 0.5)
        masked = plan.masked()
        stem = masked.get_layer("stem").kernel.numpy()
        zero_out = np.all(stem == 0, axis=(0, 1, 2))
        self.assertEqual(int(zero_out.sum()), 8)
        # the residual's two producers lose the same channels
        self.assertAllEqual(np.all(masked.get_layer("branch").kernel.numpy() == 0, axis=(0, 1, 2)), zero_out)

    def test_shrunk_model_is_plain_keras_saves_loads_and_exports_without_tfopt(self):
        model = _squeeze_excite()
        small = tfopt.shrink(model, 0.5)
        x = self.make_input((2, 8, 8, 3))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "small.keras")
            small.save(path)
            np.save(os.path.join(tmp, "x.npy"), x)
            np.save(os.path.join(tmp, "y.npy"), small(x).numpy())
            script = (
                "import sys, numpy as np, keras, tensorflow as tf\n"
                f"m = keras.models.load_model({path!r})\n"
                f"x = np.load({os.path.join(tmp, 'x.npy')!r}); y = np.load({os.path.join(tmp, 'y.npy')!r})\n"
                "np.testing.assert_allclose(m(x).numpy(), y, atol=1e-5)\n"
                "from ai_edge_litert.interpreter import Interpreter\n"
                "conv = tf.lite.TFLiteConverter.from_keras_model(m)\n"
                "it = Interpreter(model_content=conv.convert()); it.allocate_tensors()\n"
                "it.set_tensor(it.get_input_details()[0]['index'], x[:1])\n"
                "it.invoke()\n"
                "np.testing.assert_allclose(it.get_tensor(it.get_output_details()[0]['index']), y[:1], atol=1e-4)\n"
                "assert 'tfopt' not in sys.modules\n"
                "print('ok')\n"
            )
            result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
            self.assertIn("ok", result.stdout, result.stderr[-2000:])

    def test_tfopt_export_of_a_shrunk_model(self):
        small = tfopt.shrink(_depthwise_bn(), 0.5)
        with tempfile.TemporaryDirectory() as tmp:
            report = tfopt.export(small, os.path.join(tmp, "small.tflite"))
            self.assertTrue(os.path.exists(report.path))

    def test_no_layer_loses_every_channel(self):
        for build, _ in CASES.values():
            model = build()
            small = tfopt.shrink(model, 0.99)
            for layer in tfopt._keras_internal.all_layers(small):
                width = _width(layer)
                if width is not None:
                    self.assertGreaterEqual(width, 1, layer.name)
        small = tfopt.shrink(_sequential(), 0.99, min_channels=4)
        self.assertEqual([small.get_layer("h1").units, small.get_layer("h2").units], [4, 4])

    def test_outputs_inputs_and_opaque_layers_keep_their_channels(self):
        inputs = keras.Input((6, 6, 3))
        x = L.Conv2D(8, 3, name="before_lambda")(inputs)
        x = L.Lambda(lambda t: t * 2.0, name="opaque")(x)
        x = L.Conv2D(8, 1, name="last")(x)
        model = keras.Model(inputs, x)
        plan = tfopt.plan_shrink(model, 0.5)
        self.assertEqual(plan.removed, {})
        with self.assertLogs("tfopt", "INFO"):
            small = tfopt.shrink(model, 0.5)
        self.assertEqual(small.output_shape, model.output_shape)

    def test_shared_layer_keeps_its_calls_consistent(self):
        inputs = keras.Input((6,))
        a = L.Dense(16, name="a")(inputs)
        b = L.Dense(16, name="b")(inputs)
        shared = L.Dense(12, activation="relu", name="shared")
        x = L.Add()([shared(a), shared(b)])
        model = keras.Model(inputs, L.Dense(2, name="head")(x))
        plan, small = self._check(model)
        self.assertEqual([small.get_layer(n).units for n in ("a", "b", "shared")], [8, 8, 6])

    def test_global_scope_and_taylor_importance(self):
        model = _sequential()
        model.get_layer("h1").kernel.assign(model.get_layer("h1").kernel * 10.0)  # h1's units score higher
        plan, small = self._check(model, scope="global")
        self.assertEqual(small.get_layer("h1").units + small.get_layer("h2").units, 24)
        x = self.make_input((16, 12))
        y = np.eye(3)[np.arange(16) % 3].astype("float32")
        plan, small = self._check(model, importance="taylor", data=[(x, y)], loss="categorical_crossentropy")
        self.assertEqual(small.get_layer("h1").units, 16)

    def test_layers_selects_which_groups_shrink(self):
        small = tfopt.shrink(_sequential(), 0.5, layers="h2")
        self.assertEqual([small.get_layer("h1").units, small.get_layer("h2").units], [32, 8])

    def test_l2_removes_the_weakest_channels(self):
        model = _sequential()
        kernel = model.get_layer("h1").kernel.numpy()
        kernel[:, :16] *= 0.01  # units 0-15 write little ...
        model.get_layer("h1").kernel.assign(kernel)
        consumer = model.get_layer("h2").kernel.numpy()
        consumer[:16] *= 0.01  # ... and are read little: the group's L2 counts both sides
        model.get_layer("h2").kernel.assign(consumer)
        plan = tfopt.plan_shrink(model, 0.5, layers="h1")
        masked = plan.masked().get_layer("h1").kernel.numpy()
        self.assertTrue(np.all(masked[:, :16] == 0) and np.all(masked[:, 16:] != 0))

    def test_bad_arguments(self):
        model = _sequential()
        for kwargs, words in (
            ({"fraction": 1.0}, "fraction=1.0"),
            ({"fraction": -0.1}, "[0, 1)"),
            ({"fraction": 0.5, "scope": "model"}, "scope='model'"),
            ({"fraction": 0.5, "importance": "l1"}, "importance='l1'"),
            ({"fraction": 0.5, "min_channels": 0}, "min_channels=0"),
            ({"fraction": 0.5, "importance": "taylor"}, "needs `data`"),
        ):
            with self.subTest(kwargs), self.assertRaises(ValueError) as caught:
                tfopt.shrink(model, **kwargs)
            self.assertIn(words, str(caught.exception))
        pruned = tfopt.prune(model, "baseline")
        with self.assertRaisesRegex(TypeError, "tfopt.strip"):
            tfopt.shrink(pruned, 0.5)
        with self.assertRaisesRegex(TypeError, "subclassed"):
            tfopt.shrink(_Subclassed(), 0.5)

    def test_a_frozen_teacher_gives_a_trainable_student(self):
        teacher = _sequential()
        teacher.trainable = False
        student = tfopt.shrink(teacher, 0.5)
        self.assertTrue(student.trainable)
        self.assertEqual(len(student.trainable_weights), 6)
        self.assertFalse(teacher.trainable)
        partly = _sequential()
        partly.get_layer("h1").trainable = False  # a frozen backbone layer stays frozen
        self.assertFalse(tfopt.shrink(partly, 0.5).get_layer("h1").trainable)

    def test_numpy_fraction(self):
        small = tfopt.shrink(_sequential(), np.float32(0.5))
        self.assertEqual(small.get_layer("h1").units, 16)


    def test_a_softmax_over_the_channels_keeps_them(self):
        # Removing a channel a softmax (or a normalization) reads changes every other channel: the
        # shrunk model must still compute what the masked one does, so those channels stay.
        mixers = {
            "dense_softmax": lambda x: L.Dense(16, activation="softmax", name="mix")(x),
            "dense_log_softmax": lambda x: L.Dense(16, activation="log_softmax", name="mix")(x),
            "activation_softmax": lambda x: L.Activation("softmax")(L.Dense(16, name="mix")(x)),
            "activation_log_softmax": lambda x: L.Activation("log_softmax")(L.Dense(16, name="mix")(x)),
            "softmax_layer": lambda x: L.Softmax()(L.Dense(16, name="mix")(x)),
            "ops_softmax": lambda x: keras.ops.softmax(L.Dense(16, name="mix")(x)),
            "unit_normalization": lambda x: L.UnitNormalization()(L.Dense(16, name="mix")(x)),
            "layer_normalization": lambda x: L.LayerNormalization()(L.Dense(16, name="mix")(x)),
            "custom_activation": lambda x: L.Dense(16, activation=_sum_normalized, name="mix")(x),
        }
        for name, mix in mixers.items():
            with self.subTest(name):
                keras.utils.set_random_seed(2)
                inputs = keras.Input((12,))
                x = L.Dense(32, activation="relu", name="h1")(inputs)
                x = L.Dense(8, activation="relu", name="after")(mix(x))
                model = keras.Model(inputs, L.Dense(3, name="out")(x))
                plan, small = self._check(model)
                self.assertEqual(small.get_layer("mix").units, 16)
                self.assertEqual((small.get_layer("h1").units, small.get_layer("after").units), (16, 4))
        self.assertTrue(tfopt.channel_groups.mixes_channels(L.Dense(4, activation="softmax")))
        self.assertFalse(tfopt.channel_groups.mixes_channels(L.Conv2D(4, 3, activation="swish")))

    def test_taylor_importance_of_a_frozen_model(self):
        # The README's Minitron recipe freezes the teacher before shrinking it.
        x = self.make_input((16, 12))
        y = np.eye(3)[np.arange(16) % 3].astype("float32")
        kwargs = dict(importance="taylor", data=[(x, y)], loss="categorical_crossentropy")
        keras.utils.set_random_seed(3)
        model = _sequential()
        expected = tfopt.plan_shrink(model, 0.5, **kwargs).masked().get_weights()
        model.trainable = False
        plan, student = self._check(model, **kwargs)
        for a, b in zip(plan.masked().get_weights(), expected):
            self.assertAllEqual(a, b)  # the same channels as the unfrozen model
        self.assertTrue(student.trainable)
        self.assertFalse(model.trainable)
        self.assertEqual(model.trainable_weights, [])
        model.trainable = True
        model.get_layer("h1").trainable = False  # a frozen layer is scored too, and stays frozen
        plan, small = self._check(model, **kwargs)
        self.assertFalse(small.get_layer("h1").trainable)
        self.assertFalse(model.get_layer("h1").trainable)

    def test_taylor_data_as_one_batch(self):
        model = _sequential()
        x = self.make_input((16, 12))
        y = np.eye(3)[np.arange(16) % 3].astype("float32")
        kwargs = dict(importance="taylor", loss="categorical_crossentropy")
        one = tfopt.plan_shrink(model, 0.5, data=(x, y), **kwargs).masked().get_weights()
        listed = tfopt.plan_shrink(model, 0.5, data=[(x, y)], **kwargs).masked().get_weights()
        for a, b in zip(one, listed):
            self.assertAllEqual(a, b)
        halves = ((x[:8], y[:8]), (x[8:], y[8:]))  # a tuple of batches is still batches
        tfopt.plan_shrink(model, 0.5, data=halves, **kwargs)

    def test_non_finite_data_or_weights_raise_instead_of_removing_arbitrary_channels(self):
        model = _sequential()
        x = self.make_input((16, 12))
        y = np.eye(3)[np.arange(16) % 3].astype("float32")
        x[3, 5] = np.nan
        with self.assertRaisesRegex(ValueError, r"`data` batch 0 holds 1 NaN/Inf value\(s\) in its x.*Fix"):
            tfopt.shrink(model, 0.5, importance="taylor", data=[(x, y)], loss="categorical_crossentropy")
        with self.assertRaisesRegex(ValueError, r"item 0 is not an \(x, y\) pair"):
            tfopt.shrink(model, 0.5, importance="taylor", data=[x], loss="categorical_crossentropy")
        kernel = model.get_layer("h2").kernel
        kernel.assign(np.where(np.arange(16) == 2, np.nan, kernel.numpy()))
        with self.assertRaisesRegex(ValueError, r"channel scores of weights \[.*h2/kernel.*\] are NaN/Inf"):
            tfopt.shrink(model, 0.5)

    def test_the_result_is_not_compiled(self):
        model = _sequential()
        model.compile("adam", "mse")
        plan = tfopt.plan_shrink(model, 0.5)
        for result in (tfopt.shrink(model, 0.5), plan.apply(), plan.masked()):
            self.assertFalse(result.compiled)
        self.assertTrue(model.compiled)  # the model's own compilation is left alone
        model.fit(np.zeros((4, 12)), np.zeros((4, 3)), verbose=0)
        nested = _nested()
        nested.compile("adam", "mse")
        self.assertFalse(tfopt.shrink(nested, 0.5).compiled)

class MacsTest(testing.TestCase):
    def test_counts_per_layer_kind(self):
        inputs = keras.Input((8, 8, 4))
        x = L.Conv2D(6, 3, padding="same", name="conv")(inputs)  # 8*8 positions x 3*3*4*6
        x = L.DepthwiseConv2D(3, strides=2, padding="same", name="dw")(x)  # 4*4 x 3*3*6
        x = L.SeparableConv2D(5, 3, padding="same", name="sep")(x)  # 4*4 x (3*3*6 + 6*5)
        x = L.Reshape((16, 5))(x)
        x = L.Dense(7, name="dense")(x)  # 16 x 5*7
        a = L.MultiHeadAttention(2, 3, name="mha")(x, x)
        # q, k, v projections 3 x 16*7*2*3, scores and weighted sum 16*16*2*(3+3), output 16*2*3*7
        model = keras.Model(inputs, a)
        counts = tfopt.reporting.macs(model)
        self.assertEqual(counts["conv"], 64 * 216)
        self.assertEqual(counts["dw"], 16 * 54)
        self.assertEqual(counts["sep"], 16 * (54 + 30))
        self.assertEqual(counts["dense"], 16 * 35)
        self.assertEqual(counts["mha"], 3 * 16 * 7 * 6 + 16 * 16 * 2 * 6 + 16 * 6 * 7)
        self.assertEqual(counts["reshape"], 0)

    def test_summary_and_inspect_report_macs_before_and_after_shrink(self):
        model = _residual()
        before = tfopt.summary(model, print_fn=None)[-1]["macs"]
        after = tfopt.summary(tfopt.shrink(model, 0.5), print_fn=None)[-1]["macs"]
        self.assertEqual(before, tfopt.reporting.total_macs(tfopt.reporting.macs(model)))
        self.assertLess(after, 0.3 * before)  # both sides of the 3x3 conv halve: a quarter, plus the head
        self.assertIsNone(tfopt.reporting.macs(_Subclassed()))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "m.keras")
            model.save(path)
            # `tfopt inspect`'s own code, in this process (tests/test_cli.py starts it as a user does)
            import contextlib
            import io

            from tfopt.__main__ import main

            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(["inspect", path])
            self.assertEqual(code, 0, err.getvalue()[-2000:])
            self.assertIn(f"multiply-adds per example: {before}", out.getvalue(), err.getvalue()[-2000:])
            self.assertIn("macs", out.getvalue())


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = L.Dense(4)

    def call(self, x):
        return self.dense(x)


@pytest.mark.slow
class ApplicationsShrinkTest(_ShrinkCase):
    def test_mobilenet_v2_and_resnet50(self):
        for name in ("MobileNetV2", "ResNet50"):
            with self.subTest(name):
                model = _randomize_batch_norms(getattr(keras.applications, name)(
                    weights=None, input_shape=(32, 32, 3), classes=5, classifier_activation=None))
                plan, small = self._check(model)
                self.assertLess(small.count_params(), 0.4 * model.count_params())
                self.assertEqual(small.output_shape, model.output_shape)
