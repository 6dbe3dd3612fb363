"""The model in a worker process of its own (`interlace serve`'s default; `--in-process` keeps it in the
server's process), so that the HTTP front keeps answering whatever a job does, and a job past its
deadline is stopped even inside one long operation.

The executor checks a job's deadline and cancel flag only between operations: one large matrix product
runs to its end. So the model runs in a child process (multiprocessing, `spawn`) holding a
`ModelReplica` (`replica.py`), and the front (its model built without weights, enough to check requests
and give the manifest) hands it each batch over a pipe as the requests it admitted (not checked again
there), as the Ray deployment does (`cluster.py`). `ProcessRunner` is the front's runner of one such child (a worker
thread of `create_app` calls it): it relays the child's `step` events to the jobs as they come,
forwards cancels (a thread of the child sets the batch's cancel events), and once the batch is past its
deadline by `GRACE` seconds (the executor normally stops it at its next operation, well before), or all
its jobs were cancelled `CANCEL_GRACE` seconds ago, it kills the child, fails the batch (504 for the deadline) and
starts a new one; the next batch waits for it in the queue. A child that dies by itself (killed for
memory, say) fails its batch with 503 and is started again too, and so is one whose reply says a job
changed its weights past the write check (`HostedModel.broken`): the failing job gets its error, and the
next batch runs on weights loaded afresh.

The child runs at a lower priority (`os.nice`), so that the front gets the CPU it needs to answer
`/v1/health` within milliseconds. It keeps torch's thread count: fewer threads would change the order
of float sums in a product, and a result would no longer equal a local run bit for bit. It ignores
Ctrl-C (the front decides) and ends when its pipe closes: it never outlives the server.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time

import torch

from .. import collector
from ..errors import CancelledError, LimitError, ServiceError
from .jobs import model_groups
from .replica import ModelReplica, crossing, decode_answer

log = logging.getLogger("interlace.server")

GRACE = 0.5  # seconds past a batch's deadline before its child is killed
CANCEL_GRACE = 2.0  # after its jobs' cancel: longer, as a restart (loading the model) delays the next jobs
CHECK = 0.02  # seconds between looks at the jobs' cancel flags and the deadline while the child runs
NICE = 5  # the child's lower priority: the front answers first when both want the CPU


class ProcessRunner:
    """Runs batches of `hosted`'s jobs in a child process that holds the model with its weights.
    `hosted` is the front's model (without weights); with `check_weights` the child's checks are copied
    onto it, so `/v1/health` reports them. `options`: `ModelReplica`'s (name, kind, limits, trusted)."""

    def __init__(self, hosted, source: str, *, check_weights: bool = False, **options):
        self.hosted, self.source, self.check_weights = hosted, source, check_weights
        self.options = {**options, "check_weights": check_weights}
        self.process = None
        self.connection = None  # batches go, steps and answers come back
        self.cancels = None  # cancels go: read by a thread of the child while its main thread runs the batch
        self.batches = 0  # batches sent to the child: a cancel names its batch
        self.ready = False
        self._checked, self._changes = 0, []  # the checks of the children before this one

    # -- the child's life ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start a child; `wait_ready` waits until its model is loaded."""
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or locks of the front
        connection, theirs = context.Pipe()
        cancels, their_cancels = context.Pipe(duplex=False)
        level = logging.getLogger().getEffectiveLevel()  # the server's --log-level, for the child's own log
        self.process = context.Process(target=_child, args=(theirs, cancels, self.source, self.options, level),
                                       name="interlace-model", daemon=True)
        self.process.start()
        theirs.close()  # only the child holds its ends: its death shows here as end of file
        cancels.close()
        self.connection, self.cancels, self.ready = connection, their_cancels, False

    def wait_ready(self) -> None:
        """Wait for the child's model; raises ServiceError (503) if the child died while loading it."""
        try:
            kind, identity, checksum = self.connection.recv()
        except (EOFError, OSError):
            self.process.join()
            raise ServiceError(f"the model's worker process exited with {self.process.exitcode} while loading the "
                               "model (see the server's log); submit the job again", status=503,
                               code="worker_failed") from None
        assert kind == "ready", kind
        self.ready = True
        if self.check_weights:
            self.hosted.checksum = checksum
            self._copy_checks(identity)

    def restart(self, reason: str) -> None:
        """Kill the child (whatever it runs) and start another; `reason` is counted (`/v1/health`, `/metrics`)."""
        if self.process is not None:
            self.hosted.worker_restarts[reason] += 1
            self._checked, self._changes = self.hosted.checked, list(self.hosted.changes)
            self.process.kill()
            self.process.join()
            self.connection.close()
            self.cancels.close()
        self.start()

    def close(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.kill()
            self.process.join()

    def _copy_checks(self, identity: dict) -> None:
        self.hosted.checked = self._checked + identity["checked"]
        self.hosted.changes = self._changes + identity["changes"]

    # -- one batch (a worker thread of the app) ---------------------------------------------------------
    def __call__(self, jobs: list, started, finish) -> list:
        """Per job (result bytes, logs, missing) or its error, run in the child; `started()` once it has the
        batch, `finish(number, answer)` for a job answered before the batch ends (see `Worker`)."""
        if not self.ready:
            try:
                self.wait_ready()
            except ServiceError as error:
                self.restart("load_failed")  # tried again with the next batch
                return [error] * len(jobs)
        limits = jobs[0].limits  # a batch shares its limits (they are part of its group)
        try:
            reply = self._run(jobs, limits, started, finish)
        except (EOFError, OSError):  # the child died by itself (killed for memory, say), also between batches
            self.process.join()
            code = self.process.exitcode
            log.warning("the model's worker process died (exit code %s) while running %d job(s); restarting it",
                        code, len(jobs))
            self.restart("died")
            return [ServiceError(f"the model's worker process died (exit code {code}) while running this job, and "
                                 "was restarted; submit the job again", status=503, code="worker_failed")] * len(jobs)
        if isinstance(reply, Exception):  # killed by us: past its deadline or cancelled, inside one operation
            self.restart("deadline" if isinstance(reply, LimitError) else "cancelled")
            return [reply] * len(jobs)
        if self.check_weights:
            self._copy_checks(reply["replica"])
        broken = reply["replica"]["broken"]
        if broken:
            log.error("a job changed weight(s) %s of the model in its worker process past the write check; "
                      "restarting the worker to load the model again", ", ".join(broken[:5]))
            self.hosted.reloads.append(f"weight(s) {', '.join(broken[:5])} changed by a job: worker restarted")
            self.restart("weights_changed")
        cancelled = CancelledError("the job was cancelled while running")
        return [cancelled if job.cancel.is_set() else decode_answer(answer)
                for job, answer in zip(jobs, reply["answers"])]

    def _run(self, jobs: list, limits, started, finish) -> dict | Exception:
        """Send the batch to the child and wait for its reply, relaying its steps and the jobs' cancels;
        the error of the whole batch where the child has to be killed for it."""
        self.batches += 1
        batch = ("run", self.batches, [crossing(job) for job in jobs], dataclasses.asdict(limits),
                 [job.stream for job in jobs], model_groups(jobs))
        self.connection.send_bytes(_pickled(batch))
        started()
        deadline = time.monotonic() + limits.max_seconds + GRACE
        forwarded: set[int] = set()
        all_cancelled = None  # when every job of the batch was seen cancelled
        while True:
            for number, job in enumerate(jobs):
                if job.cancel.is_set() and number not in forwarded:
                    self.cancels.send((self.batches, number))  # stops it at its next operation
                    forwarded.add(number)
            now = time.monotonic()
            if len(forwarded) == len(jobs):
                all_cancelled = all_cancelled or now
                if now > all_cancelled + CANCEL_GRACE:  # inside one long operation: the next job need not wait for it
                    log.warning("a cancelled batch of %d job(s) ran on inside one operation: worker restarted",
                                len(jobs))
                    return CancelledError("the job was cancelled while running")
            if now > deadline:
                log.warning("a batch of %d job(s) ran past its deadline inside one operation: worker restarted",
                            len(jobs))
                return LimitError(f"the job ran past its deadline of {limits.max_seconds:g} s (max_seconds) inside "
                                  "one operation, where it cannot be stopped: the model's worker process was killed "
                                  "and restarted")
            if not self.connection.poll(min(CHECK, max(deadline - now, 0.0))):
                continue
            message = self.connection.recv()
            if message[0] == "step":
                jobs[message[1]].publish_step(message[2])
            elif message[0] == "answer":
                finish(message[1], decode_answer(message[2]))
            elif message[0] == "failed":  # the child's own error, not a job's: it goes on
                raise RuntimeError(f"the model's worker process failed to run a batch: {message[1]}")
            else:
                return message[1]


def _pickled(message) -> bytes:
    """`message` pickled with a request's tensors as their bytes. Pickled here, not by the pipe:
    multiprocessing's pickler shares each tensor through a file descriptor that the child then fetches
    from this process, and plain pickle writes each one as a `torch.save` archive: ~0.1-1 ms per tensor."""
    buffer = io.BytesIO()
    _TensorPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(message)
    return buffer.getvalue()


class _TensorPickler(pickle.Pickler):
    def reducer_override(self, obj):
        if type(obj) is not torch.Tensor or obj.device.type != "cpu" or obj.layout is not torch.strided \
                or obj.is_quantized or obj.requires_grad:
            return NotImplemented  # (an admitted request's constants are all plain CPU tensors)
        data = obj.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return _tensor, (data, str(obj.dtype).removeprefix("torch."), tuple(obj.shape))


def _tensor(data: bytes, dtype: str, shape: tuple) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=getattr(torch, dtype))
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(getattr(torch, dtype)).reshape(shape)


