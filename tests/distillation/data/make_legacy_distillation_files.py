"""Writes the distillation `.keras` files that `test_legacy_files.py` beside it loads.

Run once, with the tfopt of the time (these were written by the single-module
`tfopt/distillation.py`, before it became a package); never regenerate them.
"""

import os

import keras
import numpy as np

from tfopt import distillation as D

HERE = os.path.dirname(os.path.abspath(__file__))


def _mlp(width, name):
    inp = keras.Input((8,))
    x = keras.layers.Dense(width, activation="relu", name=f"{name}_hidden")(inp)
    return keras.Model(inp, keras.layers.Dense(4, name=f"{name}_logits")(x), name=name)


def main():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, 8)).astype("float32"), rng.integers(0, 4, 32)
    teacher = _mlp(16, "teacher")
    teacher.trainable = False
    distiller = D.Distiller(teacher, _mlp(8, "student"), temperature=2.0, alpha=0.3,
                            losses=[D.FeatureHint("teacher_hidden", "student_hidden", weight=0.1)])
    distiller.compile("adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    distiller.fit(x, y, batch_size=16, verbose=0)
    distiller.save(os.path.join(HERE, "legacy_distiller.keras"))
    x_fit, y_fit = D.attach_teacher((x, y), teacher)
    student = _mlp(8, "cached_student")
    student.compile("adam", D.DistillationLoss(temperature=3.0, alpha=0.2, method="mse"),
                    metrics=[D.LabelAccuracy()])
    student.fit(x_fit, y_fit, batch_size=16, verbose=0)
    student.save(os.path.join(HERE, "legacy_cached_student.keras"))
    np.savez(os.path.join(HERE, "legacy_distillation.npz"), x=x, y=y, y_fit=y_fit,
             distiller_student=distiller.student.predict(x, verbose=0),
             distiller_loss=float(distiller.compute_loss(x, y, distiller.student(x), training=False)),
             cached_student=student.predict(x, verbose=0),
             cached_evaluate=np.asarray(student.evaluate(x_fit, y_fit, verbose=0)))


if __name__ == "__main__":
    main()
