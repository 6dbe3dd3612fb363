"""The one place that maps errors to HTTP: status codes and the JSON body `{code, message, node, hint}`.

`code` is the error's class name, which the client turns back into the same class; `node` is the
graph node at fault (index, op, target, location as sent); `hint` says what to do.
"""

from __future__ import annotations

from .. import errors

# most specific first
_STATUS = [
    (errors.VersionError, 409, "use the same interlace version on the client and the server"),
    (errors.SerializationError, 400, "send bytes made by interlace's serialize_request"),
    (errors.GraphError, 422, "fix the node named: an op, module path or argument this model does not have"),
    (errors.RefusedError, 422, "the server runs allowed operations only and never changes the model's weights"),
    (errors.DeadlineError, 504, "make the job smaller or split it; the server's time limit is its --max-seconds"),
    (errors.LimitError, 413, "make the request smaller; the server's limits are its --max-* flags"),
    (errors.CancelledError, 409, "the job was cancelled; submit it again to run it"),
    (errors.ExecutionError, 422, "fix the line named: it failed when it ran on the model"),
    (errors.OutOfOrderError, 422, "read modules in the order the model runs them"),
    (errors.ModelError, 422, "the model itself failed on these inputs"),
    (errors.InterlaceError, 400, ""),
]


class HTTPProblem(Exception):
    """An error the server answers with `status` and a JSON body (auth, unknown job, rate, ...)."""

    def __init__(self, status: int, code: str, message: str, hint: str = "", node=None):
        super().__init__(message)
        self.status, self.code, self.message, self.hint, self.node = status, code, message, hint, node

    def body(self) -> dict:
        return {"code": self.code, "message": self.message, "node": self.node, "hint": self.hint}


def problem(error: Exception) -> HTTPProblem:
    """The HTTP answer for an error raised while checking or running a job."""
    if isinstance(error, HTTPProblem):
        return error
    for kind, status, hint in _STATUS:
        if isinstance(error, kind):
            return HTTPProblem(status, type(error).__name__, str(error), hint, getattr(error, "node", None))
    return HTTPProblem(500, "InternalError", f"{type(error).__name__}: {error}", "this is a bug in the server")
