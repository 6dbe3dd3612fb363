"""The exceptions interlace raises.

Every message says what happened, where (the user's file and line, the module path and call it was
waiting for) and how to fix it. All of them subclass `InterlaceError`, so `except InterlaceError`
catches everything the library raises on purpose.
"""

from __future__ import annotations

import linecache


def describe_location(location) -> str:
    """`file.py:12: <source line>` for a recorded (filename, lineno), or '' when unknown."""
    if not location:
        return ""
    filename, lineno = location
    source = linecache.getline(filename, lineno).strip()
    return f"{filename}:{lineno}" + (f": {source}" if source else "")


class InterlaceError(Exception):
    """Base class of every error interlace raises on purpose."""


class ProxyValueError(InterlaceError, TypeError):
    """A proxy was used where Python needs its real value now (bool, int, len, iteration)."""


class ModulePathError(InterlaceError, AttributeError):
    """A module path or attribute that the wrapped model does not have."""


class OutOfOrderError(InterlaceError):
    """An intervention needs a value the model computes only after the place it changes."""


class ExecutionError(InterlaceError):
    """A recorded operation failed while the graph ran; `__cause__` holds the original error."""


class ModelError(InterlaceError):
    """The wrapped model itself raised while running under a trace."""


class NotSavedError(InterlaceError):
    """A value from a trace was used after the trace without having been saved."""


class SerializationError(InterlaceError, ValueError):
    """Bytes that are not a valid interlace graph or result, or a graph that cannot be sent."""
