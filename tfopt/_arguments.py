"""Constructor arguments: `Configurable` (the flat-config base of schedules, structures and
quantizer specs) and `python_number` (numpy scalars taken as numbers, as Keras takes them)."""


class Configurable:
    """An object whose `get_config()` is exactly its constructor's arguments.

    Gives `from_config` (just `cls(**config)`), equality by type and config,
    and a repr that reads like the constructor call.
    """

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self), repr(self)))

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def python_number(value):
    """`value` as a Python number when it is a numpy scalar (`np.float32(0.5)`,
    `np.int64(100)`), so that tfopt takes numpy scalars wherever it takes
    numbers, as Keras does; anything else unchanged (bools stay bools).

    Example:
    >>> import numpy as np
    >>> python_number(np.int32(4)), python_number(np.float32(0.5)), python_number("50%")
    (4, 0.5, '50%')
    """
    if hasattr(value, "dtype") and getattr(value, "shape", None) == () and hasattr(value, "item"):
        return value.item()
    return value
