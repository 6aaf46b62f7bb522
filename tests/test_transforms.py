"""prune() and strip() on Sequential, Functional, nested and shared-layer models."""

import os
import subprocess
import sys
import tempfile

import keras
import numpy as np
import pytest

import tfopt
from tfopt import testing


def _functional():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.DepthwiseConv2D(3, name="dw")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    inner = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu", name="inner_dense")], name="block")
    x = inner(x)
    shared = keras.layers.Dense(16, name="shared")
    a = shared(x)
    b = shared(keras.layers.Dense(16, name="side")(x))
    x = keras.layers.Add()([a, b])
    outputs = keras.layers.Dense(10, name="head")(x)
    return keras.Model(inputs, outputs)


class PruneTest(testing.TestCase):
    def test_swaps_layers_keeps_names_weights_topology_and_outputs(self):
        model = _functional()
        pruned = tfopt.prune(model, "baseline")
        x = self.make_input((4, 8, 8, 3))
        self.assertAllEqual(pruned(x), model(x))
        names = [layer.name for layer in tfopt._keras_internal.all_layers(pruned)]
        self.assertEqual(names, [layer.name for layer in tfopt._keras_internal.all_layers(model)])
        self.assertEqual(pruned.name, model.name)
        by_name = {layer.name: layer for layer in tfopt._keras_internal.all_layers(pruned)}
        for name in ("conv", "dw", "inner_dense", "shared", "side", "head"):
            self.assertIsInstance(by_name[name], tfopt.layers.Prunable, name)
        # The shared layer is still one layer, called twice.
        self.assertEqual(len(by_name["shared"]._inbound_nodes), 2)
        self.assertFalse(pruned.compiled)

    def test_layers_selects_by_name_type_and_predicate(self):
        model = _functional()
        by_name = tfopt.prune(model, "baseline", layers=["head", "conv"])
        by_type = tfopt.prune(model, "baseline", layers=keras.layers.Dense)
        by_pred = tfopt.prune(model, "baseline", layers=lambda layer: layer.name.startswith("s"))

        def pruned_names(m):
            return sorted(layer.name for layer in tfopt._keras_internal.all_layers(m) if isinstance(layer, tfopt.layers.Prunable))

        self.assertEqual(pruned_names(by_name), ["conv", "head"])
        self.assertEqual(pruned_names(by_type), ["head", "inner_dense", "shared", "side"])
        self.assertEqual(pruned_names(by_pred), ["shared", "side"])

    def test_fit_prunes_shared_and_nested_layers(self):
        pruned = tfopt.prune(_functional(), tfopt.schedules.ConstantSparsity(0.5, frequency=1))
        pruned.compile("adam", "mse")
        pruned.fit(self.make_input((8, 8, 8, 3)), np.ones((8, 10)), batch_size=4, verbose=0)
        for row in tfopt.summary(pruned, print_fn=None)[:-1]:
            self.assertAlmostEqual(row["sparsity"], 0.5, places=2, msg=row["layer"])

    def test_errors(self):
        model = _functional()
        with self.assertRaisesRegex(ValueError, r"Layer 'add'.*no prunable weights"):
            tfopt.prune(model, "baseline", layers="add")
        with self.assertRaisesRegex(ValueError, r"\['missing'\].*Layer names are"):
            tfopt.prune(model, "baseline", layers="missing")
        with self.assertRaisesRegex(ValueError, r"needs a `pruning_schedule`"):
            tfopt.prune(model, None)

        class Sub(keras.Model):
            def call(self, x):
                return x

        with self.assertRaisesRegex(TypeError, r"subclassed model.*tfopt.callbacks.Pruning"):
            tfopt.prune(Sub(), "baseline")

        class MyDense(keras.layers.Dense):
            pass

        custom = keras.Sequential([keras.Input((4,)), MyDense(4, name="mine")])
        with self.assertRaisesRegex(TypeError, r"Layer 'mine' \(MyDense\) has a kernel but no tfopt twin.*callbacks.Pruning"):
            tfopt.prune(custom, "baseline", layers="mine")

    @pytest.mark.slow
    def test_applications_mobilenet_v2_prunes_strips_and_exports(self):
        model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10)
        pruned = tfopt.prune(model, tfopt.schedules.ConstantSparsity(0.5, frequency=1))
        # Eagerly: tracing the 50-odd mask updates is most of a minute; the traced pruned step
        # of this model is tests/test_distributed.py's CollectiveCountTest.
        pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(), run_eagerly=True)
        x = self.make_input((4, 32, 32, 3))
        pruned.fit(x, np.arange(4), verbose=0)
        total = tfopt.summary(pruned, print_fn=None)
        for row in total[:-1]:
            self.assertAlmostEqual(row["sparsity"], 0.5, delta=0.01, msg=row["layer"])
        report = tfopt.export(pruned, os.path.join(tempfile.mkdtemp(), "mnv2.tflite"), inputs=x[:2])
        self.assertLess(report.max_abs_diff, 1e-4)


