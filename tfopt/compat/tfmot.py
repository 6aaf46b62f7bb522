"""tfmot's Keras API on Keras 3: change `import tensorflow_model_optimization as tfmot`
to `from tfopt.compat import tfmot` and the code of tfmot's pruning and QAT
guides runs on Keras 3, with tfopt underneath.

Differences (also in docs/migrating_from_tfmot.md):

- Pruned layers are tfopt twins of the Keras layers (same class names, same
  weights), not `PruneLowMagnitude` wrappers; `strip_pruning` returns plain
  Keras layers. The mask updates inside the train step, so `UpdatePruningStep`
  is optional (it is `tfopt.callbacks.Pruning`, which also resolves schedules
  given in percentages); forgetting it is no longer an error.
- `block_pooling_type` must be "AVG" (tfopt scores blocks by mean magnitude);
  `pruning_policy` is not supported (tfopt prunes any layer it has a twin for).
- Quantization: `quantize_config` takes a tfopt precision ("int8", "int4",
  a `tfopt.quantizers.QuantSpec`, ...) instead of a tfmot `QuantizeConfig`.
  BatchNormalization after a conv is folded into it (tfmot keeps it apart);
  Rescaling, hard-swish and nested models are supported.
- `quantize_scope` is only needed for tfmot's own files; tfopt's classes are
  registered with Keras, so `.keras` files load after `import tfopt`.
"""

import contextlib
import types

import keras

from tfopt import callbacks as _callbacks
from tfopt import _keras_internal, _state
from tfopt import geometry as _geometry
from tfopt import pruning as _pruning
from tfopt import quantizers as _quantizers
from tfopt import schedules as _schedules
from tfopt import transforms as _transforms

__all__ = ["sparsity", "quantization"]


# --- sparsity.keras ----------------------------------------------------------------------
def ConstantSparsity(target_sparsity, begin_step, end_step=-1, frequency=100):
    """tfmot's `ConstantSparsity`: `tfopt.schedules.ConstantSparsity`."""
    return _schedules.ConstantSparsity(target_sparsity, begin_step, end_step, frequency)


def PolynomialDecay(initial_sparsity, final_sparsity, begin_step, end_step, power=3, frequency=100):
    """tfmot's `PolynomialDecay`: `tfopt.schedules.PolynomialDecay`."""
    return _schedules.PolynomialDecay(initial_sparsity, final_sparsity, begin_step, end_step, power=power,
                                      frequency=frequency)


def _structure(block_size, block_pooling_type, sparsity_m_by_n):
    if block_pooling_type != "AVG":
        raise ValueError(
            f"prune_low_magnitude: tfopt scores blocks by their mean magnitude; block_pooling_type must be "
            f"'AVG'. Received: {block_pooling_type!r}"
        )
    if sparsity_m_by_n is not None:
        if tuple(block_size) != (1, 1):
            raise ValueError("prune_low_magnitude: pass either `block_size` or `sparsity_m_by_n`, not both.")
        m, n = sparsity_m_by_n
        return f"{m}:{n}"
    return None if tuple(block_size) == (1, 1) else tuple(block_size)


def prune_low_magnitude(to_prune, pruning_schedule=None, block_size=(1, 1), block_pooling_type="AVG",
                        pruning_policy=None, sparsity_m_by_n=None, **kwargs):
    """tfmot's `prune_low_magnitude` on Keras 3.

    Accepts a Keras layer (returns its tfopt twin, to use when building a
    Sequential or Functional model), a list of layers, or a Sequential or
    Functional model (returns a pruning copy, as `tfopt.prune`).

    Example:
    >>> import keras
    >>> from tfopt.compat import tfmot
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> pruned = tfmot.sparsity.keras.prune_low_magnitude(
    ...     model, pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(0.5, 0))
    >>> type(pruned.layers[0]).__module__
    'tfopt.layers.core'
    """
    if pruning_policy is not None:
        raise ValueError(
            "prune_low_magnitude: `pruning_policy` is not supported; tfopt prunes every layer it has a "
            "twin for (select layers with `tfopt.prune(model, schedule, layers=...)`)."
        )
    if kwargs:
        raise TypeError(f"prune_low_magnitude got unexpected arguments: {sorted(kwargs)}")
    schedule = pruning_schedule if pruning_schedule is not None else ConstantSparsity(0.5, 0)
    structure = _structure(block_size, block_pooling_type, sparsity_m_by_n)
    if isinstance(to_prune, (list, tuple)):
        return [prune_low_magnitude(layer, schedule, block_size, block_pooling_type, None, sparsity_m_by_n)
                for layer in to_prune]
    if isinstance(to_prune, keras.Model):
        return _transforms.prune(to_prune, schedule, structure=structure)
    if isinstance(to_prune, keras.layers.Layer):
        prunable = {k: t for k, t in _geometry.twins().items() if any(s.prune for s in _geometry.of(k).weights)}
        twin = prunable.get(type(to_prune))
        if twin is None:
            raise ValueError(
                f"prune_low_magnitude: tfopt has no prunable twin of {type(to_prune).__name__} (layer "
                f"'{to_prune.name}'). Prunable: {sorted(c.__name__ for c in prunable)}. Leave it "
                "unwrapped, or prune it in place with tfopt.callbacks.Pruning."
            )
        config = to_prune.get_config()
        config.update(pruning_schedule=schedule, structure=structure)
        layer = twin.from_config(config)
        if to_prune.built:
            layer.build_from_config(to_prune.get_build_config())
            layer.set_weights(to_prune.get_weights() + layer.get_weights()[len(to_prune.get_weights()):])
        return layer
    _pruning.check_keras3(to_prune)
    raise TypeError(
        "prune_low_magnitude takes a Keras layer, a list of layers, or a Sequential/Functional model. "
        f"Received: {type(to_prune).__name__}"
    )


