"""`quantize_weights`: int4/int8 weight-only quantization-aware training of any model, keras-hub included.

What it is for: the weight-quantized LiteRT precisions of `tfopt.export`
("int4_block32/64/128", "int4_weight_only", "int4_dynamic", "int8_weight_only")
store the weights of every matrix multiplication as integers, computed by
LiteRT's quantizer from the float file. Post-training, that rounding costs a
language model perplexity; trained with the rounding in the loop (as Gemma's
QAT checkpoints are), the model learns weights that survive it, and the file
computes what the trained model computes.

Design (decided for issue 22):

- In place, no new state. Every Dense, EinsumDense, (tied or untied)
  ReversibleEmbedding and Embedding nested anywhere in the model (keras-hub blocks are
  subclassed layers holding them) changes class to a registered subclass
  (`WeightQuantizedDense`, `WeightQuantizedEinsumDense`,
  `WeightQuantizedReversibleEmbedding`, `WeightQuantizedEmbedding`) whose `call` is its Keras parent's
  `call` run on quantize-dequantize(weight), straight-through gradient, same
  variables (the precedent: `tfopt.layers.litert_forms.use_nested_forms`). So
  a keras-hub model stays a keras-hub model (its class, its config, its
  weights), `fit` and `tfopt.distillation.Distiller` (as the student) train it,
  and the Pruning callback's masks still apply (zeros stay on the grid).
- The grid is the file's: `tfopt.quantizers.int_weight_values`, symmetric,
  scale = max |w| / 7 (int4) or / 127 (int8, narrow range), per output channel
  or per block of 32/64/128 inputs (scales rounded to bfloat16 then float16, as
  the file stores them), exactly as `litert-quantizer` 0.11 computes them, from
  the weights' own max-abs (no learned ranges): re-quantizing the trained
  weights gives the same integers, so the export adds no rounding of its own.
  A weight is seen as the 2-D (inputs, outputs) matrix the converter writes as
  a FULLY_CONNECTED weight: EinsumDense kernels with the contracted axes first,
  a tied embedding transposed (the LM head). Embedding lookup tables are on
  the grid too (`embeddings=True`): the file stores every constant lookup
  table as an integer EMBEDDING_LOOKUP table (tfopt/_export/weight_only.py),
  per row, in blocks along the row for "int4_blockN", which is the tied LM
  head's grid (a tied table is stored once and looked up on the grid). So a
  plain `Embedding` changes class too (`WeightQuantizedEmbedding`), and an
  untied ReversibleEmbedding quantizes its lookup table as well as its
  `reverse_embeddings`. (keras-hub's PositionEmbedding is sliced, not looked
  up: the file keeps it float, and so does this.)
- `tfopt.strip(model)` bakes the quantize-dequantized values into the
  variables and gives the layers their Keras classes back: the float model
  then equals the quantized one, and `tfopt.export(..., precision=...)` of the
  QAT model does that on its own (the model passed is restored afterwards).
- Saving: the forms are registered (`tfopt>WeightQuantized...`) and their
  config holds `weight_precision`, so a Sequential/Functional model round-trips
  through `.keras` in QAT form. The forms keep their parent's `__name__`
  (Dense, ...), which is how a `.keras` file keys a listed layer's weights. A
  keras-hub model's `.keras` file rebuilds its layers from the backbone's own
  config (Keras classes) and loads the weights into them: it comes back in
  float form, so call `tfopt.quantize_weights` again after loading to resume
  QAT (`tfopt.export` of it still writes the same integers while the weights
  stay on the grid). A stripped model loads without tfopt.

Verified (tiny configs, random weights): with "int4_weight_only" the file's
logits equal the QAT model's to 1e-7 (float rounding) for keras-hub
GPT2CausalLM, MistralCausalLM, LlamaCausalLM and GemmaCausalLM (whose query
kernel contracts its middle axis), against 0.06-0.6 for post-training
quantization of the same weights; with "int4_block32" what is left is the
int8 activation rounding of the dynamic file (0.003 vs 0.05 for Mistral).
"""

import weakref

import keras

from tfopt import _keras_internal, quantizers
from tfopt._export import weight_only

__all__ = ["quantize_weights", "WeightQuantizedDense", "WeightQuantizedEinsumDense",
           "WeightQuantizedReversibleEmbedding", "WeightQuantizedEmbedding", "is_weight_quantized", "weight_quantized_layers", "bake",
           "baked_for_export"]

# {precision: (bits, block size)}: what `tfopt.export` writes for each (see tfopt/_export/weight_only.py).
PRECISIONS = {name: (r.bits, r.block_size) for name, r in weight_only.RECIPES.items() if not r.converter}

# {layer: (precision, the class it had)}: tfopt's state, kept off the Keras objects.
_STATE = weakref.WeakKeyDictionary()


