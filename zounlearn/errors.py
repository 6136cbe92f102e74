"""The errors zounlearn raises for bad input or an environment that cannot run what was asked.

Everything here derives from ZounlearnError, so the command line turns exactly these into
one-line messages (exit status 2) and lets any other exception keep its traceback (a bug).
Each also derives from the builtin a library caller would expect (ValueError, RuntimeError).
"""

from __future__ import annotations


class ZounlearnError(Exception):
    """Base of zounlearn's own errors: the message says what is wrong and how to fix it."""


class UsageError(ZounlearnError, ValueError):
    """A bad argument, option or configuration value."""


class BackendUnavailable(ZounlearnError, RuntimeError):
    """A kernel backend was asked for that cannot run here; the message says why."""


__all__ = ["BackendUnavailable", "UsageError", "ZounlearnError"]