def UpdatePruningStep():
    """tfmot's required callback; in tfopt optional (masks update in-graph):
    `tfopt.callbacks.Pruning()`, which also logs sparsity."""
    return _callbacks.Pruning()


def PruningSummaries(log_dir, update_freq="epoch"):
    """tfmot's `PruningSummaries`: `tfopt.callbacks.TensorBoardSummaries(log_dir)`
    (sparsity per weight, and activation ranges, at each epoch's end)."""
    if update_freq != "epoch":
        raise ValueError(f"PruningSummaries: tfopt writes summaries per epoch. Received: update_freq={update_freq!r}")
    return _callbacks.TensorBoardSummaries(log_dir)


def strip_pruning(model):
    """tfmot's `strip_pruning`: `tfopt.strip` (plain Keras layers, masks applied)."""
    return _transforms.strip(model)


@contextlib.contextmanager
def prune_scope():
    """tfmot's `prune_scope`: nothing to register in tfopt; kept so old code runs."""
    yield


# --- quantization.keras -------------------------------------------------------------------
def quantize_annotate_layer(to_annotate, quantize_config=None):
    """Marks a layer for `quantize_apply` (returns the layer itself).
    `quantize_config` is a tfopt precision ("int8", "int4", a QuantSpec, ...),
    or None for the model's precision."""
    if not isinstance(to_annotate, keras.layers.Layer):
        raise TypeError(f"quantize_annotate_layer takes a Keras layer. Received: {type(to_annotate).__name__}")
    if quantize_config is not None and not isinstance(quantize_config, str):
        if not isinstance(quantize_config, (_quantizers.QuantSpec, tuple, list)):
            raise ValueError(
                "quantize_annotate_layer: tfopt takes a precision ('int8', 'int4', 'binary', a "
                "tfopt.quantizers.QuantSpec, or a (weights, activations) pair) as `quantize_config`, not "
                f"a tfmot QuantizeConfig. Received: {type(quantize_config).__name__}"
            )
    _state.ANNOTATIONS.set(to_annotate, quantize_config or "default")
    return to_annotate


def quantize_annotate_model(to_annotate):
    """Marks every layer of a Sequential or Functional model for `quantize_apply`."""
    for layer in _keras_internal.all_layers(to_annotate):
        if not isinstance(layer, keras.Model) and layer not in _state.ANNOTATIONS:
            _state.ANNOTATIONS.set(layer, "default")
    return to_annotate


def quantize_apply(model, scheme=None, quantized_layer_name_prefix=None):
    """Quantizes the annotated layers of `model` (`tfopt.quantize_model` with
    `layers=` the annotated ones and their precisions as `overrides`); other
    layers stay in float."""
    if scheme is not None:
        raise ValueError("quantize_apply: tfopt has one scheme (TFLite int8 defaults); pass scheme=None.")
    layers = [layer for layer in _keras_internal.all_layers(model) if layer in _state.ANNOTATIONS]
    if not layers:
        raise ValueError(
            "quantize_apply: no layer of the model is annotated. Use quantize_annotate_layer / "
            "quantize_annotate_model first, or quantize_model(model) for the whole model."
        )
    overrides = {layer.name: _state.ANNOTATIONS.get(layer) for layer in layers
                 if _state.ANNOTATIONS.get(layer) != "default"}
    chosen = {layer.name for layer in layers}
    return _transforms.quantize_model(model, "int8", layers=lambda layer: layer.name in chosen,
                                      unsupported="float", overrides=overrides or None)


def quantize_model(to_quantize, quantized_layer_name_prefix=None):
    """tfmot's `quantize_model`: `tfopt.quantize_model(model)` (int8, every layer)."""
    return _transforms.quantize_model(to_quantize)


@contextlib.contextmanager
def quantize_scope(*args):
    """tfmot's `quantize_scope`: a `keras.saving.custom_object_scope` of any
    objects given (tfopt's own classes are registered already)."""
    objects = {}
    for arg in args:
        objects.update(arg)
    with keras.saving.custom_object_scope(objects):
        yield


sparsity = types.SimpleNamespace(keras=types.SimpleNamespace(
    prune_low_magnitude=prune_low_magnitude, ConstantSparsity=ConstantSparsity, PolynomialDecay=PolynomialDecay,
    UpdatePruningStep=UpdatePruningStep, PruningSummaries=PruningSummaries, strip_pruning=strip_pruning,
    prune_scope=prune_scope,
))
quantization = types.SimpleNamespace(keras=types.SimpleNamespace(
    quantize_model=quantize_model, quantize_annotate_layer=quantize_annotate_layer,
    quantize_annotate_model=quantize_annotate_model, quantize_apply=quantize_apply, quantize_scope=quantize_scope,
))