def _child(connection, cancels, source: str, options: dict, level: int) -> None:
    """The worker process: load the model, then run each batch that comes; end when the pipe closes.
    Its main thread reads the batches itself (a hand-over from another thread costs a job's first step
    a wake-up); a thread reads the cancels, which must arrive while a batch runs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the front decides
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s (worker): %(message)s")
    os.nice(NICE)
    replica = ModelReplica(source, **options)
    collector.settle()  # the model and the libraries stay: the collector's full passes need not walk them
    sending = threading.Lock()  # steps are sent from the batch's thread, answers from the main one

    def send(message) -> None:
        with sending:
            connection.send(message)

    send(("ready", replica.identity(), replica.hosted.checksum))
    state = threading.Lock()
    running: dict = {"batch": 0, "cancels": []}  # the batch running (its number) and its cancel events
    early: dict[int, set[int]] = {}  # cancels read before their batch was: set when it starts

    def receive_cancels() -> None:
        while True:
            try:
                batch, number = cancels.recv()
            except (EOFError, OSError):  # the front is gone: so is its worker, whatever it runs
                os._exit(0)
            with state:
                if batch == running["batch"]:
                    running["cancels"][number].set()
                elif batch > running["batch"]:  # (one of a batch that has ended is late: nothing to stop)
                    early.setdefault(batch, set()).add(number)

    threading.Thread(target=receive_cancels, name="interlace-model-cancels", daemon=True).start()
    while True:
        try:
            _, batch, requests, limits, streamed, groups = pickle.loads(connection.recv_bytes())
        except (EOFError, OSError):
            os._exit(0)
        events = [threading.Event() for _ in requests]
        with state:
            running.update(batch=batch, cancels=events)
            for number in early.pop(batch, ()):
                events[number].set()
        try:
            reply = replica.answer(requests, limits, streamed, lambda *message: send(message), events, groups)
        except Exception as error:  # noqa: BLE001 - reported to the front; the child goes on
            log.exception("the model's worker process failed to run a batch")
            send(("failed", f"{type(error).__name__}: {error}"[:2000]))
            continue
        send(("answers", reply))
