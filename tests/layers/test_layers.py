"""Every tfopt layer against its Keras namesake, through the shared harness."""

import inspect
import operator

import keras
import numpy as np
from absl.testing import parameterized

import tfopt
from tfopt import testing
from tfopt.testing import backends
import pytest

pytestmark = pytest.mark.backend_neutral

# (tfopt class, Keras class, kwargs, input shape, pruned weight paths, input dtype)
_LAYERS_UNDER_TEST = [
    (tfopt.layers.Dense, keras.layers.Dense, {"units": 4}, (2, 8), ("kernel",), "float32"),
    (tfopt.layers.EinsumDense, keras.layers.EinsumDense,
     {"equation": "ab,bc->ac", "output_shape": 4, "bias_axes": "c"}, (2, 8), ("kernel",), "float32"),
    (tfopt.layers.Embedding, keras.layers.Embedding, {"input_dim": 10, "output_dim": 4}, (2, 3), ("embeddings",), "int32"),
    (tfopt.layers.Conv1D, keras.layers.Conv1D, {"filters": 4, "kernel_size": 3}, (2, 6, 4), ("kernel",), "float32"),
    (tfopt.layers.Conv2D, keras.layers.Conv2D, {"filters": 4, "kernel_size": 3}, (2, 6, 6, 4), ("kernel",), "float32"),
    (tfopt.layers.Conv3D, keras.layers.Conv3D, {"filters": 4, "kernel_size": 2}, (2, 4, 4, 4, 4), ("kernel",), "float32"),
    (tfopt.layers.Conv2DTranspose, keras.layers.Conv2DTranspose, {"filters": 4, "kernel_size": 3}, (2, 5, 5, 4), ("kernel",), "float32"),
    (tfopt.layers.DepthwiseConv2D, keras.layers.DepthwiseConv2D, {"kernel_size": 3}, (2, 6, 6, 4), ("kernel",), "float32"),
    (tfopt.layers.SeparableConv2D, keras.layers.SeparableConv2D, {"filters": 4, "kernel_size": 3}, (2, 6, 6, 4), ("pointwise_kernel",), "float32"),
    # Multi-weight layers, added through `tfopt.geometry` (CONTRIBUTING.md, "a new layer type").
    (tfopt.layers.LSTM, keras.layers.LSTM, {"units": 4}, (2, 5, 3), ("cell.kernel", "cell.recurrent_kernel"), "float32"),
    (tfopt.layers.GRU, keras.layers.GRU, {"units": 4}, (2, 5, 3), ("cell.kernel", "cell.recurrent_kernel"), "float32"),
    (tfopt.layers.SimpleRNN, keras.layers.SimpleRNN, {"units": 4}, (2, 5, 3), ("cell.kernel", "cell.recurrent_kernel"),
     "float32"),
]


def _masks(paths):
    return [f"{path.rsplit('.', 1)[-1]}_mask" for path in paths]


def _expected_names(base, paths):
    """Keras's weight names plus tfopt's, in `layer.weights` order: a layer lists
    its own variables before its sublayers', so where Keras's weights live in a
    sublayer (an RNN's cell), tfopt's come first."""
    tfopt_names = _masks(paths) + ["pruning_step"]
    keras_names = [w.name for w in base.weights]
    return tfopt_names + keras_names if all("." in p for p in paths) else keras_names + tfopt_names


def _set_keras_weights(layer, base):
    """Gives `layer` the weights of its Keras namesake `base`, by name."""
    targets = {w.name: w for w in layer.weights}
    for w in base.weights:
        targets[w.name].assign(w)


