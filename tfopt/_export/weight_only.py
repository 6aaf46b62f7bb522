"""`tfopt.export`'s weight-quantized precisions: integer weights, float activations.

Two steps, as Google's LiteRT guide does it: the converter writes the float32
file (or, for "int8_dynamic", its own dynamic-range file), then LiteRT's
quantizer (`litert-quantizer`, an optional extra) rewrites the weights of that
file with one of its recipes. The result must load in the default
`ai_edge_litert` interpreter and hold the integer weights asked for, else
nothing is written.

Measured here (litert-quantizer 0.11, LiteRT 2.3): the quantizer quantizes
FULLY_CONNECTED, BATCH_MATMUL, CONV_2D and EMBEDDING_LOOKUP weights; its
blockwise int4 exists only as a dynamic recipe (weights int4 in blocks along the
input dimension, activations quantized to int8 at run time by the kernel): its
weight-only recipe in blocks is silently skipped (the file stays float), so
tfopt offers blockwise as "int4_block32/64/128", dynamic, and refuses a file
whose weights were not quantized.

Embedding lookups (issue 22). The converter writes a Keras `Embedding` lookup
(`ops.take(table, ids, axis=0)`) as GATHER, which the quantizer takes only in
its static recipes (int8 activations, calibrated), so in a weight-only or
dynamic recipe the table stayed float32, and a tied table was stored twice
(float for the lookup, integer for the LM head). Before quantizing, tfopt
rewrites each GATHER of a constant float32 2-D table along axis 0 (int32 or
int64 ids, no batch dims) as RESHAPE(ids, [-1]) -> EMBEDDING_LOOKUP ->
RESHAPE(ids' shape + [width]) (with SHAPE and CONCATENATION when the ids'
shape is dynamic): same values bit for bit in float, and LiteRT's
EMBEDDING_LOOKUP has hybrid kernels for integer tables (per row, and in blocks
along the row). The quantizer then stores the table in the precision asked for
(int8 or int4 per row; int4 in blocks of 32/64/128 along the row for
"int4_blockN": the LM head's grid, so a tied table is stored once, shared by
the lookup and the head), and the file runs in the default interpreter (int8,
int4 per row and int4 blockwise all measured). "int8_dynamic" (the converter's
own file) keeps its GATHERs float. Not rewritten (stay float): lookups of
tables that are not constants (or live outside the flatbuffer, files over
2 GB), and position tables a model slices rather than gathers (keras-hub's
PositionEmbedding becomes SLICE). `tfopt.quantize_weights` puts embedding
lookups on the same grid.
"""

import contextlib
import dataclasses
import io

from tfopt import _keras_internal, litert

EXTRA = "litert-quantizer"
INSTALL = "pip install 'tfopt[litert-quantizer]'"
BLOCK_SIZES = (32, 64, 128)
# TensorType codes of the LiteRT schema (the interpreter reports an INT4 tensor as np.int8).
INT8, INT4 = 9, 17
FULLY_CONNECTED, EMBEDDING_LOOKUP = 9, 7  # (BuiltinOperator codes)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a precision is made: the converter's dynamic range (`converter`) or a quantizer recipe."""

    bits: int
    dynamic: bool  # activations quantized at run time (else: weights dequantized, float compute)
    block_size: int = 0  # 0: one scale per output channel
    converter: bool = False


RECIPES = {
    "int8_weight_only": Recipe(8, dynamic=False),
    "int8_dynamic": Recipe(8, dynamic=True, converter=True),
    "int4_weight_only": Recipe(4, dynamic=False),
    "int4_dynamic": Recipe(4, dynamic=True),
    **{f"int4_block{b}": Recipe(4, dynamic=True, block_size=b) for b in BLOCK_SIZES},
}
PRECISIONS = tuple(RECIPES)


def is_weight_precision(precision):
    return precision in RECIPES


def needs_quantizer(precision):
    return precision in RECIPES and not RECIPES[precision].converter


def require_quantizer(precision):
    """Raises an ImportError naming the extra when `precision` needs the quantizer and it is absent."""
    if not needs_quantizer(precision):
        return
    try:
        import litert_quantizer  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"tfopt.export: precision={precision!r} rewrites the converter's float file with LiteRT's quantizer, "
            f"which is not installed. Fix: `{INSTALL}` (package litert-quantizer), or export with "
            "precision='int8_dynamic' (the converter's own dynamic-range int8, no extra needed).") from e