def _check_precision(precision, where):
    if precision not in PRECISIONS:
        raise ValueError(
            f"{where}: `precision` must be one of {sorted(PRECISIONS)} (the weight-quantized precisions of "
            f"tfopt.export that LiteRT's quantizer writes). Received: precision={precision!r}. Fix: pass one of "
            "them, e.g. precision='int4_block32'; for int8 weights and activations use tfopt.quantize_model.")
    return PRECISIONS[precision]


class _WeightQuantized:
    """Mixin: the Keras parent's `call` on quantize-dequantized weights (see the module docstring)."""

    def __init__(self, *args, weight_precision="int4_block32", **kwargs):
        _check_precision(weight_precision, type(self).__name__)
        super().__init__(*args, **kwargs)
        _STATE[self] = (weight_precision, type(self).__mro__[2])

    @property
    def weight_precision(self):
        return _STATE[self][0]

    def get_config(self):
        return {**super().get_config(), "weight_precision": self.weight_precision}

    def quantized_values(self):
        """`{weight name: quantize-dequantized tensor}` of the weights the file stores as integers."""
        bits, block = PRECISIONS[self.weight_precision]
        return {name: _from_matrix(quantizers.int_weight_values(_to_matrix(self, name), bits, block), self, name)
                for name in _weight_names(self)}

    def _quantized(self):
        return _keras_internal.substituted_weights(self, self.quantized_values())


@keras.saving.register_keras_serializable(package="tfopt")
class WeightQuantizedDense(_WeightQuantized, keras.layers.Dense):
    """`keras.layers.Dense` computing with its kernel on the int4/int8 grid of
    `weight_precision` (what `tfopt.quantize_weights` turns a Dense into).

    Example:
    >>> import numpy as np
    >>> layer = WeightQuantizedDense(2, weight_precision="int4_weight_only")
    >>> y = layer(np.ones((1, 3), "float32"))
    >>> layer.weight_precision, tuple(y.shape), type(layer).__name__  # (named as its Keras parent)
    ('int4_weight_only', (1, 2), 'Dense')
    """

    def call(self, inputs, training=None):  # (Keras reads the signature: one positional input)
        with self._quantized():
            return super().call(inputs, training=training)


@keras.saving.register_keras_serializable(package="tfopt")
class WeightQuantizedEinsumDense(_WeightQuantized, keras.layers.EinsumDense):
    """`keras.layers.EinsumDense` computing with its kernel on the grid of `weight_precision`."""

    def call(self, inputs, training=None):
        with self._quantized():
            return super().call(inputs, training=training)


@keras.saving.register_keras_serializable(package="tfopt")
class WeightQuantizedReversibleEmbedding(_WeightQuantized, keras.layers.ReversibleEmbedding):
    """`keras.layers.ReversibleEmbedding` whose output projection (the tied
    embeddings, or `reverse_embeddings`) is on the grid of `weight_precision`
    and whose lookup table `embeddings` is on it too (the file stores both as integers)."""

    def call(self, inputs, reverse=False):
        with self._quantized():
            return super().call(inputs, reverse=reverse)


@keras.saving.register_keras_serializable(package="tfopt")
class WeightQuantizedEmbedding(_WeightQuantized, keras.layers.Embedding):
    """`keras.layers.Embedding` looking up rows of its table on the grid of `weight_precision` (per row,
    in blocks along the row for "int4_blockN"), as the weight-quantized file's EMBEDDING_LOOKUP stores it.

    Example:
    >>> import numpy as np
    >>> layer = WeightQuantizedEmbedding(10, 32, weight_precision="int4_block32")
    >>> y = layer(np.arange(4)[None])
    >>> tuple(y.shape), len(np.unique(np.abs(np.asarray(layer.quantized_values()["embeddings"])[0]))) <= 8
    ((1, 4, 32), True)
    """

    def call(self, inputs):
        with self._quantized():
            return super().call(inputs)


# Each form carries its Keras parent's class name: a `.keras` file keys the weights of a layer held in a
# list (a Functional model's `layers`) by the snake-cased class name, so the weights of a model saved in QAT
# form load into the plain Keras model its config rebuilds (a keras-hub model) and back. (Registered above
# under "tfopt>WeightQuantized...", which is what the config names.)
for _form in (WeightQuantizedDense, WeightQuantizedEinsumDense, WeightQuantizedReversibleEmbedding,
              WeightQuantizedEmbedding):
    _form.__name__ = _form.__mro__[2].__name__

_FORMS = {"dense": WeightQuantizedDense, "einsum_dense": WeightQuantizedEinsumDense,
          "reversible_embedding": WeightQuantizedReversibleEmbedding, "embedding": WeightQuantizedEmbedding}


