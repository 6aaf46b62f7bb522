"""The one module that touches Keras, TensorFlow and LiteRT private attributes.

Everything tfopt needs that Keras does not offer publicly is here, behind a
small function: the model walk, a tensor's producing layer, a layer's call
nodes, whether a model is a graph network, a model's strategy, the weight
substitution that quantization-aware layers use while calling their Keras
parent, the multi-worker fix of Keras's TensorFlow trainer, and the LiteRT
interpreter's op list. When a Keras release moves one of them, this is the
file to mend, and each function fails with `KerasInternalsMoved`, naming the
attribute and the Keras version, instead of an AttributeError deep in a trace.

Checked against Keras 3.11.3 and 3.15.1 (TensorFlow 2.20 and 2.21).
"""

import contextlib
import inspect
import logging

import keras

__all__ = [
    "CHECKED_KERAS_VERSIONS",
    "convnext_layer_scale",
    "KerasInternalsMoved",
    "all_layers",
    "producer",
    "producing_node",
    "graph_calls",
    "is_input_layer",
    "holds_python_code",
    "input_name",
    "call_nodes",
    "node_inputs",
    "is_graph_network",
    "distribute_strategy",
    "substituted_weights",
    "weight_holder",
    "is_multi_worker",
    "patch_multi_worker_trainer",
    "litert_ops",
    "add_replica_local_weight",
    "replica_local_variable",
    "stepping_model",
    "attention_projection",
    "weight_quantizable_kind",
    "set_class",
]

CHECKED_KERAS_VERSIONS = ("3.11.3", "3.15.1")

log = logging.getLogger("tfopt")


class KerasInternalsMoved(RuntimeError):
    """A Keras (or TensorFlow, LiteRT) private attribute tfopt relies on is gone."""


def _moved(what, obj, error=None):
    return KerasInternalsMoved(
        f"tfopt relies on {what} of {type(obj).__name__}, which this Keras version "
        f"({keras.__version__}) no longer has (tfopt was checked against Keras "
        f"{', '.join(CHECKED_KERAS_VERSIONS)}). Please report this at tfopt's issue tracker with "
        f"your Keras and TensorFlow versions; pinning keras=={CHECKED_KERAS_VERSIONS[-1]} works meanwhile."
        + (f" ({error})" if error else "")
    )


def _get(obj, attr, what=None):
    try:
        return getattr(obj, attr)
    except AttributeError as e:
        raise _moved(what or f"`{attr}`", obj, e) from None


# --- the model graph --------------------------------------------------------------------
def all_layers(model):
    """Every layer inside `model` (nested models and their layers included), each once.

    Example:
    >>> import keras
    >>> inner = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, name="d")], name="inner")
    >>> outer = keras.Sequential([keras.Input((2,)), inner])
    >>> [layer.name for layer in all_layers(outer) if not is_input_layer(layer)]
    ['inner', 'd']
    """
    seen, out = set(), []
    flatten = _get(model, "_flatten_layers", "`Layer._flatten_layers` (the recursive layer walk)")
    for layer in flatten(include_self=False, recursive=True):
        if id(layer) not in seen:
            seen.add(id(layer))
            out.append(layer)
    return out


def producer(tensor):
    """The layer (operation) that produced a symbolic tensor of a Functional model."""
    history = _get(tensor, "_keras_history", "`KerasTensor._keras_history`")
    return history.operation


def producing_node(tensor):
    """`(layer, node)`: the layer that produced a symbolic tensor and the call
    node (of that layer's calls) that did."""
    history = _get(tensor, "_keras_history", "`KerasTensor._keras_history`")
    operation, node_index = history.operation, history.node_index
    return operation, call_nodes(operation)[node_index]


def graph_calls(model):
    """`[(layer, node)]` for every layer call in the graph of a Functional or
    Sequential `model`, nested graph models' calls included (each node once).
    Unlike `call_nodes`, it leaves out calls of the same layer in other models."""
    out, seen, stack = [], set(), list(model.outputs)
    while stack:
        layer, node = producing_node(stack.pop())
        if id(node) in seen:
            continue
        seen.add(id(node))
        out.append((layer, node))
        stack.extend(node_inputs(node))
        if isinstance(layer, keras.Model) and is_graph_network(layer) and layer.outputs:
            stack.extend(layer.outputs)
    return out


def ordered_calls(model):
    """`[(layer, node)]` of the calls in `model`'s own graph (nested models'
    insides not included), each after the calls that feed it. A Sequential
    model is read through the Functional graph Keras keeps for it."""
    model = graph_of(model)
    by_depth = _get(model, "_nodes_by_depth", "`Function._nodes_by_depth`")
    out = []
    for depth in sorted(by_depth, reverse=True):
        for node in by_depth[depth]:
            if not node.is_input and node.operation is not None:
                out.append((node.operation, node))
    return out


