"""The one exception family of `common`."""


class CommonError(Exception):
    """Base of every error the platform layer raises."""


class LockHeldError(CommonError):
    """Another process (or another lock object of this one) holds the lock."""


class DurationError(CommonError, ValueError):
    """A duration that does not parse."""