class StripTest(testing.TestCase):
    def test_strip_gives_plain_keras_model_loadable_without_tfopt(self):
        pruned = tfopt.prune(_functional(), tfopt.schedules.ConstantSparsity(0.5, frequency=1))
        pruned.compile("adam", "mse")
        x = self.make_input((8, 8, 8, 3))
        pruned.fit(x, np.ones((8, 10)), batch_size=4, verbose=0)
        stripped = tfopt.strip(pruned)
        self.assertAllClose(stripped(x), pruned(x), atol=1e-6)
        for layer in tfopt._keras_internal.all_layers(stripped):
            self.assertTrue(type(layer).__module__.startswith("keras."), type(layer))
        self.assertEqual(len(stripped.weights), len(_functional().weights))
        path = os.path.join(tempfile.mkdtemp(), "stripped.keras")
        stripped.save(path)
        np.save(path + ".x.npy", x[:2])
        np.save(path + ".y.npy", keras.ops.convert_to_numpy(stripped(x[:2])))
        code = (
            "import sys, numpy as np, keras\n"
            f"m = keras.models.load_model({path!r})\n"
            f"np.testing.assert_allclose(m(np.load({path + '.x.npy'!r})), np.load({path + '.y.npy'!r}), atol=1e-6)\n"
            "assert 'tfopt' not in sys.modules\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])

    def test_tfopt_keras_file_needs_tfopt_import_and_says_so(self):
        model = keras.Sequential([keras.Input((4,)), tfopt.layers.Dense(2, pruning_schedule="baseline")])
        path = os.path.join(tempfile.mkdtemp(), "pruned.keras")
        model.save(path)
        code = f"import keras\nkeras.models.load_model({path!r})\n"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        self.assertNotEqual(result.returncode, 0)
        # Keras names the missing registered class and how it must be registered.
        self.assertIn("tfopt>Dense", result.stderr)
        self.assertIn("register_keras_serializable", result.stderr)
        loaded = tfopt.load_model(path)
        self.assertIsInstance(loaded.layers[0], tfopt.layers.Dense)

    def test_strip_subclassed_in_place(self):
        class Net(keras.Model):
            def __init__(self):
                super().__init__()
                self.d = keras.layers.Dense(4, kernel_constraint=keras.constraints.MaxNorm(10.0))

            def call(self, x):
                return self.d(x)

        net = Net()
        net.compile("adam", "mse")
        net.fit(np.ones((4, 8)), np.ones((4, 4)), verbose=0,
                callbacks=[tfopt.callbacks.Pruning(tfopt.schedules.ConstantSparsity(0.5, frequency=1))])
        out = tfopt.strip(net)
        self.assertIs(out, net)
        self.assertIsInstance(net.d.kernel.constraint, keras.constraints.MaxNorm)
        self.assertEqual(float(np.mean(net.d.kernel.numpy() == 0)), 0.5)


class QuantizeModelTest(testing.TestCase):
    def test_sequential_cnn_int8_export_parity(self):
        from tfopt.demo.data import compile_classifier, build_cnn, load_digits

        x_train, y_train, x_test, y_test = load_digits(0)
        model = build_cnn()
        compile_classifier(model)
        model.fit(x_train, y_train, epochs=3, verbose=0)
        qat = tfopt.quantize_model(model)
        self.assertEqual([type(layer).__name__ for layer in qat.layers],
                         ["InputLayer", "QuantizeActivation", "Conv2D", "MaxPooling2D", "Conv2D",
                          "MaxPooling2D", "Flatten", "Dense", "Dense"])
        for old, new in zip(model.layers, qat.layers[2:]):
            for a, b in zip(old.weights, new.weights):
                self.assertAllEqual(a, b)
        compile_classifier(qat, 5e-4)
        qat.fit(x_train, y_train, epochs=2, verbose=0)
        report = tfopt.export(qat, os.path.join(tempfile.mkdtemp(), "q.tflite"), inputs=x_test, precision="int8")
        self.assertEqual(report.float_ops, [])
        self.assertGreaterEqual(report.top1_agreement, 0.99)

    def test_branches_and_nested_models_get_ranges(self):
        inputs = keras.Input((8, 8, 1), name="image")
        a = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="a")(inputs)
        b = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="b")(inputs)
        x = keras.layers.Add(name="add")([a, b])
        x = keras.layers.Concatenate(name="cat")([x, a])
        x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
        head = keras.Sequential([keras.Input((16,)), keras.layers.Dense(10, name="head_dense")], name="head")
        model = keras.Model(inputs, head(x))
        qat = tfopt.quantize_model(model)
        names = [layer.name for layer in tfopt._keras_internal.all_layers(qat)]
        for name in ("image_quantize", "add_quantize", "cat_quantize", "gap_quantize"):
            self.assertIn(name, names)
        by_name = {layer.name: layer for layer in tfopt._keras_internal.all_layers(qat)}
        self.assertIsNotNone(by_name["head_dense"].output_quant_spec)
        qat.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x_data = self.make_input((32, 8, 8, 1))
        qat.fit(x_data, np.arange(32) % 10, verbose=0)
        report = tfopt.export(qat, os.path.join(tempfile.mkdtemp(), "b.tflite"), inputs=x_data, precision="int8")
        self.assertEqual(report.float_ops, [])
        self.assertGreaterEqual(report.top1_agreement, 0.9)

    def test_unsupported_layers_are_listed_or_left_in_float(self):
        class Scale(keras.layers.Layer):
            def call(self, x):
                return 2.0 * x

        inputs = keras.Input((8,))
        x = Scale(name="scale")(keras.layers.Dense(8)(inputs))
        model = keras.Model(inputs, keras.layers.Dense(2)(x))
        with self.assertRaisesRegex(ValueError, r"\['scale \(Scale\)'\].*unsupported='float'"):
            tfopt.quantize_model(model)
        qat = tfopt.quantize_model(model, unsupported="float")
        self.assertIsInstance(qat.get_layer("scale"), Scale)
        with self.assertRaisesRegex(ValueError, r"Unknown precision: 'int7'"):
            tfopt.quantize_model(model, "int7")

    def test_convnext_layer_scale_is_known(self):
        model = keras.applications.ConvNeXtTiny(input_shape=(32, 32, 3), weights=None, classes=10)
        qat = tfopt.quantize_model(model)  # no longer refused for its LayerScale layers
        scale = next(layer for layer in qat.layers if type(layer).__name__ == "LayerScale")
        self.assertIsInstance(qat.get_layer(f"{scale.name}_quantize"), tfopt.layers.QuantizeActivation)

    def test_known_float_layers_stay_float_with_a_range_after_them(self):
        inputs = keras.Input((4, 8))
        x = keras.layers.Dense(8)(inputs)
        x = keras.layers.MultiHeadAttention(2, 4, use_gate=True, name="gated")(x, x)  # its twin refuses a gate
        x = keras.layers.SimpleRNN(4, name="rnn")(x)
        with self.assertWarnsRegex(UserWarning, "use_gate"):
            qat = tfopt.quantize_model(keras.Model(inputs, keras.layers.Dense(2)(x)))
        self.assertIs(type(qat.get_layer("gated")), keras.layers.MultiHeadAttention)
        self.assertIsInstance(qat.get_layer("gated_quantize"), tfopt.layers.QuantizeActivation)
        self.assertIsInstance(qat.get_layer("rnn_quantize"), tfopt.layers.QuantizeActivation)

    def test_token_ids_in_a_float_input_reach_the_embedding_exact(self):
        # A float Input of token ids (as keras-io text models have) into an
        # Embedding: rounded to an activation grid, ids 1, 2, 3, 100 and 5000
        # became 0, 0, 0, 76.6 and 4978.6.
        inputs = keras.Input((5,), name="tokens")
        x = keras.layers.Embedding(5001, 8, name="embedding")(inputs)
        x = keras.layers.GlobalAveragePooling1D(name="gap")(x)
        model = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
        qat = tfopt.quantize_model(model)
        self.assertNotIn("tokens_quantize", [layer.name for layer in qat.layers])
        ids = np.array([[1, 2, 3, 100, 5000]] * 4, "float32")
        qat.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        qat.fit(ids, np.arange(4) % 3, epochs=2, verbose=0)
        lookups = keras.Model(qat.input, qat.get_layer("embedding").output)(ids)
        self.assertAllEqual(lookups, qat.get_layer("embedding")(ids.astype("int32")))
        report = tfopt.export(qat, os.path.join(tempfile.mkdtemp(), "e.tflite"), inputs=ids, precision="int8")
        self.assertEqual(report.top1_agreement, 1.0)
        self.assertLess(report.max_abs_diff, 0.05)

    def test_index_inputs_stay_exact_through_reshapes_and_next_to_value_inputs(self):
        # The same float input read as ids (through a Reshape) and as values.
        inputs = keras.Input((4,), name="ids")
        e = keras.layers.Embedding(50, 4, name="embedding")(keras.layers.Reshape((4,), name="reshape")(inputs))
        x = keras.layers.Concatenate(name="cat")([keras.layers.Flatten()(e), keras.layers.Dense(4, name="side")(inputs)])
        model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
        the_plan = tfopt.transforms.quantize.plan(model)
        self.assertEqual(the_plan.index_readers, {"embedding", "reshape"})
        qat = tfopt.quantize_model(model)
        self.assertIs(qat.get_layer("side").input, qat.get_layer("ids_quantize").output)
        self.assertIs(qat.get_layer("reshape").input, qat.get_layer("ids").output)

    def test_a_layer_normalization_reads_values_whatever_its_weights(self):
        # With gamma 5 and beta 0.1, Keras's LayerNormalization gave the same output for
        # constant rows of 1.0 and 1.4 and (by one rounding step) another for 2.0: a
        # constant probe took it for a lookup, and the Add before it lost its range, so
        # a trained transformer's int8 file kept ADD, MEAN and SUB in float.
        inputs = keras.Input((8, 64))
        x = keras.layers.Add(name="add")([keras.layers.Dense(64)(inputs), inputs])
        norm = keras.layers.LayerNormalization(epsilon=1e-6, name="norm")
        model = keras.Model(inputs, keras.layers.Dense(3)(norm(x)))
        norm.set_weights([np.full(64, 5.0, "float32"), np.full(64, 0.1, "float32")])
        self.assertEqual(tfopt.transforms.quantize.plan(model).index_readers, set())
        qat = tfopt.quantize_model(model)
        self.assertIs(qat.get_layer("norm").input, qat.get_layer("add_quantize").output)

    def test_an_unknown_layer_that_looks_up_its_input_is_probed(self):
        @keras.saving.register_keras_serializable(package="tfopt_tests")
        class Lookup(keras.layers.Layer):
            def build(self, input_shape):
                self.table = self.add_weight(shape=(10, 4), initializer="random_normal")

            def call(self, x):
                return keras.ops.take(self.table, keras.ops.cast(x, "int32"), axis=0)

        inputs = keras.Input((3,), name="ids")
        x = keras.layers.Flatten()(Lookup(name="lookup")(inputs))
        model = keras.Model(inputs, keras.layers.Dense(2)(x))
        self.assertEqual(tfopt.transforms.quantize.plan(model, unsupported="float").index_readers, {"lookup"})

    @pytest.mark.slow
    def test_keras_hub_backbone_keeps_its_dict_of_outputs(self):
        keras_hub = pytest.importorskip("keras_hub")
        backbone = keras_hub.models.BertBackbone(vocabulary_size=100, num_layers=1, num_heads=2, hidden_dim=8,
                                                 intermediate_dim=16, max_sequence_length=16)
        qat = tfopt.quantize_model(backbone, unsupported="float")
        self.assertEqual(sorted(qat.output), ["pooled_output", "sequence_output"])
        x = {"token_ids": np.array([[5, 6, 7, 0]]), "segment_ids": np.zeros((1, 4), "int32"),
             "padding_mask": np.array([[1, 1, 1, 0]])}
        out = qat(x)
        self.assertEqual(tuple(out["sequence_output"].shape), (1, 4, 8))
        self.assertEqual(tuple(out["pooled_output"].shape), (1, 8))

    def test_nested_outputs_keep_their_structure(self):
        inputs = keras.Input((4,))
        a, b = keras.layers.Dense(2, name="a")(inputs), keras.layers.Dense(3, name="b")(inputs)
        model = keras.Model(inputs, {"first": a, "rest": [b, keras.layers.ReLU(name="r")(b)]})
        qat = tfopt.quantize_model(model)
        out = qat(self.make_input((2, 4)))
        self.assertEqual(sorted(out), ["first", "rest"])
        self.assertIsInstance(out["rest"], list)
        self.assertEqual([tuple(t.shape) for t in out["rest"]], [(2, 3), (2, 3)])

    def test_pruned_model_keeps_masks_and_sparsity_through_qat(self):
        model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(4)])
        pruned = tfopt.prune(model, tfopt.schedules.ConstantSparsity(0.75, begin_step=0, frequency=1))
        pruned.compile("adam", "mse")
        x, y = self.make_input((32, 16)), self.make_input((32, 4), seed=1)
        pruned.fit(x, y, verbose=0)
        qat = tfopt.quantize_model(pruned, "int8")
        dense = qat.layers[2]
        self.assertAllEqual(dense.kernel_mask, pruned.layers[0].kernel_mask)
        self.assertAllEqual(dense.kernel, pruned.layers[0].kernel)
        qat.compile("adam", "mse")
        qat.fit(x, y, epochs=2, verbose=0)
        report = tfopt.export(qat, os.path.join(tempfile.mkdtemp(), "sq.tflite"), inputs=x, precision="int8")
        self.assertEqual(report.float_ops, [])
        self.assertAllClose(report.sparsity, 0.75, atol=0.01)

    def test_per_layer_overrides(self):
        inputs = keras.Input((8, 8, 1))
        x = keras.layers.Conv2D(4, 3, name="conv_a")(inputs)
        x = keras.layers.Conv2D(4, 3, name="conv_b")(x)
        x = keras.layers.Flatten()(x)
        x = keras.layers.Dense(8, name="hidden")(x)
        model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
        qat = tfopt.quantize_model(model, "int8", overrides={
            "conv_a": "int8",                 # first match wins over the type below
            keras.layers.Conv2D: "int4",
            (lambda layer: layer.name == "head"): None,  # stays float
        })
        self.assertEqual(qat.get_layer("conv_a").quantization_aware, "int8")
        self.assertEqual(qat.get_layer("conv_b").quantization_aware, "int4")
        self.assertEqual(qat.get_layer("hidden").quantization_aware, "int8")
        self.assertIs(type(qat.get_layer("head")), keras.layers.Dense)
        with self.assertRaisesRegex(ValueError, r"`overrides\['conv_a'\]`: Unknown precision: 'int5'"):
            tfopt.quantize_model(model, overrides={"conv_a": "int5"})
        with self.assertRaisesRegex(ValueError, r"\['nope'\], which are not layers"):
            tfopt.quantize_model(model, overrides={"nope": "int4"})
        with self.assertRaisesRegex(TypeError, r"`overrides` must be a dict"):
            tfopt.quantize_model(model, overrides=["conv_a"])


