"""The one exception type users see: a bad value, named, with what would be accepted; and the
type checks the config classes share."""


class MemtuneError(ValueError):
    """A user-facing error. The CLI prints its message on one line and exits non-zero."""


def is_int(value) -> bool:
    """An int that is not a bool (YAML `true` and Python `True` are ints to isinstance)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or a float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
