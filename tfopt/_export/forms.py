"""The form of a model the LiteRT converter takes: float32 layers, and layers in their export form."""

import keras
import numpy as np

from tfopt import _keras_internal, geometry
from tfopt.layers import litert_forms


def _half_layers(model):
    """Layers (the model included) that compute in float16/bfloat16 (a mixed-precision policy)."""
    out = []
    for layer in [model] + _keras_internal.all_layers(model):
        policy = getattr(layer, "dtype_policy", None)
        if policy is not None and getattr(policy, "quantization_mode", None) is None and \
                keras.backend.standardize_dtype(policy.compute_dtype) in ("float16", "bfloat16"):
            out.append(layer)
    return out


def export_form(model, calibrating=False):
    """`model`, or a copy with the same weights that the LiteRT converter
    takes: layers computing in float16/bfloat16 (mixed precision) rebuilt in
    float32 (the converter has no float16 MatMul), and layers with a
    `tfopt.geometry` export form rebuilt in it (`tfopt/layers/litert_forms.py`:
    RNNs unrolled; with `calibrating`, LayerNormalization without NEG)."""
    half = _half_layers(model)
    forms = {}
    if _keras_internal.is_graph_network(model):
        for layer in _keras_internal.all_layers(model):
            form = geometry.export_form(layer, calibrating)
            if form is not None and (form[0] is not type(layer) or form[1] != layer.get_config()):
                forms[id(layer)] = form
    nested = _keras_internal.is_graph_network(model) and any(
        litert_forms.nested_forms(layer, calibrating) for layer in _keras_internal.all_layers(model))
    if not half and not forms and not nested:
        return model
    half_ids = {id(layer) for layer in half}
    if not half:
        return _rebuild(model, forms, half_ids, calibrating)
    policies = sorted({layer.dtype_policy.name for layer in half})
    if not _keras_internal.is_graph_network(model):
        raise ValueError(
            f"tfopt.export: model '{model.name}' ({type(model).__name__}) computes in half precision "
            f"(dtype policies {policies}), which the LiteRT converter cannot convert, and tfopt rebuilds "
            "only Sequential and Functional models in float32. Fix: build the model again under "
            "keras.mixed_precision.set_global_policy('float32'), copy the weights with "
            "float_model.set_weights(model.get_weights()), and export that.")
    code = [layer for layer in half if _keras_internal.holds_python_code(layer)]
    if code:
        raise ValueError(
            f"tfopt.export: layer '{code[0].name}' ({type(code[0]).__name__}) of model '{model.name}' "
            f"computes in half precision (dtype policy {code[0].dtype_policy.name!r}), which the LiteRT "
            "converter cannot convert, and holds Python code, which tfopt cannot rebuild in float32 "
            "without unsafe deserialization. Fix: create that layer with dtype='float32' (e.g. "
            "keras.layers.Lambda(fn, dtype='float32')), or build the model under the float32 policy.")
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")  # sublayers built without a dtype of their own
    try:
        return _rebuild(model, forms, half_ids, calibrating)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _rebuild(model, forms, half_ids, calibrating=False):
    copies = []  # layers holding others in an export form (a TransformerBlock's LayerNormalizations)

    def clone_function(layer):
        if id(layer) not in forms and id(layer) not in half_ids:
            copy = litert_forms.export_copy(layer, calibrating)
            if copy is not layer:
                copies.append(copy)
            return copy  # else kept as it is (shared with `model`; Lambda layers need no deserializing)
        cls, config = forms.get(id(layer), (layer.__class__, layer.get_config()))
        if id(layer) in half_ids:
            config["dtype"] = "float32"
        return cls.from_config(config)

    clone = keras.models.clone_model(model, clone_function=clone_function, recursive=True)
    clone.set_weights([
        np.asarray(w, "float32") if np.issubdtype(np.asarray(w).dtype, np.floating) else w
        for w in model.get_weights()
    ])
    for copy in copies:
        litert_forms.use_nested_forms(copy, calibrating)
    return clone
