"""A model the server hosts: loading it by name, its manifest, and running a job's request on it.

`HostedModel` is the seam between the service and the executor. Before a job is queued, `admit`
reads the request's bytes within the limits and checks everything that can be known without running
it (wire version, user functions, node structure, module paths, invokes, options, max_new_tokens).
A worker thread then calls `execute_many` for one batch of jobs at a time (those that can share a
forward run as one, see `batching`): each request runs untrusted (allowed operations only, read-only
weights, limits, a deadline, cancel between operations) and its saved values come back as the bytes
of `serialize_results`. Only a server started with `--trusted` runs graphs that carry pickled user
functions (`interlace.apply`), and those as a local run would.

A job whose write to a weight got past the schema check (`WeightsChangedError`: the version counters
caught it, and nothing was kept to put it back) leaves the model `broken`: it refuses every job after
it (503 `model_damaged`) until it is loaded again. A worker process or Ray replica is replaced with a
fresh one for it (`worker.py`, `cluster.py`); a server that runs the model in its own process
(`--in-process`) must be restarted, and says so in `/v1/health`.

With `check_weights` (a test mode) every parameter and buffer is checksummed at start and again
after every batch, together with hooks, `requires_grad` and the rest of `ModelState`: a job that left
any trace on the shared model shows in `/v1/health`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections import Counter

import torch

from ..backends.state import ModelState
from ..backends.tree import ModelTree
from ..backends.limits import Limits
from ..backends.remote import package_version
from ..backends.serialize import (GRAPH_MAGIC, SUPPORTED_VERSIONS, deserialize_request, log_text,
                                  serialize_results, serialize_step)
from ..backends.validate import check_against_model
from ..backends.writes import warm_up
from ..errors import LimitError, RefusedError, ServiceError, SourceError, WeightsChangedError
from ..graph import Request
from ..models.base import Model
from ..models.language import DEFAULT_MODEL, LanguageModel, _check_untrusted_options
from ..models.standardized import StandardizedTransformer
from ..models.standardized.attention import AttentionProbes
from ..source import point_names

log = logging.getLogger("interlace.server")

_PICKLED = 2  # the prefix flag of a request that carries pickled functions (serialize.py)


def load_model(source: str, *, weights: bool = True, standardized: bool = False, attention_probs: bool = False,
               **options) -> LanguageModel:
    """"smollm2", a local model folder, a GGUF file, or a Hugging Face cache id.

    weights: load them (else config and tokenizer only, the module on the meta device: enough to check
    requests and write the manifest). standardized: host a StandardizedTransformer, whose attention
    probes (per-head values) clients can read; attention_probs (implies standardized): with attention
    probabilities, on the eager attention. `options` go to the model (device_map, ...).
    """
    kind = LanguageModel
    if standardized or attention_probs:
        kind, options["enable_attention_probs"] = StandardizedTransformer, attention_probs
    if source.endswith(".gguf") and os.path.isfile(source):
        folder, name = os.path.split(os.path.abspath(source))
        return kind(folder, gguf_file=name, dispatch=weights, **options)
    return kind(source, dispatch=weights, **options)


def default_name(source: str) -> str:
    """The id clients use for a model: 'smollm2', a folder's or file's name, or the cache id."""
    if source == DEFAULT_MODEL or not os.path.exists(source):
        return source
    return os.path.basename(os.path.normpath(source)).removesuffix(".gguf")


def weights_checksum(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter's and buffer's name and bytes."""
    digest = hashlib.sha256()
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        digest.update(name.encode())
        if tensor.device.type != "meta":
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class HostedModel:
    """One hosted model instance (one job at a time runs on it)."""

    def __init__(self, model: Model, *, name: str, limits: Limits, trusted: bool = False,
                 check_weights: bool = False):
        self.model, self.name, self.limits, self.trusted = model, name, limits, trusted
        self.checksum = weights_checksum(model.module) if check_weights else None
        self._state = ModelState(model.module, values=False) if check_weights else None
        self.checked = 0  # jobs after which the model was checked
        self.changes: list[str] = []  # what any job left behind (check_weights only)
        self.broken: list[str] = []  # weights a job changed past the write check: no job runs after it
        self.reloads: list[str] = []  # why its weights were loaded again (a worker process restarted for it)
        self.worker_restarts: Counter = Counter()  # why its worker process was started again (worker.py): times
        self._manifest: dict | None = None
        self._fingerprint: str | None = None
        if not trusted:  # (a trusted server's local runs run the users' own code, which may change the model)
            ModelTree.hold(model.module)  # only the jobs change it: their second line carries its reads
            warm_up()

    # -- before queueing (a thread of the HTTP side) ------------------------------------------------
    def admit(self, data: bytes) -> Request:
        """The request in `data`, checked as far as it can be without running it."""
        if carries_functions(data) and not self.trusted:
            raise RefusedError("this request carries pickled Python functions (interlace.apply), which this "
                               "server does not run: it runs graphs of allowed operations only")
        # the copies of repeated blocks are made where the request runs (a worker process gets it pickled)
        request = deserialize_request(data, trusted=self.trusted, limits=self.limits, make_copies=False)
        for trace in request.traces:
            if len(trace.invokes) > self.limits.max_invokes:
                raise LimitError(f"a trace has {len(trace.invokes)} invokes, over the limit of "
                                 f"{self.limits.max_invokes} (max_invokes)")
            if not self._runs_functions(request.graph):
                check_against_model(request.graph, self.model.module, self.model._extra_modules(),
                                    len(trace.invokes), trace.start, trace.end)
            if isinstance(self.model, LanguageModel):
                _check_untrusted_options(trace.options, None, self.limits)
        return request

    def batching(self, request: Request, limits: Limits) -> tuple:
        """(group, size) of a job: jobs of one group (None: none) can share a forward; size in tokens."""
        group, size = self.model.batching(request, max_tokens=limits.max_tokens)
        if group is None or self._runs_functions(request.graph):
            return None, size
        return (group, limits), size

    # -- jobs (the model's worker thread) ---------------------------------------------------------------
    def execute_many(self, requests: list[Request], *, limits: Limits, cancels: list, groups=None,
                     on_steps=None, on_answers=None) -> list:
        """Run requests together where they can share a forward (one group; see `batching`); for each,
        (result bytes, log lines, missing saved values) or the exception that failed it alone.
        groups: the model's group of each request (`Model.batching`), when known. on_steps: for each,
        None or what is handed each of its generation steps as a `step` event (`serialize_step`).
        on_answers: for each, None or what is handed its (result bytes, log lines, missing) where it has them
        before the batch ends (see `Model.run_many`)."""
        if self.broken:
            return [self.damaged()] * len(requests)
        on_steps = [step_publisher(request.graph, limits, send) if send else None
                    for request, send in zip(requests, on_steps or [None] * len(requests))]
        replies: dict[int, tuple] = {}  # the answers handed out early, made once

        def answered(number: int, receive):
            def reply(outcome) -> None:
                made = self._reply(requests[number], outcome, limits)
                if not isinstance(made, Exception):  # (too large: the batch's end says so)
                    replies[number] = made
                    receive(made)
            return reply if receive is not None else None

        on_answers = [answered(number, receive) for number, receive in enumerate(on_answers or [None] * len(requests))]
        try:
            if len(requests) == 1 and self._runs_functions(requests[0].graph):
                answers = [self._answer(lambda: self.model.run(requests[0], limits=limits, cancel=cancels[0],
                                                               on_step=on_steps[0]))]
            else:
                answers = self.model.run_many(requests, untrusted=True, limits=limits, cancels=cancels, groups=groups,
                                              on_steps=on_steps, on_answers=on_answers)
            for answer in answers:
                if isinstance(answer, WeightsChangedError):
                    self.broken += [name for name in answer.changed if name not in self.broken]
                    log.error("a job changed weight(s) %s of the hosted model %s past the write check: it runs "
                              "no more jobs until it is loaded again", ", ".join(answer.changed[:5]), self.name)
            return [replies[number] if number in replies else self._reply(request, answer, limits)
                    for number, (request, answer) in enumerate(zip(requests, answers))]
        finally:
            if self.checksum is not None:
                self._check()

    def _runs_functions(self, graph) -> bool:
        """Whether `graph` names Python functions (interlace.apply), which only a trusted server decodes."""
        return self.trusted and _has_functions(graph)

    def damage(self) -> list[str]:
        """What jobs did to the weights past the write check, and what was done about it (`/v1/health`)."""
        now = [f"weight(s) {', '.join(self.broken[:5])} changed by a job: the model runs no more jobs until the "
               "server is restarted"] if self.broken else []
        return self.reloads + now

    def damaged(self) -> ServiceError:
        """The refusal of every job once a job changed the weights (`broken`)."""
        return ServiceError(
            f"an earlier job changed weight(s) {', '.join(self.broken[:5])} of the model {self.name!r} in a way the "
            "server could not prevent or undo, so it runs no more jobs on them: the server must be restarted to "
            "load the model again (tell its operator); then submit the job again", status=503, code="model_damaged")

    @staticmethod
    def _answer(run):
        try:
            return run()
        except Exception as error:  # noqa: BLE001 - reported to its job
            return error

    @staticmethod
    def _reply(request: Request, answer, limits: Limits):
        if isinstance(answer, Exception):
            return answer
        try:
            data = serialize_results(answer.results, answer.logs, graph=request.graph, limits=limits)
        except Exception as error:  # noqa: BLE001 - too large to send, say: that job's error alone
            return error
        return data, [(index, (log_text(values),)) for index, values in answer.logs], answer.missing

    def _check(self) -> None:
        self.checked += 1
        changes = self._state.diff()
        if weights_checksum(self.model.module) != self.checksum:
            changes.append("weights: checksum changed")
        if changes:
            log.error("a job changed the hosted model %s: %s", self.name, "; ".join(changes))
            self.changes += changes

    def limits_for(self, timeout: float | None) -> Limits:
        """This server's limits, with the deadline shortened to a client's `timeout`."""
        if timeout is None or timeout >= self.limits.max_seconds:
            return self.limits
        return dataclasses.replace(self.limits, max_seconds=max(timeout, 0.001))

    # -- what a client needs to build the model without weights -----------------------------------------
    def manifest(self) -> dict:
        if self._manifest is None:
            self._manifest = self._build_manifest()
        return self._manifest

    def _build_manifest(self) -> dict:
        module = self.model.module
        # the tree a client builds from the config: without a standardized model's attention probes,
        # which the client adds itself (see "standardized")
        probes = tuple(path + "." for path, sub in module.named_modules() if isinstance(sub, AttentionProbes))
        modules = [[path, type(sub).__name__] for path, sub in module.named_modules()
                   if not (path + ".").startswith(probes)]
        manifest = {
            "id": self.name, "interlace": package_version(), "wire_version": SUPPORTED_VERSIONS[0],
            "wire_versions": list(SUPPORTED_VERSIONS), "trusted": self.trusted,
            "kind": "language" if isinstance(self.model, LanguageModel) else "model",
            "modules": modules,
            "limits": dataclasses.asdict(self.limits), "config": None, "tokenizer": {}, "padding_side": None,
            "standardized": None, "source": _source_points(module),
        }
        if isinstance(self.model, StandardizedTransformer):  # clients add the same probes to the tree they build
            manifest["standardized"] = {"attention_probs": self.model._attention_probs}
        if isinstance(self.model, LanguageModel):
            manifest["config"] = json.loads(module.config.to_json_string(use_diff=False))
            manifest["padding_side"] = self.model.padding_side
            if self.model.tokenizer is not None:
                with tempfile.TemporaryDirectory() as folder:
                    self.model.tokenizer.save_pretrained(folder)
                    for name in sorted(os.listdir(folder)):
                        with open(os.path.join(folder, name), encoding="utf-8") as file:
                            manifest["tokenizer"][name] = file.read()
        return manifest

    def fingerprint(self) -> str:
        """What a queued job needs of its model to run after a restart: the same module tree, config, kind
        and standardized options (SHA-256 of them; not the weights, which would take a pass over them)."""
        if self._fingerprint is None:
            manifest = self.manifest()
            same = {name: manifest[name] for name in ("modules", "config", "kind", "standardized")}
            self._fingerprint = hashlib.sha256(json.dumps(same, sort_keys=True, default=str).encode()).hexdigest()
        return self._fingerprint

    def summary(self) -> dict:
        return {"id": self.name, "kind": "language" if isinstance(self.model, LanguageModel) else "model",
                "type": type(self.model.module).__name__,
                "parameters": sum(p.numel() for p in self.model.module.parameters())}


