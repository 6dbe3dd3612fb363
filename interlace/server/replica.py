"""A copy of the hosted model that runs batches for a front in another process (a Ray Serve replica,
`cluster.py`; a worker process, `worker.py`). The requests the front admitted go in as they are
(`crossing`: pickled by the pipe or by Ray, both ours, and not checked again), and come out as plain
data, one answer per request (`encode_answer`: result bytes, logs and missing values, or an
error's status and body, raised again as its own class by `decode_answer`) and, for streamed jobs,
a `step` event per generation step, already in the wire format. A job answered before its batch ends (a
generation that ends before the others of its batch) is sent then, as an `answer` message; the batch's
reply then holds `ANSWERED` in its place."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading

import httpx

from .. import collector
from ..backends.limits import Limits
from ..backends.remote import _error
from ..graph import Request
from .errors import error_body, status_of
from .hosting import HostedModel, carries_functions, load_model

log = logging.getLogger("interlace.server")

ANSWERED = ("answered",)  # in a batch's reply: this job's answer went out before it (its `answer` message)


class ModelReplica:
    """One copy of the model with its weights; runs one batch of jobs at a time."""

    def __init__(self, source: str, *, name: str, kind: dict, limits: dict, trusted: bool, check_weights: bool,
                 device_map: str | None = None):
        options = {"device_map": device_map} if device_map else {}
        self.hosted = HostedModel(load_model(source, **kind, **options), name=name,
                                  limits=Limits(**limits), trusted=trusted, check_weights=check_weights)

    def identity(self) -> dict:
        """Which replica this is: Ray's replica id when it is one, its process and node, its weight checks,
        and the weights a job changed past the write check (`broken`: it must be replaced)."""
        serve = sys.modules.get("ray.serve")  # loaded in a Ray Serve replica; not imported just to ask
        try:
            ids = serve.get_replica_context().replica_id
            replica, actor = ids.unique_id, ids.to_full_id_str()
        except Exception:  # noqa: BLE001 - not in Ray Serve: the process is the replica
            replica, actor = f"pid{os.getpid()}", None
        return {"replica": replica, "actor": actor, "pid": os.getpid(), "node": socket.gethostname(),
                "checked": self.hosted.checked, "changes": list(self.hosted.changes), "broken": list(self.hosted.broken)}

    def answer(self, requests: list[Request | bytes], limits: dict, streamed: list[bool] | None = None, send=None,
               cancels: list[threading.Event] | None = None, groups: list | None = None) -> dict:
        """Run one batch: `requests` are those the front admitted (`crossing`), `limits`
        (`Limits` as a dict) are the batch's, `groups` the model's group of each, as the front found it
        (`Model.batching`; None: found here). `cancels` (one per request), when set, stop a request at its
        next operation. `send(kind, number, payload)` (where given) gets ("step", its number, the event) and ("answer",
        its number, its `encode_answer`) as they come. Returns this replica's identity and per request one
        `encode_answer`, or `ANSWERED` where that went out already."""
        streamed = streamed or [False] * len(requests)
        cancels = cancels or [threading.Event() for _ in requests]
        requests = [self.hosted.admit(request) if isinstance(request, bytes) else request for request in requests]
        sends = [(lambda event, number=number: send("step", number, event)) if streamed[number] else None
                 for number in range(len(requests))]
        sent = set()

        def answered(number: int, answer) -> None:
            sent.add(number)
            send("answer", number, encode_answer(answer))

        early = [(lambda answer, number=number: answered(number, answer)) if send else None
                 for number in range(len(requests))]
        # the collector pauses for the batch (see collector): this process runs batches and nothing else,
        # where a front that runs its own (--in-process) answers HTTP meanwhile, whose cycles must not wait
        with collector.paused():
            answers = self.hosted.execute_many(requests, limits=Limits(**limits), cancels=cancels, groups=groups,
                                               on_steps=sends, on_answers=early)
        return {"replica": self.identity(),
                "answers": [ANSWERED if number in sent else encode_answer(answer) for number, answer in enumerate(answers)]}


def crossing(job) -> Request | bytes:
    """What goes to a replica for a job: the request the front admitted; where it names Python functions
    (a --trusted server's), which pickle cannot carry by name, its bytes, which carry them by value and
    are read again there."""
    return job.data if carries_functions(job.data) else job.request


def encode_answer(answer) -> tuple:
    """A job's answer as plain data: ("completed", result bytes, logs, missing) or ("error", status, body)."""
    if isinstance(answer, Exception):
        if status_of(answer) == 500:
            log.error("a job failed unexpectedly", exc_info=answer)
        return "error", status_of(answer), error_body(answer)
    result, logs, missing = answer
    return "completed", result, [(index, [str(value) for value in values]) for index, values in logs], missing


def decode_answer(answer: tuple):
    """What `encode_answer` encoded: (result bytes, logs, missing), or the error as its own class again."""
    if answer[0] == "completed":
        return tuple(answer[1:])
    if answer == ANSWERED:  # (its answer came before the batch's reply)
        return None
    _, status, body = answer
    # the client's own mapping from code to class; node and hint go in as they are, not into the message
    error = _error(httpx.Response(status, json={**body, "node": None, "hint": None}), quote=False)
    error.node = body.get("node")
    if body.get("hint") is not None:  # (an error's own hint: error_body gives it again in the front)
        error.hint = body["hint"]
    return error
