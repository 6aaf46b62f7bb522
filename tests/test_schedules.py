"""Schedules: tfmot semantics, relative steps, presets, serialization, bad input."""

import keras
from absl.testing import parameterized

import tfopt
from tfopt import schedules, testing
from tfopt.testing import backends
import pytest

pytestmark = pytest.mark.backend_neutral


class SchedulesTest(testing.TestCase, parameterized.TestCase):
    def test_constant_updates_every_frequency_steps_from_begin(self):
        s = schedules.ConstantSparsity(0.6, begin_step=10, end_step=50, frequency=20)
        fired = [step for step in range(0, 80) if bool(s(step)[0])]
        self.assertEqual(fired, [10, 30, 50])
        self.assertAlmostEqual(float(s(30)[1]), 0.6, places=6)

    def test_constant_without_end_never_stops(self):
        s = schedules.ConstantSparsity(0.5, begin_step=0, frequency=100)
        self.assertTrue(bool(s(10**6)[0]))

    def test_polynomial_matches_tfmot_formula(self):
        s = schedules.PolynomialDecay(0.2, 0.8, begin_step=100, end_step=300, power=3, frequency=10)
        for step in (100, 150, 200, 290, 300, 500):
            p = min(max((step - 100) / 200, 0.0), 1.0)
            expected = 0.8 + (0.2 - 0.8) * (1 - p) ** 3
            self.assertAlmostEqual(float(s(step)[1]), expected, places=5)

    def test_polynomial_always_updates_at_end_step(self):
        s = schedules.PolynomialDecay(0.0, 0.8, begin_step=0, end_step=95, frequency=10)
        fired = [step for step in range(0, 120) if bool(s(step)[0])]
        self.assertEqual(fired[-1], 95)
        self.assertAlmostEqual(float(s(95)[1]), 0.8, places=6)

    def test_works_on_tensors_in_a_compiled_function(self):
        s = schedules.PolynomialDecay(0.0, 0.8, 0, 100, power=1)
        fn = backends.jit(lambda step: s(step))
        should, sparsity = fn(keras.ops.convert_to_tensor(50, "int32"))
        self.assertFalse(bool(should))
        self.assertAlmostEqual(float(sparsity), 0.4, places=6)

    def test_relative_steps_resolve_from_total(self):
        s = schedules.PolynomialDecay(0.0, 0.8, "10%", "60%", frequency="5%")
        self.assertTrue(s.is_relative)
        r = s.resolve(1000)
        self.assertEqual((r.begin_step, r.end_step, r.frequency), (100, 600, 50))
        self.assertFalse(r.is_relative)
        with self.assertRaisesRegex(ValueError, "percentages of training"):
            s(5)

    def test_relative_resolution_never_gives_zero_frequency(self):
        r = schedules.PolynomialDecay(0.0, 0.5, "0%", "50%", frequency="1%").resolve(20)
        self.assertEqual(r.frequency, 1)

    @parameterized.parameters(
        (schedules.ConstantSparsity(0.3, begin_step=5, end_step=9, frequency=2),),
        (schedules.PolynomialDecay(0.1, 0.9, "0%", "80%", power=2, frequency="2%"),),
    )
    def test_serialization_round_trip(self, s):
        revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(s))
        self.assertEqual(revived, s)
        self.assertEqual(type(s).from_config(s.get_config()), s)

    def test_presets(self):
        self.assertEqual(schedules.get("baseline"), schedules.ConstantSparsity(0.5, begin_step=0, frequency=100))
        self.assertTrue(schedules.get("gradual").is_relative)
        self.assertAlmostEqual(schedules.get("gradual").final_sparsity, 0.8)

    @parameterized.named_parameters(
        ("sparsity_one", lambda: schedules.ConstantSparsity(1.0), ValueError, r"target_sparsity.*\[0, 1\).*Received: target_sparsity=1.0"),
        ("sparsity_negative", lambda: schedules.PolynomialDecay(-0.1, 0.5, 0, 10), ValueError, r"initial_sparsity=-0.1"),
        ("sparsity_str", lambda: schedules.ConstantSparsity("high"), TypeError, r"target_sparsity='high'"),
        ("begin_after_end", lambda: schedules.PolynomialDecay(0.0, 0.5, 100, 50), ValueError, r"begin_step.*before.*begin_step=100, end_step=50"),
        ("begin_equals_end", lambda: schedules.PolynomialDecay(0.0, 0.5, 10, 10), ValueError, r"begin_step=10, end_step=10"),
        ("constant_begin_after_end", lambda: schedules.ConstantSparsity(0.5, begin_step=10, end_step=5), ValueError, r"begin_step=10, end_step=5"),
        ("frequency_zero", lambda: schedules.ConstantSparsity(0.5, frequency=0), ValueError, r"frequency.*positive.*frequency=0"),
        ("frequency_negative", lambda: schedules.PolynomialDecay(0.0, 0.5, 0, 10, frequency=-3), ValueError, r"frequency=-3"),
        ("negative_begin", lambda: schedules.ConstantSparsity(0.5, begin_step=-5), ValueError, r"begin_step.*>= 0.*begin_step=-5"),
        ("bad_percent", lambda: schedules.PolynomialDecay(0.0, 0.5, "0%", "120%"), ValueError, r"end_step='120%'"),
        ("mixed_units", lambda: schedules.PolynomialDecay(0.0, 0.5, 0, "50%"), ValueError, r"both as steps or both as percentages"),
        ("float_step", lambda: schedules.PolynomialDecay(0.0, 0.5, 0, 10.5), TypeError, r"end_step=10.5"),
        ("unknown_preset", lambda: schedules.get("turbo"), ValueError, r"pruning_schedule='turbo'.*'baseline'"),
        ("power", lambda: schedules.PolynomialDecay(0.0, 0.5, 0, 10, power=0), ValueError, r"power=0"),
    )
    def test_bad_input(self, make, error, pattern):
        with self.assertRaisesRegex(error, pattern):
            make()

    def test_tfmot_schedule_is_named_as_keras2(self):
        class ConstantSparsity:  # stands in for tfmot's class, same module path
            pass

        ConstantSparsity.__module__ = "tensorflow_model_optimization.python.core.sparsity.keras.pruning_schedule"
        with self.assertRaisesRegex(TypeError, r"tfmot / tf_keras \(Keras 2\).*Keras 3"):
            tfopt.prune(keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)]), ConstantSparsity())
