"""The exceptions interlace raises.

Every message says what happened, where (the user's file and line, the module path and call it was
waiting for) and how to fix it. All of them subclass `InterlaceError`, so `except InterlaceError`
catches everything the library raises on purpose. An error about one graph node carries it as
`error.node`: `{"index", "op", "target", "location"}`, plain data a server can send back.
"""

from __future__ import annotations

import difflib
import linecache
import re


def describe_location(location, *, read_source: bool = True) -> str:
    """`file.py:12: <source line>` for a recorded (filename, lineno), or '' when unknown.

    read_source=False quotes the location as recorded and never opens the file: a location in a
    graph from someone else is just text.
    """
    if not location:
        return ""
    filename, lineno = location
    source = linecache.getline(filename, lineno).strip() if read_source else ""
    return f"{filename}:{lineno}" + (f": {source}" if source else "")


# words first, then each word whole: one pattern tried from every position of a long run of path
# characters (in a message from a server) would take quadratic time
_WORD = re.compile(r"[^\s()]+")
_LOCATION = re.compile(r"(.+\.py):(\d{1,9})([.,]?)")
_MOST_QUOTED = 20  # distinct lines quoted in one message (an error names a handful)


def quote_sources(message: str) -> str:
    """`message` with each `file.py:12` it names followed by that line's text: for a message made where
    the user's files were not read (a server, or a check that also runs there), shown where they are."""
    lines: dict = {}  # (file, line) -> its quote: each read once, and only the first few (a message from a
    # server may name any number of files, and each file not found is looked up again)

    def quoted(word):
        location = _LOCATION.fullmatch(word[0])
        if location is None:
            return word[0]
        key = (location[1], int(location[2]))
        if key not in lines:
            if len(lines) == _MOST_QUOTED:
                return word[0]
            lines[key] = describe_location(key)
        return lines[key] + location[3]

    return _WORD.sub(quoted, message)


def did_you_mean(name: str, names) -> str:
    """'; did you mean 'a', 'b'?' with the names of `names` closest to a misspelt `name`, or ''."""
    close = difflib.get_close_matches(name, sorted(names), n=3)
    return f"; did you mean {', '.join(map(repr, close))}?" if close else ""


def node_info(node) -> dict:
    """The plain-data description of a graph node that errors carry."""
    target = node.target if node.target is None or isinstance(node.target, str) else repr(node.target)
    location = list(node.location) if node.location else None
    return {"index": node.index, "op": node.op, "target": target, "location": location}


class InterlaceError(Exception):
    """Base class of every error interlace raises on purpose."""

    node: dict | None = None  # the graph node at fault, when there is one (see node_info)

    def at(self, node) -> "InterlaceError":
        """This error, marked as raised by graph node `node`."""
        self.node = node_info(node)
        return self


class ProxyValueError(InterlaceError, TypeError):
    """A proxy was used where Python needs its real value now (bool, int, len, iteration)."""


class ModulePathError(InterlaceError, AttributeError):
    """A module path or attribute that the wrapped model does not have."""


class SourceError(InterlaceError):
    """A module's forward (or a function it calls) cannot be rewritten into `.source` points."""


class OutOfOrderError(InterlaceError):
    """An intervention needs a value the model computes only after the place it changes."""


class ExecutionError(InterlaceError):
    """A recorded operation failed while the graph ran; `__cause__` holds the original error."""


class ModelError(InterlaceError):
    """The wrapped model itself raised while running under a trace."""


class NotSavedError(InterlaceError, ValueError):
    """A value from a trace is not available: it was not saved, or the run never computed it."""


class SerializationError(InterlaceError, ValueError):
    """Bytes that are not a valid interlace graph or result, or a graph that cannot be sent."""


class VersionError(SerializationError):
    """Data in a wire format version this interlace does not read; the message names both versions."""


class ServiceError(InterlaceError):
    """A server refused a request for a reason of its own: the key, the job id, the rate, the queue.

    `status` is the HTTP status and `code` a short name (`unauthorized`, `not_found`, `queue_full`, ...);
    `retry_after`, when the server gave one, the seconds to wait before sending again.
    """

    retry_after: int | None = None

    def __init__(self, message: str, *, status: int, code: str):
        super().__init__(message)
        self.status, self.code = status, code


class GraphError(InterlaceError, ValueError):
    """A graph whose structure is invalid: an unknown op or module path, a bad reference, arity."""


class RefusedError(InterlaceError):
    """An operation an untrusted run does not allow (a user function, a write to a weight, ...)."""


class WeightsChangedError(RefusedError):
    """A weight's version counter moved during an untrusted run: something wrote to it anyway.

    `changed` names the weights; they stay changed (nothing was kept to put back), so the model they
    belong to must be loaded again before it runs anything else.
    """

    def __init__(self, message: str, *, changed: list[str] | tuple = ()):
        super().__init__(message)
        self.changed = list(changed)


class LimitError(InterlaceError):
    """A request or a run went over one of its limits (bytes, nodes, elements, time)."""


class CancelledError(InterlaceError):
    """The run was cancelled while it was queued or running."""
