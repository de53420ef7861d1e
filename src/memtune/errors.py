"""The one exception type users see: a bad value, named, with what would be accepted."""


class MemtuneError(ValueError):
    """A user-facing error. The CLI prints its message on one line and exits non-zero."""