def converter_optimizations(precision, optimizations):
    """The `optimizations` to convert with: the converter's dynamic range for "int8_dynamic"."""
    if precision in RECIPES and RECIPES[precision].converter:
        import tensorflow as tf

        return [tf.lite.Optimize.DEFAULT]
    return optimizations


def tensor_types(content):
    """{LiteRT TensorType code: count} over the tensors of the file's subgraphs (INT4 is 17, INT8 9)."""
    from litert_quantizer.utils import tfl_flatbuffer_utils

    counts = {}
    for subgraph in tfl_flatbuffer_utils.read_model(content).subgraphs:
        for tensor in subgraph.tensors:
            counts[tensor.type] = counts.get(tensor.type, 0) + 1
    return counts


def _weight_shapes(content, ops=(FULLY_CONNECTED, EMBEDDING_LOOKUP)):
    """(tensor name, shape) of the constant 2-D weights of the file's FULLY_CONNECTED ops (outputs, inputs)
    and tables of its EMBEDDING_LOOKUP ops (rows, width): both are quantized per row, blocks along dim 1."""
    from litert_quantizer.utils import tfl_flatbuffer_utils

    model = tfl_flatbuffer_utils.read_model(content)
    out = []
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            code = model.operatorCodes[op.opcodeIndex]
            if max(code.builtinCode, code.deprecatedBuiltinCode) not in ops or len(op.inputs) < 2:
                continue
            tensor = subgraph.tensors[op.inputs[1]]
            buffer = model.buffers[tensor.buffer]
            constant = buffer.data is not None or getattr(buffer, "offset", 0)
            if constant and tensor.shape is not None and len(tensor.shape) == 2:
                out.append((tfl_flatbuffer_utils.get_tensor_name(tensor), tuple(int(d) for d in tensor.shape)))
    return out


def _check_blocks(content, precision, path):
    block = RECIPES[precision].block_size
    bad = [(name, shape) for name, shape in _weight_shapes(content) if shape[1] % block]
    if not bad:
        return
    dims = sorted({shape[1] for _, shape in _weight_shapes(content)})
    fits = [f"int4_block{b}" for b in BLOCK_SIZES if all(d % b == 0 for d in dims)]
    name, shape = bad[0]
    raise ValueError(
        f"tfopt.export: precision={precision!r} quantizes weights in blocks of {block} along their input "
        f"dimension, and {len(bad)} weight(s) have an input dimension that {block} does not divide (first: "
        f"'{name}', shape {shape} (outputs, inputs)), so nothing was written to {str(path)!r}. The input "
        f"dimensions of the file's FULLY_CONNECTED weights and embedding lookup tables (their width) are "
        f"{dims}. Fix: "
        + (f"precision={fits[-1]!r} (divides every one), or " if fits else "")
        + "precision='int4_dynamic' or 'int4_weight_only' (one scale per output channel).")


