"""`Configurable`: the flat-config base of schedules and structures."""


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