def node_outputs(node):
    """The output tensors of one call node."""
    return list(node.outputs)


def node_call_arguments(node):
    """`(args, kwargs)` one call node was called with (tensors as KerasTensors)."""
    arguments = _get(node, "arguments", "`Node.arguments`")
    return list(arguments.args), dict(arguments.kwargs)


def attention_projections(layer):
    """`(query, key, value, output)`: the EinsumDense sublayers of a Keras
    MultiHeadAttention (kernels `(dim, heads, head_dim)` and `(heads, head_dim, out)`)."""
    return tuple(attention_projection(layer, part) for part in ("query", "key", "value", "output"))


def attention_projection(layer, part):
    """One EinsumDense sublayer of a Keras MultiHeadAttention: `part` is
    "query", "key", "value" or "output". Read through its public property
    (`query_dense`, ...) where the Keras release has one, else the private
    attribute behind it (`_query_dense`). Before the layer is built neither
    exists yet: AttributeError, as for any weight of an unbuilt layer.

    Example:
    >>> import keras
    >>> mha = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
    >>> mha.build((None, 3, 8), (None, 3, 8))
    >>> tuple(attention_projection(mha, "query").kernel.shape)
    (8, 2, 4)
    """
    if part not in ("query", "key", "value", "output"):
        raise ValueError(f"`part` must be 'query', 'key', 'value' or 'output'. Received: part={part!r}")
    for attr in (f"{part}_dense", f"_{part}_dense"):
        try:
            return getattr(layer, attr)
        except AttributeError:
            continue
    if not getattr(layer, "built", False):
        raise AttributeError(f"MultiHeadAttention '{layer.name}' is not built yet: it has no {part} projection")
    raise _moved(f"`_{part}_dense` (MultiHeadAttention's {part} projection sublayer)", layer)


def graph_of(model):
    """The Functional graph of a graph model: itself, or the one Keras keeps
    behind a built Sequential model."""
    if isinstance(model, keras.Sequential):
        functional = _get(model, "_functional", "`Sequential._functional` (its graph)")
        if functional is None:
            raise _moved("a built Sequential model's graph", model)
        return functional
    return model


def keras_mask(tensor):
    """The Keras mask a tensor carries (set by `Embedding(mask_zero=True)`,
    `Masking`, ...), or None. (keras/src/backend/common/masking.py, 3.11-3.15.)"""
    from keras.src.backend.common import masking  # lazy: a private module, read only here

    return masking.get_keras_mask(tensor)


def causal_lm_cache(causal_lm, max_length):
    """The key-value cache keras-hub's CausalLM builds for one sequence of
    `max_length` tokens (`CausalLM._build_cache`, a private method of every
    keras-hub causal LM, checked on keras-hub 0.32), run once on zeros."""
    _, cache = causal_lm._build_cache(keras.ops.zeros((1, max_length), "int32"))
    return cache


def is_input_layer(layer):
    """True for the `InputLayer` behind a model input."""
    return isinstance(layer, keras.layers.InputLayer)


def holds_python_code(layer):
    """True for layers whose config is Python code (`keras.layers.Lambda`),
    which Keras only deserializes with `safe_mode=False`."""
    return isinstance(layer, keras.layers.Lambda)


def input_name(tensor):
    """The name of the `InputLayer` a model input comes from (the name LiteRT signatures use)."""
    return producer(tensor).name


def call_nodes(layer):
    """The nodes recording each call of `layer` in Functional graphs."""
    return list(_get(layer, "_inbound_nodes", "`Operation._inbound_nodes`"))


def node_inputs(node):
    """The input tensors of one call node."""
    return list(node.input_tensors)


def is_graph_network(model):
    """True for Sequential and Functional models (whose layers can be rewired)."""
    if isinstance(model, keras.Sequential):
        return True
    return isinstance(model, keras.Model) and (
        bool(getattr(model, "_is_graph_network", False))
        or any(klass.__name__ == "Functional" for klass in type(model).__mro__)
    )


def distribute_strategy(model):
    """The `tf.distribute` strategy `model` was built under, or None."""
    return getattr(model, "_distribute_strategy", None)


# --- calling a Keras layer with other weights -------------------------------------------
def weight_holder(layer, name):
    """The attribute of `layer` that holds the variable Keras's `call` reads as
    `layer.<name>`: `_kernel` behind Dense's `kernel` property, `kernel` itself
    for convolutions."""
    variable = getattr(layer, name)
    for attr in (f"_{name}", name):
        if layer.__dict__.get(attr) is variable:
            return attr
    raise _moved(f"the attribute holding `{name}`", layer)