def quantize(content, precision, path):
    """(file, size of the float file quantized or None): `content` (the converter's file) with its weights
    quantized for `precision`.

    Raises (nothing written) when the quantizer fails, quantizes no weight, or
    writes a file the default LiteRT interpreter cannot load."""
    recipe = RECIPES[precision]
    if recipe.converter:
        import numpy as np

        if not litert.tensor_count(content, np.int8):
            raise ValueError(
                f"tfopt.export: the converter left every weight in float for precision={precision!r} (its dynamic "
                "range quantizes only weights of 1024 elements or more, of FULLY_CONNECTED, CONV_2D and similar "
                f"ops), so nothing was written to {str(path)!r}. Fix: precision='int8_weight_only' (LiteRT's "
                "quantizer takes every weight), or 'float16'.")
        return content, None
    from litert_quantizer import qtyping, quantizer

    float_size = len(content)
    content, lookups = gathers_to_embedding_lookups(content)
    if recipe.block_size:
        _check_blocks(content, precision, path)
    granularity = (getattr(qtyping.QuantGranularity, f"BLOCKWISE_{recipe.block_size}") if recipe.block_size
                   else qtyping.QuantGranularity.CHANNELWISE)
    q = quantizer.Quantizer(content)
    add = q.add_dynamic_config if recipe.dynamic else q.add_weight_only_config
    add(".*", qtyping.TFLOperationName.ALL_SUPPORTED, recipe.bits, granularity)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # (its transformation step draws a progress bar regardless)
            result = q.quantize(enable_progress_report=False, enable_progress_bar=False)
    except ValueError as e:
        raise ValueError(
            f"tfopt.export: LiteRT's quantizer could not quantize the file for precision={precision!r} "
            f"({' '.join(str(e).split())[:300]}), so nothing was written to {str(path)!r}. Fix: try "
            "precision='int8_weight_only' or 'int8_dynamic', or report the model to tfopt.") from e
    quantized = bytes(result.quantized_model)
    wanted = INT4 if recipe.bits == 4 else INT8
    if not tensor_types(quantized).get(wanted):
        raise ValueError(
            f"tfopt.export: LiteRT's quantizer left every weight in float for precision={precision!r} (the "
            f"file has no int{recipe.bits} tensor: no FULLY_CONNECTED, BATCH_MATMUL, CONV_2D or "
            f"EMBEDDING_LOOKUP op with constant weights it takes), so nothing was written to {str(path)!r}. "
            "Fix: export with precision='float16' or 'int8' (with representative_data=).")
    error = litert.litert_load_error(quantized)
    if error is not None:
        raise ValueError(
            f"tfopt.export: the {precision} file from LiteRT's quantizer does not load in the default LiteRT "
            f"interpreter ({' '.join(str(error).split())[:200]}), so nothing was written to {str(path)!r}. "
            "Fix: try precision='int8_weight_only' or 'int8_dynamic'.")
    left = float_lookup_tables(quantized) if lookups else []
    if left:
        import warnings

        warnings.warn(
            f"tfopt.export: LiteRT's quantizer left {len(left)} embedding lookup table(s) in float32 for "
            f"precision={precision!r} (first: '{left[0]}'); the file computes them in float, and "
            "tfopt.quantize_weights assumes they are integer. Fix: report the model to tfopt.",
            UserWarning, stacklevel=5)
    return quantized, float_size


def float_lookup_tables(content):
    """Names of the constant float32 tables of the file's EMBEDDING_LOOKUP ops (a weight-only recipe's
    table is an integer constant dequantized by a DEQUANTIZE op: not one of them)."""
    from litert_quantizer.utils import tfl_flatbuffer_utils

    model = tfl_flatbuffer_utils.read_model(content)
    names = []
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            code = model.operatorCodes[op.opcodeIndex]
            if max(code.builtinCode, code.deprecatedBuiltinCode) == EMBEDDING_LOOKUP:
                table = subgraph.tensors[op.inputs[1]]
                data = model.buffers[table.buffer].data
                if table.type == 0 and data is not None and len(data):  # (FLOAT32 constant)
                    names.append(tfl_flatbuffer_utils.get_tensor_name(table))
    return names