class BatchNormFoldingTest(testing.TestCase):
    def test_conv_bn_is_folded_trains_exports_and_reloads(self):
        from tfopt.demo.data import load_digits

        x_train, y_train, x_test, _ = load_digits(0)
        inputs = keras.Input((8, 8, 1))
        x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="conv")(inputs)
        x = keras.layers.BatchNormalization(name="bn")(x)
        x = keras.layers.ReLU(6.0)(x)
        y = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
        y = keras.layers.BatchNormalization(name="dw_bn")(y)
        x = keras.layers.Add()([x, keras.layers.ReLU(6.0)(y)])
        outputs = keras.layers.Dense(10, activation="softmax", name="head")(keras.layers.GlobalAveragePooling2D()(x))
        model = keras.Model(inputs, outputs)
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy())
        model.fit(x_train, y_train, epochs=8, verbose=0)
        qat = tfopt.quantize_model(model)
        names = [layer.name for layer in qat.layers]
        self.assertNotIn("bn", names)
        self.assertNotIn("dw_bn", names)
        self.assertIn("head_activation", names)  # softmax split off: TFLite fuses only ReLU/ReLU6
        conv = qat.get_layer("conv")
        self.assertEqual(conv.folded_batch_norm["epsilon"], model.get_layer("bn").epsilon)
        self.assertAllEqual(conv.bn_moving_variance, model.get_layer("bn").moving_variance)
        qat.compile("adam", keras.losses.SparseCategoricalCrossentropy())
        qat.fit(x_train, y_train, epochs=2, verbose=0)
        report = tfopt.export(qat, os.path.join(tempfile.mkdtemp(), "f.tflite"), inputs=x_test, precision="int8")
        self.assertEqual(report.float_ops, [])
        self.assertLessEqual(report.max_abs_diff, 0.05)  # probabilities, int8 step 1/256
        self.assertGreaterEqual(report.top1_agreement, 0.9)
        path = os.path.join(tempfile.mkdtemp(), "folded.keras")
        qat.save(path)
        loaded = keras.models.load_model(path)
        self.assertAllClose(loaded.predict(x_test[:8], verbose=0), qat.predict(x_test[:8], verbose=0), atol=1e-6)
        stripped = tfopt.strip(qat)
        self.assertTrue(stripped.get_layer("conv").use_bias)
        self.assertAllClose(stripped.predict(x_test[:8], verbose=0), qat.predict(x_test[:8], verbose=0), atol=0.05)

    def test_fold_without_qat_is_refused(self):
        with self.assertRaisesRegex(ValueError, r"Layer 'c'.*`folded_batch_norm` without `quantization_aware`"):
            tfopt.layers.Conv2D(4, 3, name="c", folded_batch_norm={"epsilon": 1e-3})


