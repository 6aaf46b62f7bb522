"""`from_tfmot`: a tf_keras model pruned with tfmot, as the equivalent tfopt Keras 3 model.

tfmot and tf_keras run in a child process (importing tfmot switches the whole
process to Keras 2, see DESIGN.md): it loads the model, records each
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

import numpy as np

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
    print("QUANTIZED " + json.dumps(quantized))
    sys.exit(3)
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
    from tfopt import schedules

    name, args = config["class_name"], dict(config["config"])
    if name == "ConstantSparsity":
        return schedules.ConstantSparsity(**args)
    if name == "PolynomialDecay":
        return schedules.PolynomialDecay(**args)
    raise ValueError(f"from_tfmot: the tfmot schedule {name} has no tfopt equivalent (ConstantSparsity, "
                     "PolynomialDecay).")


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

    Models quantized with tfmot are refused with a message: quantize the
    converted float model with `tfopt.quantize_model` and fine-tune a few
    steps to set its ranges (tfmot's range variables do not map one to one
    onto tfopt's, whose BatchNorm folding differs).
    """
    import keras

    import tfopt

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
            f"from_tfmot: {path} is quantized with tfmot (layers {layers}). tfopt converts pruned models. "
            "Convert the float model before tfmot's quantize_model, then use tfopt.quantize_model and "
            "fine-tune a few steps to set the ranges."
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
        converted = tfopt.prune(converted, schedule, layers=names)
    for name, entry in info.items():
        layer = converted.get_layer(name)
        for key in entry["weights"]:
            attr = key.split("/")[-1]
            getattr(layer, f"{attr}_mask").assign(masks[key].astype(keras.backend.standardize_dtype(
                getattr(layer, f"{attr}_mask").dtype)))
        layer.pruning_step.assign(entry["step"])
    return converted