def gathers_to_embedding_lookups(content):
    """(file, count): `content` with each GATHER of a constant float32 2-D table along axis 0 (the
    converter's form of an embedding lookup) rewritten as the EMBEDDING_LOOKUP the quantizer takes (see the
    module docstring); `content` itself and 0 when there is none (or the file keeps buffers outside its
    flatbuffer)."""
    import numpy as np
    from ai_edge_litert.tools import flatbuffer_utils

    fb = flatbuffer_utils.schema_fb
    ops, types = fb.BuiltinOperator, fb.TensorType
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(content))
    if any(getattr(b, "offset", 0) for b in model.buffers):
        return content, 0  # (over 2 GB: the object API cannot write it back)

    def opcode(builtin):
        for i, code in enumerate(model.operatorCodes):
            if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
                return i
        code = fb.OperatorCodeT()
        code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), 1
        model.operatorCodes.append(code)
        return len(model.operatorCodes) - 1

    def tensor(subgraph, name, shape, signature, dtype, values=None):
        buffer = fb.BufferT()
        if values is not None:
            buffer.data = np.asarray(values, "int32").tobytes()
        model.buffers.append(buffer)
        t = fb.TensorT()
        t.name, t.shape, t.type, t.buffer = name, list(shape), dtype, len(model.buffers) - 1
        t.shapeSignature = None if signature is None else list(signature)
        subgraph.tensors.append(t)
        return len(subgraph.tensors) - 1

    def operator(builtin, inputs, outputs, options_type=0, options=None):
        op = fb.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = opcode(builtin), list(inputs), list(outputs)
        op.builtinOptionsType, op.builtinOptions = options_type, options
        return op

    count = 0
    for subgraph in model.subgraphs:
        rewritten = []
        for op in subgraph.operators:
            code = model.operatorCodes[op.opcodeIndex]
            options = op.builtinOptions
            if max(code.builtinCode, code.deprecatedBuiltinCode) != ops.GATHER or len(op.inputs) != 2:
                rewritten.append(op)
                continue
            table, ids = subgraph.tensors[op.inputs[0]], subgraph.tensors[op.inputs[1]]
            data = model.buffers[table.buffer].data
            if (data is None or len(data) == 0 or table.type != types.FLOAT32 or table.shape is None
                    or len(table.shape) != 2 or ids.type not in (types.INT32, types.INT64) or ids.shape is None
                    or options is None or options.axis not in (0, -2) or options.batchDims != 0):
                rewritten.append(op)
                continue
            name = table.name.decode() if isinstance(table.name, bytes) else str(table.name)
            width, rank = int(table.shape[1]), len(ids.shape)
            signature = list(ids.shapeSignature) if ids.shapeSignature is not None and len(ids.shapeSignature) \
                else list(ids.shape)
            dynamic = any(d < 0 for d in signature)
            n = int(np.prod(ids.shape)) if rank else 1
            source = op.inputs[1]
            if ids.type == types.INT64:  # (EMBEDDING_LOOKUP takes int32 ids)
                cast = tensor(subgraph, name + "/lookup_ids_int32", ids.shape, ids.shapeSignature, types.INT32)
                rewritten.append(operator(ops.CAST, [source], [cast]))
                source = cast
            flat = tensor(subgraph, name + "/lookup_ids", [n], [-1] if dynamic else None, types.INT32)
            reshape = fb.ReshapeOptionsT()
            reshape.newShape = [-1]
            rewritten.append(operator(ops.RESHAPE, [source, tensor(subgraph, name + "/lookup_flat", [1], None,
                                                                  types.INT32, [-1])],
                                      [flat], fb.BuiltinOptions.ReshapeOptions, reshape))
            rows = tensor(subgraph, name + "/lookup_rows", [n, width], [-1, width] if dynamic else None,
                          types.FLOAT32)
            rewritten.append(operator(ops.EMBEDDING_LOOKUP, [flat, op.inputs[0]], [rows]))
            if dynamic:
                shape = tensor(subgraph, name + "/lookup_ids_shape", [rank], None, types.INT32)
                shape_options = fb.ShapeOptionsT()
                shape_options.outType = types.INT32
                rewritten.append(operator(ops.SHAPE, [source], [shape], fb.BuiltinOptions.ShapeOptions,
                                          shape_options))
                out_shape = tensor(subgraph, name + "/lookup_out_shape", [rank + 1], None, types.INT32)
                concat = fb.ConcatenationOptionsT()
                concat.axis = 0
                rewritten.append(operator(
                    ops.CONCATENATION, [shape, tensor(subgraph, name + "/lookup_width", [1], None, types.INT32,
                                                      [width])],
                    [out_shape], fb.BuiltinOptions.ConcatenationOptions, concat))
                rewritten.append(operator(ops.RESHAPE, [rows, out_shape], op.outputs))
            else:
                reshape = fb.ReshapeOptionsT()
                reshape.newShape = [int(d) for d in ids.shape] + [width]
                out_shape = tensor(subgraph, name + "/lookup_out_shape", [rank + 1], None, types.INT32,
                                   reshape.newShape)
                rewritten.append(operator(ops.RESHAPE, [rows, out_shape], op.outputs,
                                          fb.BuiltinOptions.ReshapeOptions, reshape))
            count += 1
        subgraph.operators = rewritten
    if not count:
        return content, 0
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), count


def keras_quantized_layers(model):
    """Layers of `model` that Keras quantized (`model.quantize("int8"/"int4"/...)`): their dtype policy has a mode."""
    return [layer for layer in _keras_internal.all_layers(model)
            if getattr(getattr(layer, "dtype_policy", None), "quantization_mode", None)]


# What a model quantized by Keras can be exported as: its own int8 weights (LiteRT's quantizer gives back
# exactly Keras's integers: both are symmetric per output channel, scale = max |w| / 127), or in float.
KERAS_INT8_PRECISIONS = ("int8_weight_only", "float32")