@contextlib.contextmanager
def substituted_weights(layer, values):
    """Within it, `layer.call` reads the tensors `values` (`{weight name: tensor}`)
    in place of its variables: how a quantization-aware twin runs its Keras
    parent's `call` on fake-quantized weights without copying that `call`.
    The variables are put back on exit, even on error."""
    swapped = [(weight_holder(layer, name), getattr(layer, name), value) for name, value in values.items()]
    try:
        for holder, _, value in swapped:
            # Layer.__setattr__ would track the tensor as new state.
            object.__setattr__(layer, holder, value)
        yield
    finally:
        for holder, variable, _ in swapped:
            object.__setattr__(layer, holder, variable)


# --- tf.distribute ----------------------------------------------------------------------
def is_multi_worker(strategy):
    """True for a MultiWorkerMirroredStrategy that really spans several workers."""
    import tensorflow as tf

    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return False
    return bool(_get(strategy.extended, "_in_multi_worker_mode")())


_MULTI_WORKER_FIX = {"applied": False}


def patch_multi_worker_trainer():
    """Makes Keras 3's TensorFlow trainer work under MultiWorkerMirroredStrategy.

    Two narrow, version-guarded changes (tensorflow/tensorflow#72388):

    1. `_maybe_symbolic_build` averages the first distributed batch across
       workers just to learn its shapes (an extra collective, which fails for
       integer labels); under multi-worker, take this worker's first replica's
       batch instead. Other strategies keep Keras's code.
    2. `reduce_per_replica` reduces scalar logs with `axis=0`, which fails
       for scalars under multi-worker; reduce those with `axis=None`.

    `tests/test_strategies.py` keeps a strict-xfail test of Keras without the
    fix, so the suite says when an upstream release makes it unnecessary.
    Returns True if the fix is (now or already) in place.
    """
    import tensorflow as tf
    from keras import tree
    from keras.src.backend.tensorflow import trainer

    if _MULTI_WORKER_FIX["applied"]:
        return True
    if not (hasattr(trainer, "reduce_per_replica") and hasattr(trainer.TensorFlowTrainer, "_maybe_symbolic_build")
            and hasattr(trainer, "_collective_all_reduce_multi_worker")):
        log.warning("tfopt: this Keras version's TensorFlow trainer has changed; not applying the multi-worker fix.")
        return False
    original_build = trainer.TensorFlowTrainer._maybe_symbolic_build
    original_reduce = trainer.reduce_per_replica

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if iterator is None or strategy is None or not trainer._collective_all_reduce_multi_worker(strategy):
            return original_build(self, iterator=iterator, data_batch=data_batch)
        for _, _, it in iterator:
            batch = next(it)
            data_batch = tree.map_structure(
                lambda v: strategy.experimental_local_results(v)[0]
                if isinstance(v, tf.distribute.DistributedValues) else v,
                batch,
            )
            break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not trainer._collective_all_reduce_multi_worker(strategy):
            return original_reduce(values, strategy, reduction)

        def reduce(v):
            local = strategy.experimental_local_results(v)[0] if isinstance(v, tf.distribute.DistributedValues) else v
            if getattr(local, "shape", None) is not None and local.shape.rank == 0:
                return strategy.reduce("MEAN", v, axis=None)
            return original_reduce(v, strategy, reduction)

        return tree.map_structure(reduce, values)

    trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    trainer.reduce_per_replica = reduce_per_replica
    _MULTI_WORKER_FIX["applied"] = True
    return True


# --- LiteRT -----------------------------------------------------------------------------
def litert_ops(interpreter):
    """`[{"op_name", "inputs", ...}]` for every op of a LiteRT interpreter's graph."""
    return _get(interpreter, "_get_ops_details", "`Interpreter._get_ops_details`")()


# --- a layer's own variables ------------------------------------------------------------
def own_variables(layer):
    """The variables `layer` itself holds (its sublayers' excluded), in the order
    Keras's `Layer.save_own_variables` writes them: trainable, then non-trainable."""
    return list(_get(layer, "_trainable_variables")) + list(_get(layer, "_non_trainable_variables"))


def add_replica_local_weight(layer, name, shape, dtype="float32", initializer="ones", autocast=True):
    """A non-trainable weight of `layer`, as `layer.add_weight` makes it, that each
    replica of a tf.distribute strategy holds and writes for itself
    (`synchronization="on_read"`, which `add_weight` does not take; reads outside
    the replicas see the first replica's). For state every replica computes
    identically from synchronized weights, such as a pruning mask: a replica
    writes it with no merge_call, so it can inside a `cond`, and no replica waits
    for another to write it."""
    with keras.name_scope(layer.name, caller=layer):
        variable = replica_local_variable(keras.initializers.get(initializer), name, shape, dtype, autocast)
    _get(layer, "_track_variable", "`Layer._track_variable`")(variable)
    return variable


