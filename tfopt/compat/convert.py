"""`from_tfmot`: a tf_keras model pruned or quantized with tfmot, as the equivalent tfopt Keras 3 model.

tfmot and tf_keras run in a child process (importing tfmot sets
`TF_USE_LEGACY_KERAS=1` for the whole process, after which `tf.keras` may mean
Keras 2, depending on import order): it loads the model, records each
`PruneLowMagnitude` wrapper's masks, step and schedule, strips the wrappers
and saves the plain tf_keras model as a legacy `.h5` file, which Keras 3 reads.
This process then makes the tfopt twins (`tfopt.prune`) and restores the masks
and steps, so the result computes what the tfmot model computed and goes on
pruning on the same schedule.
"""

import json
import os
import subprocess
import sys
import tempfile

import keras
import numpy as np

from tfopt import _keras_internal, schedules
from tfopt.layers import Prunable, QuantizeActivation
from tfopt.transforms import prune, quantize_model

__all__ = ["from_tfmot"]

_WORKER = r'''
import json, os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import tensorflow_model_optimization as tfmot
import tf_keras

src, out = sys.argv[1], sys.argv[2]
with tfmot.sparsity.keras.prune_scope(), tfmot.quantization.keras.quantize_scope():
    model = tf_keras.models.load_model(src, compile=False)
quantized = [l.name for l in model.layers if type(l).__name__ in ("QuantizeWrapper", "QuantizeWrapperV2", "QuantizeLayer")]
if quantized:
    if not isinstance(model, tf_keras.Sequential):
        print("QUANTIZED " + json.dumps(quantized))
        sys.exit(3)
    ranges, inner = {}, []
    for layer in model.layers:
        values = {v.name.split("/")[-1].split(":")[0]: float(v.numpy()) for v in layer.weights if v.shape.rank == 0
                  and ("_min" in v.name or "_max" in v.name) and "kernel" not in v.name}
        kind = type(layer).__name__
        if kind == "QuantizeLayer":
            ranges["__input__"] = (values["quantize_layer_min"], values["quantize_layer_max"])
            continue
        target = layer.layer if kind.startswith("QuantizeWrapper") else layer
        config = target.get_config()
        activation = getattr(target, "activation", None)
        if type(activation).__name__ == "QuantizeAwareActivation":  # tfmot's stand-in: restore the original
            config["activation"] = tf_keras.activations.serialize(activation.activation)
        fresh = type(target).from_config(config)
        # The wrapper lists the inner layer's own weights first (kernel, bias, ...), then its quantizers'.
        inner.append((fresh, [v.numpy() for v in layer.weights if v.shape.rank > 0 or not any(
            k in v.name for k in ("_min", "_max", "optimizer_step"))]))
        lo = [v for k, v in values.items() if k.endswith("_min")]
        hi = [v for k, v in values.items() if k.endswith("_max")]
        if lo and hi:
            ranges[target.name] = (lo[0], hi[0])
    float_model = tf_keras.Sequential([tf_keras.Input(model.input_shape[1:])] + [fresh for fresh, _ in inner])
    for fresh, weight_values in inner:
        if weight_values:
            fresh.set_weights(weight_values)
    float_model.save(os.path.join(out, "model.h5"))
    with open(os.path.join(out, "info.json"), "w") as f:
        json.dump({"quantized": ranges}, f)
    np.savez(os.path.join(out, "masks.npz"))
    print("OK")
    sys.exit(0)
info, masks = {}, {}
for layer in model.layers:
    if type(layer).__name__ != "PruneLowMagnitude":
        continue
    inner = layer.layer.name
    weights = []
    for weight, mask, _ in layer.pruning_vars:
        key = f"{inner}/{weight.name.split('/')[-1].split(':')[0]}"
        masks[key] = mask.numpy()
        weights.append(key)
    info[inner] = {"step": int(layer.pruning_step.numpy()), "weights": weights,
                   "schedule": layer.pruning_schedule.get_config()}
stripped = tfmot.sparsity.keras.strip_pruning(model)
stripped.save(os.path.join(out, "model.h5"))
np.savez(os.path.join(out, "masks.npz"), **{k.replace("/", "|"): v for k, v in masks.items()})
with open(os.path.join(out, "info.json"), "w") as f:
    json.dump(info, f)
print("OK")
'''


def _schedule(config):
    name, args = config["class_name"], dict(config["config"])
    if name == "ConstantSparsity":
        return schedules.ConstantSparsity(**args)
    if name == "PolynomialDecay":
        return schedules.PolynomialDecay(**args)
    raise ValueError(f"from_tfmot: the tfmot schedule {name} has no tfopt equivalent (ConstantSparsity, "
                     "PolynomialDecay).")