def _keras_int8_supported(model, layers):
    import keras

    top = {id(layer) for layer in model.layers}
    return _keras_internal.is_graph_network(model) and all(
        layer.dtype_policy.quantization_mode == "int8" and type(layer) in (keras.layers.Dense, keras.layers.Embedding)
        and id(layer) in top for layer in layers)


def check_keras_quantized(model, precision):
    """Refuses, before converting, a model quantized by Keras that export cannot write correctly.

    Measured (Keras 3.15, TF 2.21): the converter refuses `model.quantize("int8")`
    layers as they are (they quantize their inputs to int8 and multiply int8 by
    int8: 'tfl.fully_connected' op operand #0 ... got 'tensor<?x64xi8>'), and
    after `model.quantize("int4")` it writes a file that computes something else
    (max |difference| 1.7, top-1 agreement 50% on a 64-64-10 MLP). So a
    Sequential or Functional model whose quantized layers are int8 Dense and
    Embedding layers is exported from a float copy holding its dequantized
    weights (`keras_int8_float_copy`), in `KERAS_INT8_PRECISIONS`; anything else
    is refused here."""
    layers = keras_quantized_layers(model)
    if not layers:
        return
    if _keras_int8_supported(model, layers):
        if precision in KERAS_INT8_PRECISIONS:
            return
        raise ValueError(
            f"tfopt.export: model '{model.name}' was quantized by Keras (`model.quantize('int8')`, {len(layers)} "
            f"layer(s)), and precision={precision!r} would quantize its int8 weights again. Fix: "
            "precision='int8_weight_only' (the file holds Keras's own int8 weights and scales) or 'float32' "
            "(its dequantized weights in float).")
    modes = sorted({layer.dtype_policy.quantization_mode for layer in layers})
    raise ValueError(
        f"tfopt.export: model '{model.name}' was quantized by Keras (`model.quantize({modes[0]!r})`: layer "
        f"'{layers[0].name}' ({type(layers[0]).__name__}) has dtype policy {layers[0].dtype_policy.name!r}, "
        f"{len(layers)} layer(s) in all), which the LiteRT converter does not convert correctly (int8: refused; "
        "int4: a file that computes something else), and tfopt exports with their own weights only int8 Dense "
        "and Embedding layers at the top of a Sequential or Functional model. Fix: export the float model "
        "(before `model.quantize`) with precision='int8_weight_only' or 'int4_weight_only' (per-channel "
        "integer weights, as Keras's), or 'int8_dynamic' (int8 weights and activations quantized at run time).")


def keras_int8_float_copy(model):
    """A float32 copy of a model quantized by Keras in int8 (see `check_keras_quantized`), its weights
    dequantized (kernel / kernel_scale per output unit, embeddings / embeddings_scale per row); None for
    a model Keras did not quantize."""
    layers = keras_quantized_layers(model)
    if not layers or not _keras_int8_supported(model, layers):
        return None
    import keras
    import numpy as np

    ids = {id(layer) for layer in layers}

    def clone_function(layer):
        config = layer.get_config()
        if id(layer) in ids:
            config["dtype"] = "float32"
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone_function)
    for layer, twin in zip(model.layers, copy.layers):
        if id(layer) not in ids:
            twin.set_weights(layer.get_weights())
        elif hasattr(layer, "kernel_scale"):  # a Dense (the other kind is an Embedding)
            kernel = np.asarray(layer._kernel, "float32") / np.asarray(layer.kernel_scale, "float32")
            twin.set_weights([kernel] + ([np.asarray(layer.bias)] if layer.use_bias else []))
        else:
            scale = np.asarray(layer.embeddings_scale, "float32")[:, None]
            twin.set_weights([np.asarray(layer._embeddings, "float32") / scale])
    return copy


def check_plan(precision, sparse):
    """Plan-time checks of a weight precision: the extra installed, no sparse encoding."""
    require_quantizer(precision)
    if sparse is True:
        raise ValueError(
            f"tfopt.export: sparse=True re-encodes the converter's file, and precision={precision!r} rewrites "
            "its weights with LiteRT's quantizer afterwards; the two do not combine. Fix: drop sparse= (or "
            "pass sparse=False), or export with precision='float32' or 'int8' and sparse=True.")
    return False if sparse == "auto" else sparse


__all__ = ["PRECISIONS", "is_weight_precision", "quantize", "tensor_types", "check_plan",
           "gathers_to_embedding_lookups", "float_lookup_tables"]