@pytest.mark.slow
class ApplicationsInt8Test(testing.TestCase):
    """keras.applications built with weights=None: quantize_model -> one fit step ->
    int8 export -> every op integer (QUANTIZE/DEQUANTIZE at the edges only).

    The fit step runs eagerly: tracing a train step of these graphs is most of
    a minute each (ResNet50: 29 s traced, 2.6 s eager), and the traced QAT step of an
    inverted-residual net is covered by tests/test_distributed.py. ResNet50 (42 s
    here, its patterns those of the nets above) is left to
    `python benchmarks/applications.py`, which exports 14 families."""

    def _check(self, build):
        model = build(input_shape=(32, 32, 3), weights=None, classes=10)
        qat = tfopt.quantize_model(model)
        qat.compile("adam", keras.losses.SparseCategoricalCrossentropy(), run_eagerly=True)
        x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
        qat.fit(x, np.arange(8), verbose=0)
        report = tfopt.export(qat, os.path.join(tempfile.mkdtemp(), "app.tflite"), inputs=x[:4], precision="int8")
        self.assertEqual(report.float_ops, [])
        self.assertEqual(report.top1_agreement, 1.0)
        return report

    def test_mobilenet_v2(self):
        self._check(lambda **kw: keras.applications.MobileNetV2(alpha=0.35, **kw))

    def test_mobilenet_v3_small_hard_swish_and_rescaling(self):
        self._check(keras.applications.MobileNetV3Small)

    def test_efficientnet_b0_rescaling_and_normalization(self):
        self._check(keras.applications.EfficientNetB0)