def _weight_names(layer):
    if isinstance(layer, WeightQuantizedReversibleEmbedding):
        return ["embeddings"] if layer.tie_weights else ["embeddings", "reverse_embeddings"]
    if isinstance(layer, WeightQuantizedEmbedding):
        return ["embeddings"]
    return ["kernel"]


def _kind(layer):
    """`_keras_internal.weight_quantizable_kind` ("embedding": a plain Keras Embedding, the lookup
    the file stores as EMBEDDING_LOOKUP)."""
    return _keras_internal.weight_quantizable_kind(layer)


def _einsum_axes(layer):
    """(contracted kernel axes, other kernel axes) of an EinsumDense, or None if a kernel axis is batched."""
    inputs, rest = layer.equation.split(",")
    kernel, output = rest.split("->")
    contracted = [i for i, c in enumerate(kernel) if c in inputs and c not in output]
    others = [i for i, c in enumerate(kernel) if c not in inputs]
    if not contracted or len(contracted) + len(others) != len(kernel):
        return None
    return contracted, others


def _to_matrix(layer, name):
    """The weight as the (inputs, outputs) matrix the file stores (transposed) as a FULLY_CONNECTED weight."""
    from keras import ops

    w = getattr(layer, name)
    if name == "embeddings":  # (vocabulary, hidden): the LM head's (outputs, inputs)
        return ops.transpose(w)
    if isinstance(layer, WeightQuantizedEinsumDense):
        contracted, others = _einsum_axes(layer)
        shape = tuple(w.shape)
        rows = 1
        for i in contracted:
            rows *= shape[i]
        return ops.reshape(ops.transpose(w, contracted + others), (rows, -1))
    return w


def _from_matrix(matrix, layer, name):
    from keras import ops

    w = getattr(layer, name)
    if name == "embeddings":
        return ops.transpose(matrix)
    if isinstance(layer, WeightQuantizedEinsumDense):
        contracted, others = _einsum_axes(layer)
        order = contracted + others
        moved = ops.reshape(matrix, [w.shape[i] for i in order])
        inverse = [order.index(i) for i in range(len(order))]
        return ops.transpose(moved, inverse)
    return matrix


def _input_dim(layer, kind):
    """The input dimension of the layer's (inputs, outputs) weight matrix, or None (einsum with batched axes)."""
    if kind in ("reversible_embedding", "embedding"):
        return layer.output_dim
    if kind == "einsum_dense":
        axes = _einsum_axes(layer)
        if axes is None:
            return None
        rows = 1
        for i in axes[0]:
            rows *= layer.kernel.shape[i]
        return rows
    return layer.kernel.shape[0]


def is_weight_quantized(layer):
    """True for a layer in one of the forms `quantize_weights` puts layers in."""
    return isinstance(layer, _WeightQuantized)


def weight_quantized_layers(model):
    """The layers of `model` (nested ones included) in a weight-quantizing form."""
    return [layer for layer in _keras_internal.all_layers(model) if is_weight_quantized(layer)]


