"""Misuses of tfopt.export and what tfopt says."""

import os
import tempfile
import warnings
from unittest import mock

import keras
import numpy as np

import tfopt
from tests.misuse.harness import Misuse, MisuseTestCase
from tfopt import litert


def _frames(channels=3):
    """A tiny model of 16 frames x `channels`."""
    return keras.Sequential([keras.Input((16, channels), name="frames"), keras.layers.Flatten(),
                             keras.layers.Dense(2, name="head")], name="tiny")


def _path(name="m.tflite"):
    return os.path.join(tempfile.mkdtemp(), name)


def _x(*shape, fill=None):
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    return x if fill is None else np.full(shape, fill, "float32")


def _keras_quantized(mode):
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="head")], name="kq")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (InputLayer has no quantize method)
        model.quantize(mode)
    return model


def _token_model():
    ids = keras.Input((8,), dtype="int32", name="ids")
    x = keras.layers.Flatten()(keras.layers.Embedding(17, 4)(ids))
    return keras.Model(ids, keras.layers.Dense(2)(x), name="tokens")


def _mlp_48():
    return keras.Sequential([keras.Input((48,)), keras.layers.Dense(64, name="hidden"), keras.layers.Dense(2)],
                            name="mlp")


def _export_into_directory():
    path = _path("dir.tflite")
    os.makedirs(path)
    return tfopt.export(_frames(), path)


def _export_under_a_file():
    parent = _path("notes.txt")
    with open(parent, "w") as f:
        f.write("not a directory")
    return tfopt.export(_frames(), os.path.join(parent, "m.tflite"))


def _export_into_read_only_directory():
    directory = tempfile.mkdtemp()
    os.chmod(directory, 0o555)
    access = os.access

    def denied(path, mode, **kwargs):  # root may write anywhere: deny it here too
        return False if os.path.abspath(path) == directory and mode & os.W_OK else access(path, mode, **kwargs)

    try:
        with mock.patch.object(os, "access", side_effect=denied):
            return tfopt.export(_frames(), os.path.join(directory, "m.tflite"))
    finally:
        os.chmod(directory, 0o755)


def _export_open_length_lstm():
    steps = keras.Input((None, 3), name="steps")
    model = keras.Model(steps, keras.layers.Dense(2)(keras.layers.LSTM(4, name="lstm")(steps)), name="open")
    return tfopt.export(model, _path())


def _export_disagreeing_file():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="head")], name="tiny")
    x = _x(8, 4)
    wrong = -np.asarray(model(x))  # every arg-max moves
    with mock.patch.object(litert, "run_litert", return_value=[wrong]):
        return tfopt.export(model, _path(), inputs=x)


def _two_inputs():
    a, b = keras.Input((4,), name="a"), keras.Input((3,), name="b")
    return keras.Model([a, b], keras.layers.Dense(2)(keras.layers.Concatenate()([a, b])), name="pair")


def _mixed_lambda():
    return keras.Sequential([keras.Input((8,)), keras.layers.Lambda(lambda t: t * 2.0, dtype="mixed_float16",
                                                                    name="double"),
                             keras.layers.Dense(3)], name="lam")


class _Sub(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(2, dtype="mixed_float16")

    def call(self, x):
        return self.dense(x)


def _mixed_subclassed():
    model = _Sub(name="sub")
    model(np.zeros((1, 4), "float32"))
    return model


def _float_convert(model, *args, **kwargs):
    return _REAL_CONVERT(model)  # what the converter returns when it quantizes nothing


_REAL_CONVERT = litert.convert


def _int8_left_in_float():
    with mock.patch.object(litert, "convert", side_effect=_float_convert):
        return tfopt.export(_frames(), _path(), precision="int8", representative_data=_x(8, 16, 3))


def _masked_mlp(structure=None):
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(128, name="hidden"),
                              keras.layers.Dense(4, name="head")], name="mlp")
    for layer in model.layers:
        kernel = layer.kernel.numpy()
        layer.kernel.assign(kernel * np.asarray(tfopt.sparsity.get(structure).mask(kernel, 0.8, 0, -1)))
    return model


def _export_disagreeing_on_drawn_inputs():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="head")], name="tiny")
    wrong = lambda content, arrays, input_names=None: [-np.asarray(model(arrays[0]))]  # noqa: E731
    with mock.patch.object(litert, "run_litert", side_effect=wrong):
        return tfopt.export(model, _path())


def _nan_weights():
    model = _frames()
    model.get_layer("head").bias.assign(np.array([0.0, np.nan], "float32"))
    return tfopt.export(model, _path())


