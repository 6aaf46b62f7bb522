"""`strip`: back to plain Keras, masks and folded BatchNormalizations baked in; `load_model`."""

import keras

from tfopt import _keras_internal, geometry, pruning
from tfopt.adapters import keras_hub as _keras_hub
from tfopt.layers.base import Prunable
from tfopt.layers.quantize_activation import QuantizeActivation
from tfopt.transforms import _graph
from tfopt.transforms import weight_quantization as _qw
from tfopt.transforms.quantize import QuantizedModel

__all__ = ["strip", "load_model"]


def strip(model):
    """Returns a plain Keras model with the pruning masks baked into the weights.

    For Sequential and Functional models, a new model of Keras layers only:
    every tfopt layer is replaced by its Keras namesake (same name, config and
    weights, no mask or step), so it loads without tfopt. Quantization-aware
    layers become float layers and the `QuantizeActivation` layers
    `quantize_model` inserted are removed; a BatchNormalization folded into a
    layer stays folded (the layer gets the folded kernel and bias). Masks
    attached by `tfopt.callbacks.Pruning` are baked in and their constraints
    dropped.

    For subclassed models and keras-hub models (whose class a rebuilt graph
    would lose), the model itself is stripped in place and returned:
    weights are multiplied by their masks and tfopt constraints removed (the
    classes of its layers are the user's and are kept).

    Example:
    >>> import keras, tfopt
    >>> pruned = keras.Sequential([keras.Input((4,)), tfopt.layers.Dense(2, pruning_schedule="baseline")])
    >>> stripped = tfopt.strip(pruned)
    >>> type(stripped.layers[0]).__module__.startswith("keras"), len(stripped.weights)
    (True, 2)
    """
    pruning.check_keras3(model)
    if (not isinstance(model, keras.Model) or not _keras_internal.is_graph_network(model)
            or _keras_hub.handles(model)):  # a keras-hub model keeps its class (it holds no tfopt layer)
        for layer in _keras_internal.all_layers(model):
            for pw in pruning.prunable_weights(layer):
                pruning.bake(pw.variable)
        for layer in _qw.weight_quantized_layers(model):  # (after the masks: their zeros stay zeros)
            _qw.bake(layer)
        return model

    def make_layer(layer):
        if geometry.is_twin(layer):
            config = layer.get_config()
            for key in Prunable.TFOPT_ARGUMENTS:
                config.pop(key, None)
            if getattr(layer, "folded_batch_norm", None) is not None:
                config["use_bias"] = True  # the folded BatchNormalization's bias
            return layer.keras_class.from_config(config)
        if _qw.is_weight_quantized(layer):
            return _qw.original_class(layer).from_config(_qw.plain_config(layer))
        return _graph.plain_copy(layer)

    def call_function(layer, *args, **kwargs):
        if isinstance(layer, QuantizeActivation):
            return args[0]  # an identity outside QAT
        return layer(*args, **kwargs)

    if any(isinstance(layer, QuantizeActivation) for layer in _keras_internal.all_layers(model)):
        # Dropping layers needs a Functional graph (Sequential cloning takes no call_function).
        clone, pairs = _graph.clone(_graph.to_functional(model), make_layer, call_function=call_function)
    else:
        clone, pairs = _graph.clone(model, make_layer)
    if isinstance(clone, QuantizedModel):  # (cloning keeps the class): back to a plain Functional model
        clone = _graph.rewrap(clone)
    for old, new in pairs:
        if not getattr(new, "weights", None) or isinstance(old, QuantizeActivation):
            continue
        if isinstance(old, Prunable):
            new.set_weights(old.keras_weights())
        elif _qw.is_weight_quantized(old):
            baked = {id(v): value for v, value in _qw.baked_values(old)}
            new.set_weights([baked.get(id(v), pruning.masked_value(v)) for v in old.weights[: len(new.weights)]])
        else:
            new.set_weights([pruning.masked_value(v) for v in old.weights[: len(new.weights)]])
    return clone


def load_model(path, **kwargs):
    """`keras.models.load_model` with tfopt's classes registered.

    A `.keras` file that holds tfopt layers needs tfopt imported before Keras
    reads it (Keras imports only its own packages while loading, and a `.keras`
    file runs no code). Calling this, or `import tfopt` before
    `keras.models.load_model`, does that. Files written from `tfopt.strip(model)`
    need neither. `kwargs` go to Keras unchanged; `safe_mode` stays on unless
    you turn it off.
    """
    return keras.models.load_model(path, **kwargs)