def step_publisher(graph, limits: Limits, send):
    """What hands `send` each generation step of a streamed job as a `step` event (its tokens, text, and
    values in the wire format).

    The events stay with the job until it expires, so all its steps' values together are bounded by
    `max_result_bytes`, as its result is: past that the job fails (saying so) rather than the server's memory.
    """
    sent = 0

    def publish(step) -> None:
        nonlocal sent
        event = serialize_step(step, graph=graph, limits=limits)
        sent += len(event["values"] or "") * 3 // 4  # base64: four characters carry three bytes
        if sent > limits.max_result_bytes:
            raise LimitError(f"the values saved per step add up to more than the limit of {limits.max_result_bytes} "
                             f"bytes (max_result_bytes) by step {step.index}: save less per step, or stream fewer steps")
        send(event)

    return publish


def _source_points(module: torch.nn.Module) -> dict[str, list[str]]:
    """For each module class of the model, the `.source` points of its forward (read, not installed)."""
    points = {}
    for sub in module.modules():
        name = type(sub).__name__
        if name not in points:
            try:
                points[name] = point_names(type(sub).forward)
            except SourceError:
                points[name] = []  # no Python source: no points
    return points


def carries_functions(data: bytes) -> bool:
    """Whether a request's bytes carry pickled Python functions (`interlace.apply`; the prefix says so)."""
    return bytes(data[:3]) == GRAPH_MAGIC and len(data) > 4 and bool(data[4] & _PICKLED)


def _has_functions(graph) -> bool:
    """Whether a (trusted) graph names Python callables rather than allow-list entries."""
    return any(node.target is not None and not isinstance(node.target, str) for node in graph.nodes)