def _nan_check_inputs():
    x = _x(8, 16, 3)
    x[2, 0, 0] = np.nan
    return tfopt.export(_frames(), _path(), inputs=x)


def _dict_with_unknown_key():
    ids = keras.Input((8,), dtype="int32", name="token_ids")
    mask = keras.Input((8,), dtype="int32", name="padding_mask")
    x = keras.layers.Embedding(10, 2)(ids) * keras.ops.expand_dims(keras.ops.cast(mask, "float32"), -1)
    model = keras.Model({"token_ids": ids, "padding_mask": mask},
                        keras.layers.Dense(2)(keras.layers.Flatten()(x)), name="hub")
    ones = np.ones((4, 8), "int32")
    return tfopt.export(model, _path(), inputs={"token_ids": ones, "mask": ones})


class _Plain(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(2)

    def call(self, x):
        return self.dense(x["features"])


def _dict_for_subclassed_model():
    model = _Plain(name="plain")
    model({"features": np.zeros((1, 4), "float32")})
    return tfopt.export(model, _path(), inputs={"features": _x(4, 4)})


TABLE = [
    Misuse("sparse export of an int8 file the default interpreter cannot load",
           lambda: tfopt.export(_masked_mlp(), _path(), precision="int8", representative_data=_x(8, 64),
                                sparse=True),
           warns=UserWarning,
           match=r"the sparse-encoded file does not load in the default LiteRT interpreter \(.*\), so the dense "
                 r"file was written to .*Fix: prune with that structure, export in float32, or drop sparse="),
    Misuse("sparse export whose file computes something else than the dense one",
           lambda: tfopt.export(_masked_mlp("litert_1x16"), _path(), precision="int16x8", representative_data=_x(8, 64),
                                sparse=True),
           warns=UserWarning,
           match=r"the sparse-encoded int16x8 file computes something else than the dense file on the 8 check "
                 r"inputs \(max \|sparse - dense\| .*\), so the dense file was written to .*Fix: export in float32 "
                 r"or int8, or drop sparse="),
    Misuse("sparse export that is not smaller",
           lambda: tfopt.export(_frames(), _path(), sparse=True),
           warns=UserWarning,
           match=r"sparse encoding did not make the file smaller \(.* bytes; the kernels are 0% zeros"),
    Misuse("sparse export with a value that is not True/False/'auto'",
           lambda: tfopt.export(_frames(), _path(), sparse="yes"),
           raises=ValueError, match=r"`sparse` must be True, False or 'auto'\. Received: sparse='yes'"),
    Misuse("int8 export with empty calibration data",
           lambda: tfopt.export(_frames(), _path(), precision="int8", representative_data=_x(0, 16, 3)),
           raises=ValueError,
           match=r"`representative_data` holds no samples \(shape \(0, 16, 3\)\).*leave the model in float.*"
                 r"Fix: pass a few hundred typical inputs"),
    Misuse("int8 export with NaN calibration data",
           lambda: tfopt.export(_frames(), _path(), precision="int8", representative_data=_x(4, 16, 3, fill=np.nan)),
           raises=ValueError,
           match=r"`representative_data` holds 192 NaN/Inf value\(s\) out of 192 \(shape \(4, 16, 3\)\).*"
                 r"Fix: drop or fill those samples"),
    Misuse("int8 export whose file holds no int8 tensor", _int8_left_in_float,
           raises=ValueError,
           match=r"converter returned a float model for precision='int8' \(no int8 tensor in the file; float ops: "
                 r"\[.*FULLY_CONNECTED.*\]\), so nothing was written.*Fix: .*precision='float32'"),
    Misuse("calibration data of the wrong shape",
           lambda: tfopt.export(_frames(), _path(), precision="int8", representative_data=_x(8, 17, 3)),
           raises=ValueError,
           match=r"`representative_data` does not fit model 'tiny', input 'frames': expected shape \(None, 16, 3\).*"
                 r"received shape \(8, 17, 3\)\. Fix: pass arrays shaped \(num_samples, 16, 3\)"),
    Misuse("calibration data missing the channel axis",
           lambda: tfopt.export(_frames(channels=1), _path(), precision="int8", representative_data=_x(8, 16)),
           raises=ValueError,
           match=r"expected shape \(None, 16, 1\).*received shape \(8, 16\)\. Fix: pass arrays shaped "
                 r"\(num_samples, 16, 1\) \(the last axis is missing: add it with x\[\.\.\., np\.newaxis\]\)"),
    Misuse("calibration data that is not an array",
           lambda: tfopt.export(_frames(), _path(), precision="int8", representative_data=(x for x in _x(8, 16, 3))),
           raises=TypeError,
           match=r"`representative_data` must be an array.*Received: representative_data of type generator\. "
                 r"Fix: pass np\.asarray\(samples\)"),
    Misuse("calibration arrays with different numbers of samples",
           lambda: tfopt.export(_two_inputs(), _path(), precision="int8", representative_data=[_x(8, 4), _x(6, 3)]),
           raises=ValueError,
           match=r"arrays of `representative_data` hold different numbers of samples: shapes \[\(8, 4\), \(6, 3\)\]\. "
                 r"Fix: pass one array per model input"),
    Misuse("representative_data with a float precision",
           lambda: tfopt.export(_frames(), _path(), representative_data=_x(8, 16, 3)),
           warns=UserWarning,
           match=r"`representative_data` calibrates int8 and int16x8 exports only; with precision='float32' it is "
                 r"ignored\. Fix: pass precision='int8'"),
    Misuse("int16x8 export without representative_data",
           lambda: tfopt.export(_frames(), _path(), precision="int16x8"),
           raises=ValueError,
           match=r"precision='int16x8' \(16-bit activations, 8-bit weights\) calibrates its activation ranges on "
                 r"data.*model 'tiny' got no `representative_data`\. Fix: pass representative_data="),
    Misuse("int16x8 export of a model with integer inputs (token ids)",
           lambda: tfopt.export(_token_model(), _path(), precision="int16x8",
                                representative_data=np.arange(16, dtype="int32").reshape(2, 8) % 17),
           raises=ValueError,
           match=r"the TensorFlow converter could not calibrate model 'tokens' in precision='int16x8'.*integer "
                 r"inputs: \['ids'\].*Fix: export precision='int8' after tfopt.quantize_model"),
    Misuse("export of an LSTM without a fixed sequence length", _export_open_length_lstm,
           raises=ValueError,
           match=r"layer 'lstm' \(LSTM\) is recurrent, which LiteRT runs unrolled .*needs a fixed sequence "
                 r"length; its input has shape \(None, None, 3\)\. Fix: give the model's Input a fixed number of steps"),
    Misuse("a file that disagrees with the model on your inputs", _export_disagreeing_file,
           warns=UserWarning,
           match=r"the float32 LiteRT file agrees with the Keras model on only 0\.0% of the 8 check inputs.*"
                 r"It was written, but it computes something else than the model"),
    Misuse("a file that disagrees with the model on drawn check inputs", _export_disagreeing_on_drawn_inputs,
           warns=UserWarning,
           match=r"agrees with the Keras model on only 0\.0% of the 8 check inputs \(drawn at random; pass typical "
                 r"ones as inputs=\)"),
    Misuse("a file checked on inputs that hold NaN", _nan_check_inputs,
           warns=UserWarning,
           match=r"the outputs for 1 of the 8 check inputs hold NaN/Inf \(in the float32 LiteRT file: 1, in the "
                 r"Keras model: 1; `inputs` holds 1 NaN/Inf value\(s\)\); they count as disagreeing, top-1 "
                 r"agreement 87\.5%.*Fix: check on finite inputs"),
    Misuse("export of a model whose weights hold NaN", _nan_weights,
           raises=ValueError,
           match=r"layer 'head' \(Dense\) of model 'tiny', weight 'bias' \(shape \(2,\)\), holds 1 NaN/Inf "
                 r"value\(s\) out of 2.*Fix: export finite weights"),
    Misuse("export with num_check_samples=0",
           lambda: tfopt.export(_frames(), _path(), num_check_samples=0),
           raises=ValueError,
           match=r"`num_check_samples` is how many random inputs .* a positive int\. Received: "
                 r"num_check_samples=0\. Fix: .*check=False to skip the check"),
    Misuse("check inputs as a dict with a key the model does not take", _dict_with_unknown_key,
           raises=ValueError,
           match=r"`inputs` is a dict keyed by \['mask', 'token_ids'\], but model 'hub' takes the inputs "
                 r"\[.*\]: missing \['padding_mask'\], unexpected \['mask'\]\. Fix: key the dict by the model's "
                 r"input names"),
    Misuse("check inputs as a dict for a subclassed model", _dict_for_subclassed_model,
           raises=ValueError,
           match=r"`inputs` is a dict \(keys \['features'\]\), but model 'plain' \(_Plain\) has no symbolic "
                 r"inputs.*Fix: pass a list of arrays"),
    Misuse("check inputs of the wrong shape",
           lambda: tfopt.export(_frames(), _path(), inputs=_x(8, 17, 3)),
           raises=ValueError,
           match=r"`inputs` does not fit model 'tiny', input 'frames': expected shape \(None, 16, 3\).*"
                 r"received shape \(8, 17, 3\)\. Fix: pass arrays shaped \(num_samples, 16, 3\)"),
    Misuse("check inputs for the wrong number of model inputs",
           lambda: tfopt.export(_frames(), _path(), inputs=[_x(8, 16, 3), _x(8, 16, 3)]),
           raises=ValueError,
           match=r"model 'tiny' takes 1 input\(s\) \['frames'\], but `inputs` holds 2 array\(s\)\. Received: inputs of "
                 r"shape\(s\) \[\(8, 16, 3\), \(8, 16, 3\)\]\. Fix: pass a list of 1 arrays"),
    Misuse("check inputs with no samples",
           lambda: tfopt.export(_frames(), _path(), inputs=_x(0, 16, 3)),
           raises=ValueError,
           match=r"`inputs` holds no samples \(shape \(0, 16, 3\)\)\. Fix: pass at least one input"),
    Misuse("export to a path that is a directory", _export_into_directory,
           raises=IsADirectoryError,
           match=r"path '.*dir\.tflite' is a directory; `path` names the \.tflite file to write\. "
                 r"Fix: path='.*dir\.tflite/model\.tflite'"),
    Misuse("export under a path that is a file", _export_under_a_file,
           raises=NotADirectoryError,
           match=r"cannot write '.*notes\.txt/m\.tflite': '.*notes\.txt' is a file, not a directory\. Fix"),
    Misuse("export into a read-only directory", _export_into_read_only_directory,
           raises=PermissionError,
           match=r"cannot write '.*m\.tflite': directory '.*' is not writable\. Fix: choose a writable directory"),
    Misuse("export of a mixed_float16 Lambda layer", lambda: tfopt.export(_mixed_lambda(), _path()),
           raises=ValueError,
           match=r"layer 'double' \(Lambda\) of model 'lam' computes in half precision \(dtype policy "
                 r"'mixed_float16'\).*Fix: create that layer with dtype='float32'"),
    Misuse("export of a subclassed mixed_float16 model", lambda: tfopt.export(_mixed_subclassed(), _path()),
           raises=ValueError,
           match=r"model 'sub' \(_Sub\) computes in half precision \(dtype policies \['mixed_float16'\]\).*"
                 r"Fix: build the model again under keras\.mixed_precision\.set_global_policy\('float32'\)"),
    Misuse("export of a model quantized by Keras in int4", lambda: tfopt.export(_keras_quantized("int4"), _path()),
           raises=ValueError,
           match=r"model 'kq' was quantized by Keras \(`model\.quantize\('int4'\)`: layer 'head' \(Dense\).*"
                 r"Fix: export the float model \(before `model\.quantize`\) with precision='int8_weight_only'"),
    Misuse("export of a model quantized by Keras in int8 in another precision",
           lambda: tfopt.export(_keras_quantized("int8"), _path(), precision="int4_weight_only"),
           raises=ValueError,
           match=r"model 'kq' was quantized by Keras \(`model\.quantize\('int8'\)`, 1 layer\(s\)\), and "
                 r"precision='int4_weight_only' would quantize its int8 weights again\. Fix: "
                 r"precision='int8_weight_only'"),
    Misuse("int4 blockwise export with a block size that does not divide an input dimension",
           lambda: tfopt.export(_mlp_48(), _path(), precision="int4_block32"),
           raises=ValueError,
           match=r"precision='int4_block32' quantizes weights in blocks of 32 along their input dimension, and 1 "
                 r"weight\(s\).*shape \(64, 48\).*Fix: precision='int4_dynamic' or 'int4_weight_only'"),
    Misuse("int8_dynamic export whose weights the converter leaves in float",
           lambda: tfopt.export(_frames(), _path(), precision="int8_dynamic"),
           raises=ValueError,
           match=r"the converter left every weight in float for precision='int8_dynamic' .*Fix: "
                 r"precision='int8_weight_only'"),
]


class ExportMisuseTest(MisuseTestCase):
    def test_table(self):
        # Every row raised, warned or logged what it says (a failing row fails its subtest).
        self.assertEqual(self.run_table(TABLE), len(TABLE))
