"""What a model's graph says about its one output: a final softmax, its number of classes.

Both read Functional and Sequential models only (a subclassed model's graph
is not visible: None/False, and the callers say what they then assume).
"""

import keras

from tfopt import _keras_internal, geometry


def _graph_tensors(model, which):
    """A Functional/Sequential model's `inputs` or `outputs` (`which`), or None
    for a subclassed or unbuilt model."""
    if not isinstance(model, keras.Model) or not _keras_internal.is_graph_network(model):
        return None
    try:
        return getattr(model, which)
    except (AttributeError, ValueError):  # an unbuilt Sequential
        return None


def _ends_in_softmax(model):
    """True when a Functional or Sequential `model`'s one output comes from a
    softmax: a layer whose `activation` is softmax, or a `keras.layers.Softmax`
    (nested models followed)."""
    outputs = _graph_tensors(model, "outputs")
    if not outputs or len(outputs) != 1:
        return False
    layer = _keras_internal.producer(outputs[0])
    if isinstance(layer, keras.Model):
        return _ends_in_softmax(layer)
    return geometry.outputs_probabilities(layer)


def _model_classes(model):
    """The last dimension of a Functional/Sequential model's one 2-D output, or None if unknown."""
    outputs = _graph_tensors(model, "outputs")
    if not outputs or len(outputs) != 1 or len(outputs[0].shape) != 2:
        return None
    return outputs[0].shape[-1]


def _input_shapes(model):
    """The shapes of a Functional/Sequential model's inputs (None for any size), or None if unknown."""
    inputs = _graph_tensors(model, "inputs")
    return [tuple(tensor.shape) for tensor in inputs] if inputs else None


def _output_shape(model):
    """The shape of a Functional/Sequential model's one output, or None if unknown."""
    if not isinstance(model, keras.Model) or not _keras_internal.is_graph_network(model):
        return None
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):  # an unbuilt Sequential
        return None
    return tuple(outputs[0].shape) if outputs and len(outputs) == 1 else None


def _model_vocab(model):
    """The vocabulary of a Functional/Sequential model's one `(batch, seq, vocab)` output, or None."""
    shape = _output_shape(model)
    return shape[-1] if shape is not None and len(shape) == 3 else None