class SummaryTest(testing.TestCase):
    def test_summary_reports_bits_and_estimated_bytes(self):
        model = keras.Sequential([
            keras.Input((16,)), tfopt.layers.QuantizeActivation(),
            tfopt.layers.Dense(8, quantization_aware="int4", name="q4"),
            tfopt.layers.Dense(4, quantization_aware="binary", name="b"),
            keras.layers.Dense(2, name="f"),
        ])
        lines = []
        rows = tfopt.summary(model, print_fn=lines.append)
        by_layer = {r["layer"]: r for r in rows}
        self.assertEqual((by_layer["q4"]["bits"], by_layer["q4"]["est_bytes"]), (4, 64))
        self.assertEqual((by_layer["b"]["bits"], by_layer["b"]["est_bytes"]), (1, 4))
        self.assertEqual((by_layer["f"]["bits"], by_layer["f"]["est_bytes"]), (32, 32))
        self.assertEqual(by_layer["total"]["est_bytes"], 100)
        self.assertIn("est_bytes", lines[0])


class MisuseBehaviourTest(testing.TestCase):
    """Issue 11: strip gives Keras layers only; Lambda layers go through every transform."""

    def test_strip_of_a_qat_model_is_plain_keras_and_exports_float(self):
        model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Rescaling(1 / 255.0),
                                  keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.Flatten(),
                                  keras.layers.Dense(2)])
        qat = tfopt.quantize_model(model)
        qat.compile("adam", "mse")
        x = np.random.rand(8, 8, 8, 1).astype("float32") * 255
        qat.fit(x, np.random.rand(8, 2), verbose=0)
        stripped = tfopt.strip(qat)
        modules = {type(layer).__module__.split(".")[0] for layer in tfopt._keras_internal.all_layers(stripped)}
        self.assertEqual(modules, {"keras"})
        self.assertNotIn("QuantizeActivation", [type(layer).__name__ for layer in stripped.layers])
        path = os.path.join(tempfile.mkdtemp(), "float.tflite")
        report = tfopt.export(stripped, path)
        with open(path, "rb") as f:
            ops = {op["op_name"] for op in tfopt._keras_internal.litert_ops(_interpreter(f.read()))}
        self.assertNotIn("QUANTIZE", ops)
        self.assertLess(report.max_abs_diff, 1e-4)

    def test_lambda_layers_go_through_prune_quantize_strip_and_export(self):
        inputs = keras.Input((4,))
        x = keras.layers.Dense(8, name="hidden")(inputs)
        x = keras.layers.Lambda(lambda t: t * 2.0, name="double")(x)
        model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
        pruned = tfopt.prune(model, "baseline")
        qat = tfopt.quantize_model(model, unsupported="float")
        stripped = tfopt.strip(pruned)
        x_in = np.random.rand(4, 4).astype("float32")
        self.assertAllClose(stripped(x_in), model(x_in))
        self.assertIn("double", [layer.name for layer in qat.layers])
        report = tfopt.export(pruned, os.path.join(tempfile.mkdtemp(), "lambda.tflite"))
        self.assertLess(report.max_abs_diff, 1e-5)


def _interpreter(content):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_content=content)
