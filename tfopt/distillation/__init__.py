"""Teacher-student distillation in a plain `model.fit`.

Two ways, one loss:

- **Cached (offline)**: `attach_teacher(data, teacher)` runs the teacher once
  and returns data whose targets carry its outputs; `student.compile(
  loss=DistillationLoss(...))` and `student.fit` as usual. No wrapper model,
  and the teacher's cost is paid once instead of every epoch. Inputs without
  labels (a transfer set) are welcome: the teacher labels them.
- **Online**: `Distiller(teacher, student, ...)` is a Keras model that runs the
  teacher on every batch. Use it when the inputs change every epoch (random
  augmentation makes cached outputs stale), or for feature losses
  (`FeatureHint`, `AttentionTransfer`) that need intermediate activations.

Both compute `alpha * label_loss + (1 - alpha) * distillation_loss` per
sample with the same code, so the same batch gives the same loss either way.

Packed targets: `attach_teacher` stores, per sample, a `(2, classes)` array:
row 0 the label, one-hot (integer labels are converted; all zeros: no label,
as for label -1), row 1 the teacher's logits (probabilities are converted
with `log`, see below). Targets of shape `(n, 2, classes)` cannot be mistaken
for plain labels, which have shape `(n,)`, `(n, 1)` or `(n, classes)`:
`DistillationLoss` accepts those too, so `student.evaluate(x_test, y_test)`
works on ordinary test data, and it refuses packed targets whose teacher
width differs from the student's number of classes, and plain labels in
`fit` (no teacher: no distillation). Keras's `"accuracy"` metric does not
know the packing: use `LabelAccuracy()` (compiling "accuracy" with packed
targets is a `ValueError` at the first step).

Sequence models: a teacher with `(batch, seq, vocab)` outputs is packed per
position, `(n, seq, 2, k + 1)` with `attach_teacher(..., top_k=k)` (only its
top-k logits are kept), and `DistillationLoss` and `Distiller` compute the
loss per position, averaged over the positions that count.

Teacher outputs are used as logits. A teacher that outputs probabilities (a
final softmax) is detected (rows non-negative and summing to 1, or a final
softmax activation) and its outputs converted with `log`, which gives the
same softened distribution `softmax(log(p) / T)` as its logits would; a
`UserWarning` says so unless `teacher_outputs="probabilities"` is passed.
A student that ends in softmax is read as probabilities too (`log(p)` as its
logits in the distillation term): detected from its graph.

The package has one job per module: `losses` (argument checks, `kd_loss`,
`logit_mse`, `DistillationLoss`, `LabelAccuracy`), `teacher`
(`attach_teacher` and the packing of its targets), `features`
(`FeatureHint`, `AttentionTransfer`), `sequence` (language models:
per-position KL or reverse KL over `(batch, seq, vocab)` logits, masked by
the padding mask and `sample_weight`, and the top-k packing of cached
teacher logits) and `distiller` (`Distiller`);
`DistillationSchedule` lives with the other callbacks
(`tfopt.callbacks.DistillationSchedule`) and is importable from here too.
"""

from tfopt.callbacks.distillation import DistillationSchedule
from tfopt.distillation.distiller import Distiller
from tfopt.distillation.features import AttentionTransfer, FeatureHint
from tfopt.distillation.losses import (DEFAULT_ALPHA, DEFAULT_TEMPERATURE, DistillationLoss, LabelAccuracy,
                                       distillation_per_sample, kd_loss, logit_mse)
from tfopt.distillation.teacher import attach_teacher

__all__ = [
    "DistillationLoss",
    "Distiller",
    "attach_teacher",
    "FeatureHint",
    "AttentionTransfer",
    "LabelAccuracy",
    "DistillationSchedule",
    "kd_loss",
    "logit_mse",
    "DEFAULT_TEMPERATURE",
    "DEFAULT_ALPHA",
]
