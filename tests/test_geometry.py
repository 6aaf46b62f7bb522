"""tfopt.geometry: the one table of layer types, and the layout rules it makes possible.

The structural tests read tfopt's own source: they keep each kind of knowledge
in its one home (CONTRIBUTING.md says which), so that a contributor who adds a
layer type or a Keras workaround finds a failing test pointing at the file to use.
"""

import ast
import importlib
import os
import pkgutil
import re

import keras
import numpy as np

import tfopt
from tfopt import geometry, testing

PACKAGE = os.path.dirname(os.path.abspath(tfopt.__file__))


def _sources():
    for module in pkgutil.walk_packages(tfopt.__path__, "tfopt."):
        spec = importlib.util.find_spec(module.name)
        with open(spec.origin) as f:
            yield module.name, os.path.relpath(spec.origin, PACKAGE), f.read()


class _Gated(keras.layers.Layer):
    """A custom layer of the kind Keras's guide shows: its weight is `w`, not `kernel`."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1], 8), name="w")

    def call(self, x):
        return ops_matmul(x, self.w)


def ops_matmul(x, w):
    return keras.ops.matmul(x, w)


class GeometryTest(testing.TestCase):
    def test_every_twin_is_public_and_every_public_twin_registered(self):
        # (tfopt.adapters registers keras-hub block twins when a model needs them: those are
        # quantize_model's internal forms, not drop-in layers.)
        twins = {cls for cls in geometry.twins().values() if not cls.__module__.startswith("tfopt.adapters")}
        public = {getattr(tfopt.layers, name) for name in tfopt.layers.__all__}
        self.assertLessEqual(twins, public)
        for cls in public:
            if issubclass(cls, tfopt.layers.Prunable) and cls is not tfopt.layers.Prunable:
                self.assertIs(geometry.twins()[cls.keras_class], cls, cls.__name__)

    def test_lookup_follows_the_class_hierarchy_but_twins_are_exact(self):
        class MyDense(keras.layers.Dense):
            pass

        layer = MyDense(2)
        self.assertIs(geometry.of(layer), geometry.of(keras.layers.Dense))
        self.assertIsNone(geometry.twin_of(layer))  # swapping would drop MyDense's own behaviour
        self.assertIs(geometry.twin_of(keras.layers.Dense(2)), tfopt.layers.Dense)
        self.assertEqual(geometry.role(keras.layers.SpatialDropout2D(0.1)), geometry.PASS_THROUGH)

    def test_multi_weight_layers_are_described(self):
        for cls, paths in ((keras.layers.LSTM, ["cell.kernel", "cell.recurrent_kernel"]),
                           (keras.layers.MultiHeadAttention, ["query_dense.kernel", "key_dense.kernel",
                                                              "value_dense.kernel", "output_dense.kernel"]),
                           (keras.layers.LayerNormalization, ["gamma"])):
            self.assertEqual([s.path for s in geometry.of(cls).weights], paths, cls.__name__)
        lstm = keras.layers.LSTM(3)
        lstm.build((None, 5, 2))
        self.assertEqual([tuple(v.shape) for _, v in geometry.weights_of(lstm)], [(2, 12), (3, 12)])
        self.assertEqual({s.gates for s in geometry.of(lstm).weights}, {4})
        mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
        mha.build((None, 3, 8), (None, 3, 8))
        self.assertEqual([tuple(v.shape) for _, v in geometry.weights_of(mha)][0], (8, 2, 4))

    def test_registered_custom_layer_is_pruned_by_the_callback_with_its_axes(self):
        geometry.register(_Gated, [geometry.WeightSpec("w", in_axis=0, out_axis=1)])
        try:
            model = keras.Sequential([keras.Input((8,)), _Gated(name="gated"), keras.layers.Dense(2)])
            model.compile("adam", "mse")
            model.fit(np.random.rand(16, 8), np.random.rand(16, 2), verbose=0, callbacks=[
                tfopt.callbacks.Pruning(tfopt.schedules.ConstantSparsity(0.5, frequency=1), structure="2:4",
                                        layers="gated")])
            w = model.get_layer("gated").w.numpy()
            # 2:4 along the registered input axis (0): two zeros in every group of 4 inputs.
            self.assertTrue(np.all((w.reshape(2, 4, 8) == 0).sum(axis=1) == 2))
            rows = tfopt.summary(model, print_fn=None)
            self.assertEqual((rows[0]["layer"], rows[0]["weight"], rows[0]["structure"]), ("gated", "w", "2:4"))
        finally:
            geometry._REGISTRY.pop(_Gated, None)

    def test_register_rejects_what_it_cannot_use(self):
        with self.assertRaisesRegex(TypeError, "Keras layer class.*Received: layer_type='Dense'"):
            geometry.register("Dense", [])
        with self.assertRaisesRegex(TypeError, "WeightSpec"):
            geometry.register(_Gated, ["w"])
        with self.assertRaisesRegex(ValueError, "role"):
            geometry.register(_Gated, role="mystery")


class LayoutTest(testing.TestCase):
    """Each kind of knowledge in one home (issue 10)."""

    def test_only_geometry_asks_isinstance_of_keras_layer_types(self):
        pattern = re.compile(r"isinstance\([^)]*keras\.layers\.(?!Layer\b)\w+")
        offenders = [path for _, path, source in _sources()
                     if path not in ("geometry.py", "_keras_internal.py") and pattern.search(source)]
        self.assertEqual(offenders, [])

    def test_only_keras_internal_touches_keras_privates(self):
        private = re.compile(r"\._keras_history|\._inbound_nodes|\._flatten_layers|\._distribute_strategy|"
                             r"\._get_ops_details|\._is_graph_network|(from|import) keras\.src|\._trainable_variables|"
                             r"_in_multi_worker_mode|object\.__setattr__|"
                             # MultiHeadAttention's projections, spelled out or built in an f-string
                             r"(?<!\w)_(query|key|value|output)_dense\b|\"_\{\w+\}_dense")
        offenders = [path for _, path, source in _sources()
                     if path != "_keras_internal.py" and private.search(source)]
        self.assertEqual(offenders, [])

    def test_no_state_planted_on_keras_objects(self):
        planted = re.compile(r"\._tfopt_\w+\s*=|setattr\([^)]*_tfopt")
        self.assertEqual([path for _, path, source in _sources() if planted.search(source)], [])

    def test_no_import_cycle_between_modules(self):
        graph = {}
        for name, _, source in _sources():
            edges = graph.setdefault(name, set())
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tfopt"):
                    package = importlib.import_module(node.module)
                    for alias in node.names:
                        obj = getattr(package, alias.name, None)
                        target = obj.__name__ if isinstance(obj, type(os)) else getattr(obj, "__module__", node.module)
                        if target and target.startswith("tfopt") and target != name:
                            edges.add(target)
        modules = {name for name in graph if not hasattr(importlib.import_module(name), "__path__")}
        graph = {n: {e for e in edges if e in modules} for n, edges in graph.items() if n in modules}
        cycles = []

        def visit(node, path):
            if node in path:
                cycles.append(path[path.index(node):] + [node])
                return
            for nxt in sorted(graph.get(node, ())):
                if nxt not in done:
                    visit(nxt, path + [node])
            done.add(node)

        done = set()
        for node in sorted(graph):
            visit(node, [])
        self.assertEqual(cycles, [])

    def test_tfopt_imports_inside_functions_say_why(self):
        found = []
        for _, path, source in _sources():
            lines = source.splitlines()
            for node in ast.walk(ast.parse(source)):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        names = [inner.module or ""] if isinstance(inner, ast.ImportFrom) else [
                            a.name for a in inner.names]
                        context = " ".join(lines[max(0, inner.lineno - 3): inner.lineno])
                        if any(n.split(".")[0] == "tfopt" for n in names) and "lazy" not in context:
                            found.append(f"{path}:{inner.lineno}")
        self.assertEqual(found, [])
