"""Exceptions raised by the library (no torch needed to import this module)."""


class AttentionMapError(ValueError):
    """Bad input or an unusable model: the message names the input and what was expected."""


class Cancelled(RuntimeError):
    """Raised between batches when the caller's cancel check returns True."""