def quantize_weights(model, precision="int4_block32", embeddings=True):
    """Puts `model` in int4/int8 weight-only quantization-aware form, in place, and returns it.

    Every Dense, EinsumDense, ReversibleEmbedding and Embedding nested in
    `model` (a keras-hub CausalLM's attention and feed-forward projections,
    its tied output head and token lookup included) then computes with its weights quantize-dequantized
    on the grid `tfopt.export(model, path, precision=precision)` stores them
    on, with a straight-through gradient, so that `fit` (or a
    `tfopt.distillation.Distiller` whose student is `model`) trains weights
    that survive the export's rounding. No variable is added: the model keeps
    its class, config and weights (see the module docstring for the design).
    `tfopt.strip(model)` bakes the quantized values in and gives back plain
    Keras layers; `tfopt.export` of the model itself does that on a
    temporary basis (the model stays in QAT form).

    Args:
        model: a built Keras model (Sequential, Functional, subclassed, or keras-hub).
        precision: "int4_block32", "int4_block64", "int4_block128" (int4 in
            blocks along the input dimension: the block must divide every
            quantized weight's input dimension), "int4_weight_only" or
            "int4_dynamic" (int4, one scale per output channel), or
            "int8_weight_only" (int8 per output channel). Export with the same
            precision.
        embeddings: also quantize embedding tables: ReversibleEmbedding
            output heads and the lookup tables of Embedding and
            ReversibleEmbedding layers (the file holds both in the precision
            too, so leave it True unless you export it some other way).

    Returns:
        `model`, in place.

    Example:
    >>> import keras, numpy as np, tfopt
    >>> model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(4)])
    >>> model = tfopt.quantize_weights(model, "int4_block32")
    >>> model.layers[0].weight_precision
    'int4_block32'
    >>> kernel = np.asarray(tfopt.strip(model).layers[0].kernel)
    >>> int(max(len(np.unique(np.abs(kernel[i:i + 32, j]))) for i in (0, 32) for j in range(4)) <= 8)
    1
    """
    bits, block = _check_precision(precision, "tfopt.quantize_weights")
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"tfopt.quantize_weights: `model` must be a Keras model. Received: model of type "
                        f"{type(model).__name__}")
    if not model.built:
        raise ValueError(
            f"tfopt.quantize_weights: model '{model.name}' is not built, so it has no weights to quantize. Fix: "
            "build it first (call it on a batch, or give it an Input).")
    if embeddings not in (True, False):
        raise ValueError(f"tfopt.quantize_weights: `embeddings` must be True or False. Received: embeddings={embeddings!r}")
    already = weight_quantized_layers(model)
    if already:
        raise ValueError(
            f"tfopt.quantize_weights: model '{model.name}' already has {len(already)} weight-quantized layer(s) "
            f"(first: '{already[0].name}', precision {already[0].weight_precision!r}). Fix: call it once; to "
            "change the precision, tfopt.strip(model) first (that bakes the current grid in).")
    chosen, refused = [], []
    for layer in _keras_internal.all_layers(model):
        kind = _kind(layer)
        if kind is None or (kind in ("reversible_embedding", "embedding") and not embeddings):
            continue
        if getattr(layer.dtype_policy, "quantization_mode", None) or getattr(layer, "lora_enabled", False):
            refused.append(f"'{layer.name}' ({type(layer).__name__}): quantized by Keras or LoRA-enabled")
            continue
        dim = _input_dim(layer, kind)
        if dim is None:
            refused.append(f"'{layer.name}' (EinsumDense '{layer.equation}'): a kernel axis is batched, not a matmul")
            continue
        if block and dim % block:
            fits = [f"int4_block{b}" for b in weight_only.BLOCK_SIZES if dim % b == 0]
            raise ValueError(
                f"tfopt.quantize_weights: precision={precision!r} quantizes in blocks of {block} inputs, and layer "
                f"'{layer.name}' ({type(layer).__name__}) has {dim} inputs, which {block} does not divide. Fix: "
                + (f"precision={fits[-1]!r}, or " if fits else "")
                + "precision='int4_weight_only' (one scale per output channel).")
        chosen.append((layer, kind))
    if not chosen:
        raise ValueError(
            f"tfopt.quantize_weights: model '{model.name}' has no Dense, EinsumDense, ReversibleEmbedding or "
            f"Embedding layer to quantize{' (' + '; '.join(refused[:3]) + ')' if refused else ''}, so nothing would change. "
            "Fix: pass a model with such layers (convolutions: use tfopt.quantize_model), or the float model "
            "before Keras quantization or LoRA.")
    if refused:
        import warnings

        warnings.warn(
            f"tfopt.quantize_weights: {len(refused)} layer(s) of model '{model.name}' stay float (first: "
            f"{refused[0]}), and tfopt.export will quantize them post-training. Fix: merge LoRA or export the "
            "float model before Keras quantization.", UserWarning, stacklevel=2)
    for layer, kind in chosen:
        _STATE[layer] = (precision, type(layer))
        _keras_internal.set_class(layer, _FORMS[kind])
    return model


def baked_values(layer):
    """`[(variable, quantize-dequantized value)]` of a weight-quantized layer."""
    values = layer.quantized_values()
    return [(getattr(layer, name), values[name]) for name in values]


def bake(layer):
    """Writes the quantize-dequantized weights into the variables of a weight-quantized `layer` and
    gives it back the class it had (a Keras layer again)."""
    for variable, value in baked_values(layer):
        variable.assign(value)
    _keras_internal.set_class(layer, original_class(layer))


def original_class(layer):
    """The class a weight-quantized layer had before `quantize_weights` (its Keras parent after loading)."""
    state = _STATE.get(layer)
    return state[1] if state is not None else type(layer).__mro__[2]


def plain_config(layer):
    config = layer.get_config()
    config.pop("weight_precision", None)
    return config


class baked_for_export:
    """Within it, `model`'s weight-quantized layers are baked (plain Keras layers on the grid); on exit,
    their float weights and forms are restored (for `tfopt.export` of a QAT model)."""

    def __init__(self, model):
        self.layers = weight_quantized_layers(model) if isinstance(model, keras.layers.Layer) else []
        self.saved = []

    def __enter__(self):
        from keras import ops

        for layer in self.layers:
            forms = type(layer)
            self.saved.append((layer, forms, [(v, ops.copy(v.value)) for v, _ in baked_values(layer)]))
            bake(layer)
        return self

    def __exit__(self, *exc):
        for layer, form, values in self.saved:
            for variable, value in values:
                variable.assign(value)
            _keras_internal.set_class(layer, form)
        return False