def replica_local_variable(initializer, name, shape=None, dtype="float32", autocast=True):
    """The one way tfopt makes a replica-local variable (`add_replica_local_weight`
    tracks one on a layer; the Pruning callback keeps its masks off the layers):
    non-trainable, `synchronization="on_read"` with `aggregation="only_first_replica"`.
    `initializer` is a value (then `shape` is None) or a Keras initializer."""
    return keras.Variable(initializer=initializer, shape=shape, dtype=dtype, trainable=False, autocast=autocast,
                          name=name, aggregation="only_first_replica", synchronization="on_read")


def convnext_layer_scale():
    """ConvNeXt's `LayerScale` layer class (`keras.src.applications.convnext`,
    not exported by Keras), or None where this Keras release does not have it:
    `keras.applications.ConvNeXt*` models hold it, so `tfopt.geometry`
    describes it."""
    try:
        from keras.src.applications.convnext import LayerScale
    except ImportError:
        return None
    return LayerScale


# --- the train step being traced -------------------------------------------------------
def stepping_model():
    """`(model, "train_step" or "test_step")` for the Keras model whose step is
    running the caller, or `(None, None)`. A loss learns which model compiled it
    only this way: Keras calls `Model.compute_loss` from `train_step`/`test_step`
    (checked on the versions in CHECKED_KERAS_VERSIONS) and passes the loss no
    model. Read from the Python stack while the step is traced, so once per graph."""
    frame = inspect.currentframe()
    for _ in range(200):
        frame = frame.f_back if frame is not None else None
        if frame is None:
            break
        name = frame.f_code.co_name
        if name in ("train_step", "test_step"):
            model = frame.f_locals.get("self")
            if isinstance(model, keras.Model):
                return model, name
    return None, None



# --- weight-only quantization-aware forms (tfopt.quantize_weights) -------------------------
def weight_quantizable_kind(layer):
    """"dense", "einsum_dense", "reversible_embedding" or "embedding" for a layer that is a Keras
    Dense, EinsumDense, ReversibleEmbedding or Embedding computing with that class's own `call`
    (keras-hub's ReversibleEmbedding, a pass-through subclass, included); None for anything else."""
    base = weight_quantizable_base(layer)
    return None if base is None else {keras.layers.Dense: "dense", keras.layers.EinsumDense: "einsum_dense",
                                      keras.layers.ReversibleEmbedding: "reversible_embedding",
                                      keras.layers.Embedding: "embedding"}[base]


def weight_quantizable_base(layer):
    """The Keras class among Dense, EinsumDense, ReversibleEmbedding, Embedding whose `call`
    `layer` runs, or None. (ReversibleEmbedding is an Embedding: it is asked first.)"""
    for base in (keras.layers.ReversibleEmbedding, keras.layers.Embedding, keras.layers.EinsumDense,
                 keras.layers.Dense):
        if isinstance(layer, base):
            return base if type(layer).call is base.call else None
    return None


def set_class(layer, cls):
    """Changes the class of a built `layer` to `cls`, a subclass of (or base of) its class that
    computes from the same state: tfopt's weight-quantizing forms, and back."""
    object.__setattr__(layer, "__class__", cls)


def has_cross_attention(block):
    """True for a built keras-hub TransformerDecoder with cross-attention (an encoder-decoder block)."""
    return getattr(block, "_cross_attention_layer", None) is not None


def set_no_cross_attention(block):
    """Marks a keras-hub TransformerDecoder twin as built without cross-attention (what its
    parent's other methods read)."""
    block._cross_attention_layer = None


def rotary_cos_sin(rotary, length, dim):
    """`(cos, sin)`, numpy arrays `(length, dim)`: the tables a keras-hub RotaryEmbedding
    (`rotary`, Llama's subclass included) multiplies positions 0 .. length - 1 of a
    `dim`-wide feature axis by, computed by its own `_compute_cos_sin_embedding` (its
    frequency scaling and YaRN factor included)."""
    compute = _get(rotary, "_compute_cos_sin_embedding", "keras-hub RotaryEmbedding's cos/sin tables")
    cos, sin = compute(keras.ops.zeros((1, length, dim), "float32"), 0)
    as_numpy = keras.ops.convert_to_numpy
    return (as_numpy(keras.ops.reshape(keras.ops.cast(cos, "float32"), (length, dim))),
            as_numpy(keras.ops.reshape(keras.ops.cast(sin, "float32"), (length, dim))))


def grouped_query_attention(layer):
    """`(key/value head groups, dropout rate)` of a keras-hub grouped-query attention layer:
    Llama's `LlamaAttention` keeps them as attributes, Mistral's `CachedMistralAttention`
    as private ones."""
    for groups, dropout in (("num_key_value_groups", "dropout"), ("_num_key_value_groups", "_dropout")):
        if hasattr(layer, groups):
            return getattr(layer, groups), _get(layer, dropout)
    raise _moved("`num_key_value_groups` (keras-hub's grouped-query attention)", layer)