class LayersTest(testing.TestCase, parameterized.TestCase):
    @parameterized.parameters(_LAYERS_UNDER_TEST)
    @pytest.mark.tensorflow_only  # Keras's own layer computing, no pruning: the JAX run skips it for time
    def test_basics_without_pruning(self, cls, base_cls, kwargs, shape, weight, dtype):
        base = base_cls(**kwargs)
        base.build(shape)
        self.run_layer_test(cls, kwargs, shape, input_dtype=dtype,
                            expected_weight_names=[w.name for w in base.weights])

    @parameterized.parameters(_LAYERS_UNDER_TEST)
    @pytest.mark.tensorflow_only  # the JAX run skips the harness for time; test_prunes_to_target_in_fit trains each twin
    def test_basics_with_pruning(self, cls, base_cls, kwargs, shape, weights, dtype):
        base = base_cls(**kwargs)
        base.build(shape)
        layer = self.run_layer_test(
            cls, {**kwargs, "pruning_schedule": tfopt.schedules.ConstantSparsity(0.5, frequency=1)},
            shape, input_dtype=dtype,
            expected_weight_names=_expected_names(base, weights))
        self.assertEqual(layer.pruning_step.dtype, tfopt._backend.int_dtype())  # int32 under JAX without x64

    @parameterized.parameters(_LAYERS_UNDER_TEST)
    def test_equals_keras_without_pruning_and_at_zero_sparsity(self, cls, base_cls, kwargs, shape, weight, dtype):
        x = self.make_input(shape, dtype)
        base = base_cls(**kwargs)
        expected = base(x)
        for extra in ({}, {"pruning_schedule": tfopt.schedules.ConstantSparsity(0.0)}):
            layer = cls(**kwargs, **extra)
            layer.build(shape)
            _set_keras_weights(layer, base)
            self.assertAllEqual(layer(x), expected)

    @parameterized.parameters(_LAYERS_UNDER_TEST)
    def test_signature_is_keras_plus_tfopt_arguments(self, cls, base_cls, *_):
        ours = inspect.signature(cls).parameters
        theirs = inspect.signature(base_cls).parameters
        self.assertEqual([p for p in ours if p not in tfopt.layers.Prunable.TFOPT_ARGUMENTS], list(theirs))
        for name, param in theirs.items():
            self.assertEqual(ours[name].default, param.default, name)
        self.assertIsNone(ours["pruning_schedule"].default)

    @parameterized.parameters(_LAYERS_UNDER_TEST)
    def test_prunes_to_target_in_fit(self, cls, base_cls, kwargs, shape, weights, dtype):
        inputs = keras.Input(shape[1:], dtype=dtype)
        layer = cls(**kwargs, pruning_schedule=tfopt.schedules.ConstantSparsity(0.75, frequency=1))
        model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.Flatten()(layer(inputs))))
        model.compile("adam", "mse")
        model.fit(self.make_input((8,) + shape[1:], dtype), np.ones((8, 1)), batch_size=4, verbose=0,
                  callbacks=backends.layer_callbacks(model))
        for path, mask in zip(weights, _masks(weights)):
            value = keras.ops.convert_to_numpy(operator.attrgetter(path)(layer))
            self.assertAlmostEqual(float(np.mean(value == 0)), round(0.75 * value.size) / value.size, msg=path)
            self.assertAllEqual(getattr(layer, mask), (value != 0).astype("float32"))
        self.assertEqual(int(keras.ops.convert_to_numpy(layer.pruning_step)), 2)  # one count per step, however many weights

    def test_user_kernel_constraint_is_kept_and_applied_first(self):
        layer = tfopt.layers.Dense(3, kernel_constraint=keras.constraints.MaxNorm(0.01),
                                   pruning_schedule=tfopt.schedules.ConstantSparsity(0.5, frequency=1))
        model = keras.Sequential([keras.Input((4,)), layer])
        model.compile(keras.optimizers.SGD(1.0), "mse")
        model.fit(np.ones((4, 4)), np.full((4, 3), 100.0), verbose=0, callbacks=backends.layer_callbacks(model))
        norms = np.sqrt(np.sum(np.square(keras.ops.convert_to_numpy(layer.kernel)), axis=0))
        self.assertTrue(np.all(norms <= 0.01 + 1e-6), norms)
        self.assertEqual(float(np.mean(keras.ops.convert_to_numpy(layer.kernel) == 0)), 0.5)
        self.assertIsInstance(layer.get_config()["kernel_constraint"], dict)
        self.assertEqual(layer.get_config()["kernel_constraint"]["class_name"], "MaxNorm")

    def test_relative_schedule_without_callback_says_what_to_add(self):
        model = keras.Sequential([keras.Input((4,)), tfopt.layers.Dense(2, pruning_schedule="gradual")])
        model.compile("sgd", "mse")
        with self.assertRaisesRegex(ValueError, r"dense.*tfopt.callbacks.Pruning\(\)"):
            model.fit(np.ones((4, 4)), np.ones((4, 2)), verbose=0)

    def test_structure_without_schedule_is_rejected(self):
        with self.assertRaisesRegex(ValueError, "structure='2:4' but no `pruning_schedule`"):
            tfopt.layers.Dense(4, structure="2:4", name="head")

    def test_nm_that_does_not_divide_names_layer_and_fix(self):
        layer = tfopt.layers.Dense(4, pruning_schedule="baseline", structure="2:4", name="head")
        with self.assertRaisesRegex(ValueError, r"Layer 'head'.*multiple of M=4.*Received: dimension 6"):
            layer.build((None, 6))

    def test_unknown_preset_and_structure(self):
        with self.assertRaisesRegex(ValueError, r"pruning_schedule='fast'.*baseline"):
            tfopt.layers.Dense(4, pruning_schedule="fast")
        with self.assertRaisesRegex(ValueError, r"structure='diagonal'.*'2:4'"):
            tfopt.layers.Dense(4, pruning_schedule="baseline", structure="diagonal")

    def test_config_round_trip_keeps_schedule_and_structure(self):
        layer = tfopt.layers.Conv2D(8, 3, pruning_schedule=tfopt.schedules.PolynomialDecay(0.1, 0.9, "10%", "90%", power=2),
                                    structure=(1, 4))
        revived = tfopt.layers.Conv2D.from_config(layer.get_config())
        self.assertEqual(revived.pruning_schedule, layer.pruning_schedule)
        self.assertEqual(revived.structure, tfopt.sparsity.Block((1, 4)))
