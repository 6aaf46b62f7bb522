"""Recognising Keras 2 (tf_keras) and tfmot objects, to refuse them clearly."""

import keras

_KERAS2_MODULES = (
    "tf_keras",
    "tensorflow_model_optimization",
    "tensorflow.python.keras",
    "keras.src.engine",
    "keras.engine",
)


def reject_keras2(obj, arg):
    """Raises TypeError naming `arg` if `obj` comes from tf_keras (Keras 2) or tfmot."""
    module = type(obj).__module__ or ""
    if module.startswith(_KERAS2_MODULES):
        raise TypeError(
            f"`{arg}` is a {module}.{type(obj).__name__}, a tfmot / tf_keras (Keras 2) object. "
            f"tfopt needs Keras 3 objects (keras>=3.11, `import keras`; installed: "
            f"{keras.__version__}): build the model with `keras`, not `tf_keras` or `tf.keras` "
            "under TF_USE_LEGACY_KERAS=1, and use the `tfopt.schedules` classes of the same name."
        )
