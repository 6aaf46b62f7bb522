"""The public API: every name in `__all__` exists, and nothing else is promised."""

import importlib

import tfopt
from tfopt import testing

_PUBLIC = {
    "tfopt": ["callbacks", "distillation", "geometry", "layers", "quantizers", "schedules", "sparsity", "strategies", "compat", "prune", "strip", "shrink", "plan_shrink", "ShrinkPlan", "load_model", "quantize_model", "quantize_weights", "reestimate_batch_norm",
              "summary", "export", "ExportReport", "export_generator", "GeneratorReport", "plot_sparsity", "plot_accuracy_vs_size"],
    "tfopt.layers": ["Prunable", "QuantizeActivation", "Dense", "EinsumDense", "Embedding", "Conv1D", "Conv2D", "Conv3D",
                     "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose", "DepthwiseConv1D",
                     "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D", "QuantizedRescaling", "LSTM", "GRU",
                     "SimpleRNN", "IntegerLayerNormalization", "LayerNormalization",
                     "MultiHeadAttention"],
    "tfopt.geometry": ["WeightSpec", "Geometry", "PASS_THROUGH", "NEEDS_RANGE", "BATCH_NORM", "WEIGHTS", "register",
                       "register_twin", "of", "weights_of", "prunable_weights", "quantized_weights", "fold_weight",
                       "twin_of", "twins", "role", "is_twin", "expand_height", "unroll_depth",
                       "register_export_form", "export_form", "register_channels", "channel_flow", "NEW", "SAME",
                       "MERGE", "CONCAT", "FLATTEN", "HEADS", "macs"],
    "tfopt.callbacks": ["Pruning", "WidthPruning", "QuantizationSchedule", "TensorBoardSummaries", "DistillationSchedule"],
    "tfopt.reporting": ["summary", "overall_sparsity", "prunable_values", "zero_fraction", "macs", "total_macs"],
    "tfopt.schedules": ["SparsitySchedule", "ConstantSparsity", "PolynomialDecay", "constant_sparsity",
                        "polynomial_decay", "PRESETS", "get"],
    "tfopt.strategies": ["auto", "auto_distribution", "Mirrored", "TPU", "MultiWorker", "global_batch_size",
                         "recommended_steps_per_execution", "prepare_dataset", "is_chief", "chief_path", "check"],
    "tfopt.distillation": ["DistillationLoss", "Distiller", "attach_teacher", "FeatureHint", "AttentionTransfer",
                           "LabelAccuracy", "DistillationSchedule", "kd_loss", "logit_mse", "DEFAULT_TEMPERATURE",
                           "DEFAULT_ALPHA"],
    "tfopt.litert": ["convert", "run_litert", "litert_latency_ms", "litert_load_error", "float_ops", "tensor_count",
                     "sample_inputs", "Generator", "GenerationStats"],
    "tfopt.sparsity": ["Structure", "Unstructured", "NM", "Block", "Channel", "get", "prune_lowest"],
}


class PublicApiTest(testing.TestCase):
    def test_all_lists_exactly_the_public_names(self):
        for module_name, names in _PUBLIC.items():
            module = importlib.import_module(module_name)
            self.assertEqual(sorted(module.__all__), sorted(names), module_name)
            for name in names:
                self.assertTrue(hasattr(module, name), f"{module_name}.{name}")

    def test_version(self):
        self.assertRegex(tfopt.__version__, r"^\d+\.\d+\.\d+")
