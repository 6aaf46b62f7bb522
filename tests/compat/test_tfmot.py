"""tfopt.compat: tfmot's guides' code on Keras 3, and tfmot-trained models converted."""

import os
import subprocess
import sys
import tempfile

import keras
import numpy as np
import pytest

import tfopt
from tfopt import testing
from tfopt.compat import tfmot


def _data(n=128, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 16)).astype("float32"), rng.integers(0, 4, n)


def _base():
    return keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu", name="d1"),
                             keras.layers.Dense(4, name="d2")])


class PruningGuideTest(testing.TestCase):
    """The code of tfmot's pruning guides, with `tfmot` from tfopt.compat."""

    def test_whole_model_polynomial_decay_with_summaries_and_strip(self):
        x, y = _data()
        end_step = 4 * 8
        pruning_params = {"pruning_schedule": tfmot.sparsity.keras.PolynomialDecay(
            initial_sparsity=0.50, final_sparsity=0.80, begin_step=0, end_step=end_step, frequency=4)}
        model_for_pruning = tfmot.sparsity.keras.prune_low_magnitude(_base(), **pruning_params)
        model_for_pruning.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                                  metrics=["accuracy"])
        logdir = tempfile.mkdtemp()
        callbacks = [tfmot.sparsity.keras.UpdatePruningStep(), tfmot.sparsity.keras.PruningSummaries(log_dir=logdir)]
        model_for_pruning.fit(x, y, batch_size=16, epochs=4, callbacks=callbacks, verbose=0)
        model_for_export = tfmot.sparsity.keras.strip_pruning(model_for_pruning)
        self.assertIs(type(model_for_export.get_layer("d1")), keras.layers.Dense)
        kernel = model_for_export.get_layer("d1").kernel.numpy()
        self.assertAllClose(float(np.mean(kernel == 0)), 0.8, atol=0.01)
        self.assertTrue(os.listdir(os.path.join(logdir, "tfopt")))

    def test_layer_wise_with_clone_function_and_in_sequential(self):
        base = _base()

        def apply_pruning_to_dense(layer):
            if isinstance(layer, keras.layers.Dense):
                return tfmot.sparsity.keras.prune_low_magnitude(layer)
            return layer

        model_for_pruning = keras.models.clone_model(base, clone_function=apply_pruning_to_dense)
        for name in ("d1", "d2"):
            self.assertIsInstance(model_for_pruning.get_layer(name), tfopt.layers.Dense)
            self.assertAllEqual(model_for_pruning.get_layer(name).kernel, base.get_layer(name).kernel)
        sequential = keras.Sequential([
            keras.Input((16,)),
            tfmot.sparsity.keras.prune_low_magnitude(keras.layers.Dense(8), sparsity_m_by_n=(2, 4)),
            keras.layers.Flatten(),
        ])
        self.assertEqual(str(sequential.layers[0].structure), "NM(n=2, m=4)")
        x, y = _data()
        model_for_pruning.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model_for_pruning.fit(x, y, verbose=0, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])

    def test_differences_are_clear_errors(self):
        with self.assertRaisesRegex(ValueError, "block_pooling_type must be 'AVG'"):
            tfmot.sparsity.keras.prune_low_magnitude(keras.layers.Dense(2), block_size=(1, 2),
                                                     block_pooling_type="MAX")
        with self.assertRaisesRegex(ValueError, "`pruning_policy` is not supported"):
            tfmot.sparsity.keras.prune_low_magnitude(_base(), pruning_policy=object())
        with self.assertRaisesRegex(ValueError, "no prunable twin of LayerNormalization"):
            tfmot.sparsity.keras.prune_low_magnitude(keras.layers.LayerNormalization())


class QuantizationGuideTest(testing.TestCase):
    def test_quantize_model_and_convert(self):
        import tensorflow as tf

        x, y = _data()
        q_aware_model = tfmot.quantization.keras.quantize_model(_base())
        q_aware_model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        q_aware_model.fit(x, y, batch_size=16, epochs=1, verbose=0)
        converter = tf.lite.TFLiteConverter.from_keras_model(q_aware_model)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        self.assertEqual(tfopt.exporting.float_ops(converter.convert()), [])

    def test_annotate_some_layers_then_apply(self):
        base = _base()

        def apply_quantization_to_dense(layer):
            if layer.name == "d1":
                return tfmot.quantization.keras.quantize_annotate_layer(layer)
            return layer

        annotated_model = keras.models.clone_model(base, clone_function=apply_quantization_to_dense)
        with tfmot.quantization.keras.quantize_scope():
            quant_aware_model = tfmot.quantization.keras.quantize_apply(annotated_model)
        self.assertIsNotNone(quant_aware_model.get_layer("d1").output_quant_spec)
        self.assertIs(type(quant_aware_model.get_layer("d2")), keras.layers.Dense)
        whole = tfmot.quantization.keras.quantize_apply(tfmot.quantization.keras.quantize_annotate_model(_base()))
        self.assertIsNotNone(whole.get_layer("d2").output_quant_spec)
        with self.assertRaisesRegex(ValueError, "no layer of the model is annotated"):
            tfmot.quantization.keras.quantize_apply(_base())
        with self.assertRaisesRegex(ValueError, "not a tfmot QuantizeConfig"):
            tfmot.quantization.keras.quantize_annotate_layer(keras.layers.Dense(2), quantize_config=object())


