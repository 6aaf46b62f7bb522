"""Mask structures: exact counts, rounding, ties, N:M, blocks, channels."""

import numpy as np
from absl.testing import parameterized

from tfopt import sparsity, testing
from tfopt.testing import backends
import pytest

pytestmark = pytest.mark.backend_neutral


def _mask(structure, w, s, in_axis=0, out_axis=-1):
    return np.asarray(structure.mask(np.asarray(w, "float32"), s, in_axis, out_axis))


class SparsityTest(testing.TestCase, parameterized.TestCase):
    @parameterized.parameters(0.0, 0.1, 0.5, 0.8, 0.9, 0.99)
    def test_unstructured_exact_count(self, s):
        w = np.random.default_rng(0).standard_normal((37, 11))
        m = _mask(sparsity.Unstructured(), w, s)
        self.assertEqual(int((m == 0).sum()), int(round(s * w.size)))
        # The pruned weights are the smallest ones.
        if 0 < s:
            self.assertLessEqual(np.abs(w[m == 0]).max(), np.abs(w[m == 1]).min())

    def test_rounding_rule_on_tiny_tensor(self):
        w = np.arange(1, 11, dtype="float32").reshape(10, 1)
        m = _mask(sparsity.Unstructured(), w, 0.75)  # 7.5 -> 8 (round half to even)
        self.assertEqual(int((m == 0).sum()), 8)
        self.assertAlmostEqual(sparsity.Unstructured().achievable_sparsity(0.75, (10, 1), 0, -1), 0.8)

    def test_ties_are_broken_by_lowest_index(self):
        zeros = np.zeros((2, 4), "float32")
        m = _mask(sparsity.Unstructured(), zeros, 0.5)
        self.assertAllEqual(m.ravel(), [0, 0, 0, 0, 1, 1, 1, 1])
        ones = np.ones((8, 1), "float32")
        self.assertAllEqual(_mask(sparsity.Unstructured(), ones, 0.25).ravel(), [0, 0, 1, 1, 1, 1, 1, 1])
        self.assertAllEqual(_mask(sparsity.NM(2, 4), ones, 0.5).ravel(), [1, 1, 0, 0, 1, 1, 0, 0])

    @parameterized.parameters(0, 1000, 6000, 6001, 6500, 9999)
    def test_large_tensors_match_a_stable_sort(self, num_pruned):
        # 10,000 scores (above the sort's limit): 6,000 zeros (the pruned weights of an earlier
        # update), a run of ties, then distinct values, in shuffled order.
        rng = np.random.default_rng(num_pruned)
        scores = np.concatenate([np.zeros(6000), np.full(500, 0.25), rng.uniform(0.5, 2.0, 3500)])
        scores = rng.permutation(scores).astype("float32")
        expected = np.ones(len(scores), bool)
        expected[np.argsort(scores, kind="stable")[:num_pruned]] = False
        self.assertAllEqual(np.asarray(sparsity.prune_lowest(scores, num_pruned)), expected)
        # The same under XLA (the radix select's counts have a static size).
        jitted = backends.jit(lambda s: sparsity.prune_lowest(s, num_pruned))
        self.assertAllEqual(np.asarray(jitted(scores)), expected)

    def test_large_tensors_of_any_magnitude(self):
        # Tiny and huge magnitudes: the select reads the float bit patterns. (Not subnormal ones:
        # TensorFlow's CPU kernels flush those to zero, so they tie with the zeros.)
        rng = np.random.default_rng(7)
        scores = np.abs(rng.standard_normal(20000) * 10.0 ** rng.integers(-30, 30, 20000)).astype("float32")
        for num_pruned in (1, 4567, 19999):
            expected = np.ones(len(scores), bool)
            expected[np.argsort(scores, kind="stable")[:num_pruned]] = False
            self.assertAllEqual(np.asarray(sparsity.prune_lowest(scores, num_pruned)), expected)

    def test_nm_keeps_n_largest_per_group_along_input_axis(self):
        w = np.random.default_rng(1).standard_normal((3, 3, 8, 5))  # conv kernel, input axis -2
        m = _mask(sparsity.NM(2, 4), w, 0.0, in_axis=-2)
        groups = np.moveaxis(m, -2, -1).reshape(-1, 4)
        self.assertTrue(np.all(groups.sum(axis=1) == 2))
        aw = np.moveaxis(np.abs(w), -2, -1).reshape(-1, 4)
        kept_min = np.where(groups == 1, aw, np.inf).min(axis=1)
        pruned_max = np.where(groups == 0, aw, -np.inf).max(axis=1)
        self.assertTrue(np.all(kept_min >= pruned_max))

    def test_nm_validation(self):
        with self.assertRaisesRegex(ValueError, r"multiple of M=4.*Received: dimension 6"):
            sparsity.NM(2, 4).validate((6, 3), 0, -1, "Layer 'x'")
        with self.assertRaisesRegex(ValueError, r"0 < N < M.*n=4, m=4"):
            sparsity.NM(4, 4)

    def test_block_prunes_whole_blocks_including_ragged_edges(self):
        w = np.random.default_rng(2).standard_normal((6, 10))
        m = _mask(sparsity.Block((2, 4)), w, 0.5)
        # 3 x 3 blocks (last column of blocks is 2 wide): 4 or 5 of 9 pruned, each block all-or-nothing.
        for r in range(0, 6, 2):
            for c in range(0, 10, 4):
                block = m[r:r + 2, c:c + 4]
                self.assertIn(float(block.mean()), (0.0, 1.0))
        pruned_blocks = sum(m[r, c] == 0 for r in range(0, 6, 2) for c in range(0, 10, 4))
        self.assertEqual(pruned_blocks, round(0.5 * 9))

    def test_channel_prunes_lowest_norm_filters(self):
        w = np.random.default_rng(3).standard_normal((3, 3, 4, 8))
        w[..., 5] *= 0.01
        w[..., 2] *= 0.02
        m = _mask(sparsity.Channel(), w, 0.25, in_axis=-2, out_axis=-1)
        self.assertAllEqual(m.reshape(-1, 8).min(axis=0), [1, 1, 0, 1, 1, 0, 1, 1])
        self.assertAllEqual(m.reshape(-1, 8).max(axis=0), [1, 1, 0, 1, 1, 0, 1, 1])

    @parameterized.parameters(
        (None, sparsity.Unstructured()), ("unstructured", sparsity.Unstructured()),
        ("2:4", sparsity.NM(2, 4)), ("1:8", sparsity.NM(1, 8)), ((1, 4), sparsity.Block((1, 4))),
        ([2, 2], sparsity.Block((2, 2))), ("channel", sparsity.Channel()), ("filter", sparsity.Channel()),
    )
    def test_get(self, identifier, expected):
        self.assertEqual(sparsity.get(identifier), expected)

    @parameterized.parameters(("2:4:8",), ("a:b",), ("random",), ((1, 2, 3),), ((0, 4),))
    def test_get_rejects(self, identifier):
        with self.assertRaises(ValueError):
            sparsity.get(identifier)

    def test_non_finite_weights_are_rejected_with_count(self):
        with self.assertRaisesRegex(ValueError, r"Layer 'd' weight 'kernel' holds 2 NaN/Inf"):
            sparsity.validate_finite(np.array([1.0, np.nan, np.inf]), "Layer 'd' weight 'kernel'")
