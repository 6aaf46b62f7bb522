"""`DistillationSchedule`: lets distillation losses whose temperature or alpha is a schedule read the step."""

import keras

from tfopt import strategies
from tfopt.callbacks import _common

__all__ = ["DistillationSchedule"]


def _reads_the_step(loss):
    """A loss that takes the training step with `bind_step(step)` (`tfopt.distillation.DistillationLoss`)."""
    return callable(getattr(loss, "bind_step", None)) and hasattr(loss, "step")


class DistillationSchedule(keras.callbacks.Callback):
    """Lets a `DistillationLoss` (or `Distiller`) whose `temperature` or `alpha`
    is a `keras.optimizers.schedules.LearningRateSchedule` read the step: the
    model's `optimizer.iterations`, in-graph (exact with
    `steps_per_execution > 1`).

    Use it in `fit(callbacks=[...])` of a model compiled with a
    `tfopt.distillation.DistillationLoss` whose `temperature` or `alpha` is a
    schedule (without it, the first training step raises a `ValueError`
    naming this callback). A `tfopt.distillation.Distiller` reads its own
    optimizer's step and needs no callback; given one, the callback does
    nothing. Also importable as `tfopt.distillation.DistillationSchedule`.

    Example:
    >>> import keras, tfopt
    >>> temperature = keras.optimizers.schedules.PolynomialDecay(4.0, 1000, 1.0)
    >>> loss = tfopt.distillation.DistillationLoss(temperature=temperature)
    >>> callback = tfopt.callbacks.DistillationSchedule()  # for fit(callbacks=[...])
    """

    def on_train_begin(self, logs=None):
        strategies.check(self.model)
        if getattr(type(self.model), "reads_optimizer_step", False):
            return  # a Distiller: reads its optimizer's step itself
        losses = [loss for loss in keras.tree.flatten(getattr(self.model, "loss", None) or [])
                  if _reads_the_step(loss)]
        if not losses:
            raise ValueError(
                "DistillationSchedule: the model is not compiled with a `DistillationLoss` "
                "(and is not a `Distiller`), so there is no schedule to drive. Received: model "
                f"'{self.model.name}' compiled with loss={getattr(self.model, 'loss', None)!r}. Fix: compile "
                "with `tfopt.distillation.DistillationLoss(...)`, or drop this callback."
            )
        step = self.model.optimizer.iterations
        if any(loss.step is not step for loss in losses):
            for loss in losses:
                loss.bind_step(step)
            _common.retrace(self.model)  # the losses now read the step: a new graph