_MAKE_TFMOT_MODEL = r'''
import os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np, tensorflow_model_optimization as tfmot, tf_keras
out = sys.argv[1]
rng = np.random.default_rng(0)
x, y = rng.standard_normal((128, 16)).astype("float32"), rng.integers(0, 4, 128)
tf_keras.utils.set_random_seed(0)
base = tf_keras.Sequential([tf_keras.Input((16,)), tf_keras.layers.Dense(32, activation="relu", name="d1"),
                            tf_keras.layers.Dense(4, name="d2")])
schedule = tfmot.sparsity.keras.PolynomialDecay(0.0, 0.75, 0, 16, frequency=2)
model = tfmot.sparsity.keras.prune_low_magnitude(base, pruning_schedule=schedule)
model.compile("adam", tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
model.save(os.path.join(out, "pruned.h5"))
np.save(os.path.join(out, "x.npy"), x)
np.save(os.path.join(out, "outputs.npy"), model.predict(x, verbose=0))
if "--qat" in sys.argv:
    float_model = tf_keras.Sequential([tf_keras.Input((16,)), tf_keras.layers.Dense(32, activation="relu", name="q1"),
                                       tf_keras.layers.Dense(4, name="q2")])
    q = tfmot.quantization.keras.quantize_model(float_model)
    q.compile("adam", tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x, y, batch_size=16, epochs=2, verbose=0)
    q.save(os.path.join(out, "qat.h5"))
    np.save(os.path.join(out, "qat_outputs.npy"), q.predict(x, verbose=0))
    functional_in = tf_keras.Input((16,))
    functional = tf_keras.Model(functional_in, tf_keras.layers.Dense(4)(functional_in))
    tfmot.quantization.keras.quantize_model(functional).save(os.path.join(out, "qat_functional.h5"))
print("OK")
'''


@pytest.mark.slow
class FromTfmotTest(testing.TestCase):
    def test_tfmot_pruned_model_converts_with_the_same_outputs(self):
        out = tempfile.mkdtemp()
        result = subprocess.run([sys.executable, "-c", _MAKE_TFMOT_MODEL, out, "--qat"], capture_output=True,
                                text=True, timeout=600)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        model = tfopt.compat.from_tfmot(os.path.join(out, "pruned.h5"))
        x, expected = np.load(os.path.join(out, "x.npy")), np.load(os.path.join(out, "outputs.npy"))
        self.assertAllClose(model.predict(x, verbose=0), expected, atol=1e-5, rtol=1e-5)
        d1 = model.get_layer("d1")
        self.assertIsInstance(d1, tfopt.layers.Dense)
        self.assertAllEqual(d1.kernel_mask.numpy(), (d1.kernel.numpy() != 0).astype("float32"))
        self.assertAllClose(float(np.mean(d1.kernel.numpy() == 0)), 0.75, atol=0.02)
        self.assertGreater(int(d1.pruning_step.numpy()), 0)
        # it goes on training with its masks
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, np.zeros(len(x), "int64"), verbose=0)
        self.assertAllClose(float(np.mean(d1.kernel.numpy() == 0)), 0.75, atol=0.02)
        qat = tfopt.compat.from_tfmot(os.path.join(out, "qat.h5"))
        self.assertIsNotNone(qat.get_layer("q1").output_quant_spec)
        got, want = qat.predict(x, verbose=0), np.load(os.path.join(out, "qat_outputs.npy"))
        step = (qat.get_layer("q2").output_range_max.numpy() - qat.get_layer("q2").output_range_min.numpy()) / 255
        self.assertLessEqual(float(np.max(np.abs(got - want))), step + 1e-5)  # at most one int8 step apart
        self.assertGreaterEqual(float(np.mean(got.argmax(-1) == want.argmax(-1))), 0.99)
        with self.assertRaisesRegex(ValueError, "Functional model quantized with tfmot"):
            tfopt.compat.from_tfmot(os.path.join(out, "qat_functional.h5"))
        with self.assertRaisesRegex(FileNotFoundError, "no such file"):
            tfopt.compat.from_tfmot(os.path.join(out, "missing.h5"))
        with self.assertRaisesRegex(TypeError, "needs no conversion"):
            tfopt.compat.from_tfmot(_base())
