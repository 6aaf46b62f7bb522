"""Feature losses for online distillation: `FeatureHint` (FitNets) and `AttentionTransfer`.

Each compares a teacher layer's output with a student layer's; `Distiller`
reaches those layers and adds `weight * loss` to its total.
"""

import math

import keras
from keras import ops

from tfopt._arguments import Configurable
from tfopt.distillation.losses import _is_number


class _FeatureLoss(Configurable):
    def __init__(self, teacher_layer, student_layer, weight=1.0):
        for name, value in (("teacher_layer", teacher_layer), ("student_layer", student_layer)):
            if not isinstance(value, str):
                raise ValueError(f"{type(self).__name__}: `{name}` must be a layer name. Received: {value!r}")
        if not _is_number(weight) or not math.isfinite(weight) or weight < 0:
            raise ValueError(
                f"{type(self).__name__}: `weight` must be a finite number >= 0. Received: weight={weight!r}. "
                "Fix: pass e.g. weight=1.0 (0 turns this loss off).")
        self.teacher_layer = teacher_layer
        self.student_layer = student_layer
        self.weight = float(weight)

    def get_config(self):
        return {"teacher_layer": self.teacher_layer, "student_layer": self.student_layer, "weight": self.weight}

    def make_projection(self, teacher_shape, student_shape):
        return None


@keras.saving.register_keras_serializable(package="tfopt")
class FeatureHint(_FeatureLoss):
    """FitNets hint loss (Romero et al., 2015): mean squared difference between
    a teacher layer's output and a student layer's, through a learned linear
    projection (a Dense on the channel axis) when their widths differ. Other
    dimensions (e.g. spatial size) must match.

    Example:
    >>> FeatureHint("teacher_block_3", "student_block_2").get_config()["weight"]
    1.0
    """

    def make_projection(self, teacher_shape, student_shape):
        if tuple(teacher_shape[1:-1]) != tuple(student_shape[1:-1]):
            raise ValueError(
                f"FeatureHint: teacher layer '{self.teacher_layer}' outputs {tuple(teacher_shape)} and "
                f"student layer '{self.student_layer}' {tuple(student_shape)}; all but the last "
                "(channel) dimension must match. Pick layers at the same resolution."
            )
        if teacher_shape[-1] == student_shape[-1]:
            return None
        return keras.layers.Dense(teacher_shape[-1], use_bias=False, name=f"hint_{self.student_layer.replace('/', '_')}")

    def __call__(self, teacher, student):
        return ops.mean(ops.square(ops.cast(teacher, "float32") - ops.cast(student, "float32")))


@keras.saving.register_keras_serializable(package="tfopt")
class AttentionTransfer(_FeatureLoss):
    """Attention transfer (Zagoruyko & Komodakis, 2017) between conv feature
    maps: each map's spatial attention `mean_c |F|**p`, L2-normalized, and the
    mean squared distance between teacher's and student's. Channel counts may
    differ; spatial sizes must match.

    Example:
    >>> AttentionTransfer("t_conv", "s_conv", p=2).get_config()["p"]
    2
    """

    def __init__(self, teacher_layer, student_layer, weight=1.0, p=2):
        super().__init__(teacher_layer, student_layer, weight)
        if not _is_number(p) or not math.isfinite(p) or p <= 0:
            raise ValueError(f"AttentionTransfer: `p` must be a finite number > 0 (2 is usual). Received: p={p!r}")
        self.p = int(p) if float(p).is_integer() else float(p)

    def get_config(self):
        return {**super().get_config(), "p": self.p}

    def make_projection(self, teacher_shape, student_shape):
        if len(teacher_shape) < 3 or tuple(teacher_shape[1:-1]) != tuple(student_shape[1:-1]):
            raise ValueError(
                f"AttentionTransfer: needs conv feature maps of the same spatial size; teacher layer "
                f"'{self.teacher_layer}' outputs {tuple(teacher_shape)}, student layer "
                f"'{self.student_layer}' {tuple(student_shape)}."
            )
        return None

    def _attention(self, f):
        f = ops.cast(f, "float32")
        a = ops.mean(ops.abs(f) ** self.p, axis=-1)
        a = ops.reshape(a, (ops.shape(a)[0], -1))
        return a / ops.maximum(ops.sqrt(ops.sum(ops.square(a), axis=-1, keepdims=True)), 1e-12)

    def __call__(self, teacher, student):
        return ops.mean(ops.square(self._attention(teacher) - self._attention(student)))