def _quantized(model, ranges):
    """`tfopt.quantize_model(model)` with tfmot's activation ranges."""
    qat = quantize_model(model, "int8", unsupported="float")
    layers = {layer.name: layer for layer in _keras_internal.all_layers(qat)}
    targets = {}  # tfmot range name -> (min, max, updates) variables in `qat`
    for layer in layers.values():
        if isinstance(layer, QuantizeActivation):
            producer = _keras_internal.producer(_keras_internal.node_inputs(_keras_internal.call_nodes(layer)[0])[0])
            if _keras_internal.is_input_layer(producer):
                targets["__input__"] = (layer.range_min, layer.range_max, layer.range_updates)
            elif layer.name.endswith("_activation_quantize"):  # tfmot's range is after the activation
                targets[layer.name[: -len("_activation_quantize")]] = (layer.range_min, layer.range_max,
                                                                       layer.range_updates)
            elif layer.name.endswith("_quantize"):
                targets.setdefault(layer.name[: -len("_quantize")], (layer.range_min, layer.range_max,
                                                                     layer.range_updates))
    for layer in layers.values():
        if isinstance(layer, Prunable) and layer.output_quant_spec is not None:
            targets.setdefault(layer.name, (layer.output_range_min, layer.output_range_max,
                                            layer.output_range_updates))
    for source, (lo, hi) in ranges.items():
        if source in targets:
            weights = targets[source]
            weights[0].assign(lo)
            weights[1].assign(hi)
            weights[2].assign(1)  # set: the next training batch moves it, not replaces it
    return qat


def from_tfmot(model_or_path, timeout=600):
    """Converts a tf_keras model pruned with tfmot into the equivalent tfopt model.

    Args:
        model_or_path: a tf_keras model (then this process has imported tfmot
            already) or the path of one saved by tf_keras (`.h5`, or a
            SavedModel directory).
        timeout: seconds the tfmot child process may take.

    Returns:
        A Keras 3 model whose pruned layers are tfopt twins holding tfmot's
        masks, `pruning_step` and schedule: same outputs, and `fit` goes on
        pruning where tfmot left off. Needs the `tfmot` extra
        (`pip install 'tfopt[tfmot]'`).

    A Sequential model quantized with tfmot (`quantize_model`) becomes
    `tfopt.quantize_model` of its float layers, with tfmot's input and
    per-layer output ranges: the same fake-quantized computation (tfmot's and
    tfopt's default int8 schemes agree: weights symmetric per channel for
    convolutions, per tensor for Dense; activations asymmetric per tensor).
    Functional models quantized with tfmot are refused with a message.
    """
    work = tempfile.mkdtemp(prefix="tfopt-from-tfmot-")
    if isinstance(model_or_path, (str, os.PathLike)):
        path = os.fspath(model_or_path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"from_tfmot: no such file or directory: {path}")
    else:
        if not hasattr(model_or_path, "save") or type(model_or_path).__module__.startswith("keras."):
            raise TypeError(
                "from_tfmot takes a tf_keras model (or its saved path). Received: "
                f"{type(model_or_path).__module__}.{type(model_or_path).__name__}; a Keras 3 model needs no "
                "conversion (use tfopt.prune or tfopt.quantize_model)."
            )
        path = os.path.join(work, "source.h5")
        model_or_path.save(path)
    try:
        result = subprocess.run([sys.executable, "-c", _WORKER, path, work], capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"from_tfmot: the tfmot process took more than {timeout} s.") from None
    if result.returncode == 3:
        layers = result.stdout.split("QUANTIZED ", 1)[1].strip()
        raise ValueError(
            f"from_tfmot: {path} is a Functional model quantized with tfmot (layers {layers}); tfopt converts "
            "tfmot-quantized Sequential models only. Convert the float model before tfmot's quantize_model, "
            "then use tfopt.quantize_model and fine-tune a few steps to set the ranges."
        )
    if result.returncode != 0:
        if "No module named 'tensorflow_model_optimization'" in result.stderr:
            raise ImportError("from_tfmot needs tfmot: pip install 'tfopt[tfmot]'")
        raise RuntimeError(f"from_tfmot: the tfmot process failed:\n{result.stderr[-3000:]}")
    with open(os.path.join(work, "info.json")) as f:
        info = json.load(f)
    model = keras.models.load_model(os.path.join(work, "model.h5"), compile=False)
    with np.load(os.path.join(work, "masks.npz")) as f:
        masks = {k.replace("|", "/"): f[k] for k in f.files}
    if "quantized" in info:
        return _quantized(model, info["quantized"])
    if not info:
        return model
    groups = []  # (schedule, [layer names]): one tfopt.prune per distinct schedule
    for name, entry in info.items():
        schedule = _schedule(entry["schedule"])
        for known, names in groups:
            if known == schedule:
                names.append(name)
                break
        else:
            groups.append((schedule, [name]))
    converted = model
    for schedule, names in groups:
        converted = prune(converted, schedule, layers=names)
    for name, entry in info.items():
        layer = converted.get_layer(name)
        for key in entry["weights"]:
            attr = key.split("/")[-1]
            getattr(layer, f"{attr}_mask").assign(masks[key].astype(keras.backend.standardize_dtype(
                getattr(layer, f"{attr}_mask").dtype)))
        layer.pruning_step.assign(entry["step"])
    return converted
