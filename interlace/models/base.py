"""Model: wraps any `nn.Module` so it can be traced.

A `Model` is the root envoy of its module tree plus `trace()`. Executing a trace batches the
invokes' inputs into one forward call (tensors concatenated along the batch dimension) and hands the
graph to the local interleaver.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from functools import partial

import torch

from ..backends.guard import Guard
from ..backends.tree import ModelTree
from ..backends.limits import DEFAULT as DEFAULT_LIMITS, Limits
from ..backends.local import Interleaver, ended_by_session_stop
from ..backends.merge import MergedInterleaver, merge, merge_key, plain, split, split_step
from ..backends.rows import SharedValueError
from ..backends.scan import Scanner
from ..envoy import Envoy
from ..errors import InterlaceError, ModelError, RefusedError, describe_location
from ..graph import Graph, Outcome, Request, TraceSpec, map_refs
from ..session import Session
from ..tracer import NESTED_MESSAGES, Editor, Tracer


class Model(Envoy):
    """Any PyTorch module, ready to trace.

    >>> import torch, interlace
    >>> net = interlace.Model(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    >>> x = torch.randn(2, 4)
    >>> with net.trace(x):
    ...     net[0].output[:, 0] = 0
    ...     out = net.output.save()
    >>> bool((out[:, 0] == 0).all())
    True
    """

    _remote = None  # the RemoteBackend of a model that lives on a server (LanguageModel(name, host=...))
    _origin = None  # the model an edited copy was made from: its envoys record into the copy's traces too

    def __init__(self, module: torch.nn.Module, *, rename: dict[str, str | list[str]] | None = None):
        if not isinstance(module, torch.nn.Module):
            raise InterlaceError(f"Model wraps a torch.nn.Module, not {type(module).__name__}")
        super().__init__(module)
        self._rename = dict(rename or {})
        self._session: Session | None = None
        self._edits: list = []  # nodes recorded by edit(), replayed at the start of every trace
        # one local run at a time: a streamed run goes on in a thread while the caller records the next
        # trace, and hooks on a shared module would see both (copies from edit() share it too); a streamed
        # run lets go of it while it waits for its reader between steps (see stream.Stream)
        self._running = threading.RLock()
        self._apply_renames()

    def _apply_renames(self) -> None:
        """`rename={"transformer": "model", "model.layers": "layers", "attn": "self_attn"}`: aliases.

        Each key is a child name or a dotted path, looked up from every module in the tree (through
        the aliases made before it, plain names first): wherever it leads to a module, that module
        gets the alias (one name, or a list of names). So `{"transformer": "model", "model.layers":
        "layers"}` makes `lm.model`, `lm.model.layers` and `lm.layers` on GPT-2 (nnsight's and
        nnterp's rules). Graphs still hold the real paths, so they serialize and run anywhere.
        """
        envoys = list(self.modules())
        renames = sorted(self._rename.items(), key=lambda item: "." in item[0].lstrip("."))
        for source, aliases in renames:
            parts = source.lstrip(".").split(".")
            aliases = [aliases] if isinstance(aliases, str) else list(aliases)
            for envoy in envoys:
                target = envoy
                for part in parts:
                    child = target._children.get(part)  # (an envoy without children is falsy: no `or`)
                    target = child if child is not None else target._aliases.get(part)
                    if target is None:
                        break
                if target is not None:
                    envoy._aliases.update(dict.fromkeys(aliases, target))

    def trace(self, *inputs, early_stop: bool = True, scan: bool = False, validate: bool = False,
              remote: bool = False, blocking: bool = True, timeout: float | None = None, backend=None,
              stream: bool = False, **kwargs) -> Tracer:
        """Record interventions for one run of the model on `inputs` (or on invokes).

        early_stop: end the forward as soon as nothing in the graph needs the model any more.
        scan / validate: evaluate every line on fake tensors as it is recorded, so shape errors are
        raised at that line before the model runs, and `proxy.shape` is a real size.
        remote / backend, blocking, timeout: run on a server (see docs/remote/client.md).
        stream: run step by step as `tracer.stream()` asks (a remote job is submitted as the block ends).
        Other keyword arguments are the model's own (checked against its forward).
        """
        args, input_kwargs, forward_kwargs = self._trace_inputs(inputs, kwargs)
        return Tracer(self, args, input_kwargs, mode="trace", kwargs=forward_kwargs, early_stop=early_stop,
                      scan=scan or validate, stream=stream, **self._remote_options(remote, blocking, timeout, backend))

    def session(self, *, scan: bool = False, validate: bool = False, remote: bool = False, blocking: bool = True,
                timeout: float | None = None, backend=None) -> Session:
        """Several traces run together: values of one can be used in the next (remotely: one request).

        scan / validate apply to every trace in the session.
        """
        return Session(self, scan=scan or validate, **self._remote_options(remote, blocking, timeout, backend))

    def edit(self, *inputs, inplace: bool = False) -> Editor:
        """Record interventions that apply to every later trace.

        Returns (from `with`) an edited copy of the model sharing the same weights; with
        `inplace=True` the model itself is edited. `clear_edits()` removes them. inputs: an example
        input (nnsight's `model.edit(inputs)`): each line is checked on it with fake tensors as it is
        recorded (`scan`); the edits still apply to every row of every later batch.
        """
        return Editor(self, inputs, inplace=inplace, early_stop=True, scan=bool(inputs), kwargs={})

    def clear_edits(self) -> None:
        self._edits = []

    def _copy(self) -> "Model":
        """A new wrapper of the same module with its own envoys (and so its own edits)."""
        clone = copy.copy(self)
        Envoy.__init__(clone, self._module)
        clone._session, clone._edits, clone._origin = None, [], self._origin or self
        clone._apply_renames()
        return clone

    # -- used by Tracer -------------------------------------------------------------------------
    def _trace_inputs(self, inputs: tuple, kwargs: dict):
        """(args, kwargs of the first invoke, keyword arguments of the forward): here all are inputs."""
        return inputs, kwargs, {}

    def _remote_options(self, remote: bool, blocking: bool, timeout, backend) -> dict:
        """The options of a remote run, checked now: a remote trace needs somewhere to run."""
        if backend is not None and not callable(getattr(backend, "run", None)):
            raise InterlaceError(f"backend must be a RemoteBackend (interlace.backends.remote), not "
                                 f"{type(backend).__name__}; for this model's own server use remote=True")
        if remote and backend is None and self._remote is None:
            raise InterlaceError(
                "remote=True needs a server, and this model has none: create it with "
                "LanguageModel(name, host='http://...', api_key=...) or set INTERLACE_HOST and "
                "INTERLACE_API_KEY (see docs/remote/client.md). To run here, leave out remote=True."
            )
        return {"remote": bool(remote or backend is not None), "blocking": blocking, "timeout": timeout,
                "backend": backend}

    def submit(self, request: Request, options: dict, *, on_step=None, cancel=None):
        """Run a recorded request where its options say: here (`run`), or on a server.

        on_step, cancel: of a streamed local run (see `run`). A streamed remote run gives its job and a
        generator of its steps that returns the outcome (see `RemoteBackend.stream`).
        """
        if options.get("remote"):
            return self.run_remote(request, blocking=options["blocking"], timeout=options["timeout"],
                                   backend=options["backend"], stream=options.get("stream", False))
        with self._running:
            return self.run(request, on_step=on_step, cancel=cancel)

    def run_remote(self, request: Request, *, blocking: bool = True, timeout=None, backend=None, stream: bool = False):
        """Run on a server (`backend`, a RemoteBackend, or the model's own): an Outcome, a job handle, or
        (stream) a job handle and a generator of its steps."""
        backend = backend or self._remote
        if stream:
            return backend.stream(request, timeout=timeout)
        return backend.run(request, blocking=blocking, timeout=timeout)

    def job(self, job_id: str):
        """A job this model's server runs (by the id a `blocking=False` trace's `tracer.job.id` has, or a
        stopped blocking trace printed): `.status()`, `.result()` (an Outcome: saved values by node), `.cancel()`."""
        if self._remote is None:
            raise InterlaceError("this model is not on a server: jobs belong to models made with host=...")
        return self._remote.job(job_id)

    def _attach(self, tracer: Tracer) -> None:
        models = (self,) if self._origin is None else (self, self._origin)
        if self._tracer is not None or self._origin is not None and self._origin._tracer is not None:
            raise InterlaceError(NESTED_MESSAGES["trace"])
        for model in models:
            object.__setattr__(model, "_tracer", tracer)  # (not Envoy.__setattr__'s module check: a call a trace)
        if tracer.options.get("scan") or tracer.session is not None and tracer.session.options.get("scan"):
            try:
                self._start_scan(tracer)
            except BaseException:  # the block never opened: the model takes traces again
                for model in models:
                    model._tracer = None
                raise

    def _start_scan(self, tracer: Tracer) -> None:
        """Evaluate the tracer's nodes on fake tensors from now on; every invoke so far is captured."""
        tracer.scanner = Scanner(tracer.graph, self._module, modules=self._extra_modules())
        for index in range(len(tracer.invokes)):
            self._scan_invoke(tracer, index)

    def _scan_invoke(self, tracer: Tracer, index: int) -> None:
        args, kwargs = self._call_inputs(tracer, index)
        tracer.scanner.capture(index, lambda fake: self._module(*fake(args), **fake(kwargs)))

    def _call_inputs(self, tracer: Tracer, index: int):
        """The (args, kwargs) the model is called with for invoke `index` alone."""
        return tracer.invokes[index]

    def _extra_modules(self) -> dict:
        """Modules outside the wrapped tree that graphs may name (LanguageModel's generator)."""
        return {}

    def _result_envoy(self, tracer: Tracer) -> Envoy:
        """The envoy whose output is what the traced call returns (`tracer.result`)."""
        return self

    @property
    def _model(self) -> torch.nn.Module:
        """The wrapped module (as nnsight's `model._model`)."""
        return self._module

    def _detach(self, tracer: Tracer) -> None:
        object.__setattr__(self, "_tracer", None)  # (as in _attach)
        if self._origin is not None:
            object.__setattr__(self._origin, "_tracer", None)

    def run(self, request: Request, *, untrusted: bool = False, limits: Limits | None = None,
            cancel=None, on_step=None) -> Outcome:
        """Execute a request: each trace is one forward (or generation); values flow between traces.

        `trace()` and `session()` end here; so does a server with a request it received, with
        `untrusted=True`: the graph is checked against the model, runs only allowed operations within
        `limits`, may not change the weights, and returns its `log` lines instead of printing them.
        `cancel` (anything with `is_set()`) stops an untrusted run between operations, and a generation
        at its next step. `on_step(step)` is handed each generation step as it finishes (a `Step`).
        """
        graph, traces = request.graph, request.traces
        if len(traces) > 1:  # (a server's front leaves them to the process that runs the request: see Plan)
            graph.make_copies()
        limits = limits or DEFAULT_LIMITS
        last_reader = _last_reader(graph, traces) if len(traces) > 1 else None  # (one trace: nothing carries)
        outcome, carried, skip_to = Outcome(), {}, 0
        # a session's traces share one deadline and one element budget: the request's, not each trace's
        guard = Guard(self._module, untrusted=untrusted, limits=limits, cancel=cancel)
        for number, trace in enumerate(traces):
            if guard.deadline is not None or guard.cancel is not None:  # (what tick checks: no call without them)
                guard.tick()  # between a session's forwards too, whatever its graph runs
            if trace.start < skip_to:  # a session.stop() ended the loop this span belongs to
                why = ended_by_session_stop(skip_to >= len(graph))
                outcome.missing.update({node.index: why for node in graph.nodes[trace.start : min(trace.end, skip_to)]
                                        if node.saved})
                if trace.end <= skip_to or trace.options.get("mode") != "session":
                    continue
                trace = TraceSpec(skip_to, trace.end, trace.invokes, trace.options)  # what follows the loop
            keep = {i for i in range(trace.start, trace.end) if last_reader[i] > number} if last_reader else set()
            if trace.inputs_hold_refs:
                trace = TraceSpec(trace.start, trace.end, _inputs(trace, carried, number, graph, untrusted), trace.options,
                                  inputs_hold_refs=False)
            run = {"known": carried, "keep": keep, "untrusted": untrusted, "limits": limits, "cancel": cancel,
                   "guard": guard}
            if trace.options.get("mode") == "session":  # the session's own nodes: no model run
                interleaver = Interleaver(graph, self._module, [], 0, span=(trace.start, trace.end),
                                          modules=self._extra_modules(), **run)
                interleaver.run(None)
            else:
                each_step = _each_step(on_step, self._module) if on_step is not None else None
                interleaver = self._execute(graph, trace, on_step=each_step, **run)
            outcome.results.update(interleaver.results)
            outcome.logs += interleaver.logs
            if interleaver.plan.saved:
                outcome.missing.update(interleaver.missing())
            if keep:
                carried.update({i: interleaver.values[i] for i in keep if i in interleaver.values})
            if interleaver.skip_to is not None:  # (a session.stop())
                skip_to = max(skip_to, interleaver.skip_to)
        if outcome.results:
            _copy_weights(outcome.results, self._module)
        return outcome

    def run_many(self, requests: list[Request], *, untrusted: bool = False, limits: Limits | None = None,
                 cancels=None, groups=None, on_steps=None, on_answers=None) -> list:
        """Run several requests, sharing one batched forward among those that can (cross-user batching).

        Requests with one trace and the same mode and options merge into one forward, each keeping
        its own rows; the answer for each is its `Outcome`, equal to running it alone (up to float
        rounding in a different batch), or the `InterlaceError` that failed it alone: a request
        that fails, stops early or is cancelled (`cancels[i].is_set()`) never cuts the others short.
        groups: each request's group from `batching`, when the caller has it already. on_steps: for
        each request, None or a function handed each of its generation steps (its own rows and values).
        on_answers: for each request, None or a function handed its `Outcome` where there is one before the
        run ends: a generation that ends before the others of its batch is answered at its last step (what
        `run_many` returns holds the same answer).
        """
        limits = limits or DEFAULT_LIMITS
        cancels = list(cancels) if cancels is not None else [None] * len(requests)
        on_steps = list(on_steps) if on_steps is not None else [None] * len(requests)
        on_answers = list(on_answers) if on_answers is not None else [None] * len(requests)
        answers: list = [None] * len(requests)
        keys = groups if groups is not None else [self.batching(request)[0] for request in requests]
        together: dict = {}
        for number, key in enumerate(keys):
            together.setdefault(key if key is not None else ("alone", number), []).append(number)
        for members in together.values():
            if len(members) == 1:
                number = members[0]
                answers[number] = self._answer(requests[number], untrusted, limits, cancels[number], on_steps[number])
                continue
            merged = self._run_merged([requests[i] for i in members], untrusted, limits, [cancels[i] for i in members],
                                      [on_steps[i] for i in members], [on_answers[i] for i in members])
            for number, answer in zip(members, merged):
                answers[number] = answer
        return answers

    def batching(self, request: Request, *, max_tokens: int | None = None) -> tuple:
        """(group, size): requests of one group can share a forward (`run_many`; None: it runs alone);
        size is how much of a merged batch it takes (rows; LanguageModel: token positions)."""
        size = sum(_batch_size(args, kwargs) for trace in request.traces for args, kwargs in trace.invokes)
        key = merge_key(request)
        invokes = request.traces[0].invokes if key is not None else ()
        shapes = {_call_shape(args, kwargs) for args, kwargs in invokes}
        if len(shapes) != 1 or not all(_rows_alone(args, kwargs) for args, kwargs in invokes):
            return None, size  # (invokes that cannot be batched fail their own request only, alone)
        return (key, shapes.pop()), size  # positions mean the same in every row

    def _answer(self, request: Request, untrusted: bool, limits: Limits, cancel, on_step=None):
        try:
            return self.run(request, untrusted=untrusted, limits=limits, cancel=cancel, on_step=on_step)
        except InterlaceError as error:
            return error

    def _run_merged(self, requests: list[Request], untrusted: bool, limits: Limits, cancels: list, on_steps: list,
                    on_answers: list) -> list:
        merged, parts = merge(requests)
        count = len(parts)
        answered: dict[int, Outcome] = {}  # the parts answered before the run's end: that answer stands

        def early(number: int, receive):
            def hand(answer: Outcome) -> None:
                answered[number] = answer
                receive(answer)
            return hand if receive is not None else None

        on_answers = [early(number, receive) for number, receive in enumerate(on_answers)]
        shared = dataclasses.replace(limits, max_total_elements=limits.max_total_elements * count,
                                     max_tokens=limits.max_tokens * count)
        try:
            interleaver = self._execute(merged.graph, merged.traces[0], known={}, keep=(), untrusted=untrusted,
                                        limits=shared, cancel=None, interleaver=MergedInterleaver, parts=parts,
                                        cancels=cancels, on_answers=on_answers, on_step=split_step(parts, on_steps))
        except ModelError:  # the forward itself broke: run each alone, so it fails only whose request broke it
            return [answered[n] if n in answered else self._answer(r, untrusted, limits, c, s)
                    for n, (r, c, s) in enumerate(zip(requests, cancels, on_steps))]
        except InterlaceError as error:  # the whole run failed (its deadline, a check): every request with it
            return [answered.get(n, error) for n in range(count)]
        answers = split(interleaver, parts)
        for n, answer in enumerate(answers):
            if n in answered:
                answers[n] = answered[n]
            elif isinstance(answer, SharedValueError):
                # a job that needed a value the batch shares (a cache, a tensor without rows) runs again alone
                # (streamed, its steps start again from step 0: a remote reader skips those it has)
                answers[n] = self._answer(requests[n], untrusted, limits, cancels[n], on_steps[n])
        return answers

    def _execute(self, graph: Graph, trace: TraceSpec, *, on_step=None, **run) -> Interleaver:
        """Run one trace of a request; returns the finished interleaver.

        on_step(step, interleaver): each generation step (a plain module has none; see LanguageModel).
        """
        options = trace.options
        if run["untrusted"] and (options.get("mode", "trace") != "trace" or options.get("kwargs")):
            raise RefusedError("a Model runs traces of its inputs only: mode 'trace' and no keyword options")
        args, kwargs, rows, batch_size = self._batch(trace.invokes)
        make = run.pop("interleaver", Interleaver)
        if make is MergedInterleaver:  # (which values hold rows is found by running the forward on fake inputs)
            run["inputs"] = (args, kwargs)
        interleaver = make(
            graph, self._module, rows, batch_size, early_stop=options.get("early_stop", True),
            span=(trace.start, trace.end), **run)
        # (a partial, not a lambda calling a method: two calls a trace fewer)
        interleaver.run(partial(self._module, *args, **kwargs) if args is not None else _no_input)
        return interleaver

    def _batch(self, invokes):
        """One call's (args, kwargs) from the invokes, and each invoke's (start, stop) rows."""
        if not invokes:
            return None, None, [], 0
        if len(invokes) == 1:
            args, kwargs = invokes[0]
            size = _batch_size(args, kwargs)
            return args, kwargs, [(0, size)], size
        rows, start = [], 0
        for args, kwargs in invokes:
            size = _batch_size(args, kwargs)
            rows.append((start, start + size))
            start += size
        arities = {(len(a), tuple(k)) for a, k in invokes}
        if len(arities) > 1:
            raise InterlaceError("every invoke must pass the same positional and keyword arguments")
        args = tuple(_concat([a[i] for a, _ in invokes], f"argument {i}") for i in range(len(invokes[0][0])))
        kwargs = {key: _concat([k[key] for _, k in invokes], f"argument '{key}'") for key in invokes[0][1]}
        return args, kwargs, rows, start


def _no_input():
    raise InterlaceError("the trace has no input: pass inputs to `model.trace(...)` or add them with `tracer.invoke(...)`")


def _each_step(on_step, module: torch.nn.Module):
    """`on_step(step)` as `_execute` calls it, `(step, interleaver)` (a merged run splits steps by part);
    a step's values are copied where they share a weight's memory, as the run's results are."""

    def each(step, interleaver) -> None:
        _copy_weights(step.values, module)
        on_step(step)

    return each


def _copy_weights(results: dict, module: torch.nn.Module) -> None:
    """Saved values that share memory with a weight or buffer (`net.weight.save()`, a view of one)
    become copies: changing a saved value must never change the model (benchmarks/saved_weights.py
    measures what the copies cost). The weights' storages are the model's cached `ModelTree`: a
    walk over every parameter here would cost more than the rest of a small trace."""
    index = None
    for key, value in results.items():
        if not isinstance(value, torch.Tensor) or value.is_meta:
            continue
        if index is None:
            index = ModelTree.of(module)
        pointer = value.untyped_storage().data_ptr()
        if pointer in index.tensors and index.holds(pointer):  # (most are no weight's: no call for them)
            results[key] = value.detach().clone()


def _last_reader(graph: Graph, traces) -> list[int]:
    """For each node, the number of the last trace that reads it (its nodes or its inputs; -1: none)."""
    last = [-1] * len(graph)

    def read(ref, number):
        last[ref.index] = number
        return ref

    for number, trace in enumerate(traces):
        for node in graph.nodes[trace.start : trace.end]:
            for ref in node.refs():
                last[ref] = number
        map_refs(trace.invokes, lambda ref, number=number: read(ref, number))
    return last


def _inputs(trace: TraceSpec, carried: dict, number: int, graph: Graph, untrusted: bool) -> list:
    """A trace's invokes with values of earlier traces (a session's values) in place of references."""
    def value(ref):
        if ref.index not in carried:
            node = graph.nodes[ref.index] if 0 <= ref.index < len(graph) else None
            recorded = describe_location(node.location, read_source=not untrusted) if node is not None else ""
            raise InterlaceError(
                f"an input of trace {number} is the value of node %{ref.index}"
                + (f" (recorded at {recorded})" if recorded else "")
                + ", which was not computed (a false condition, or a stop before it)"
            )
        return carried[ref.index]

    return map_refs(trace.invokes, value)


def _batch_size(args, kwargs) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.ndim:
            return value.shape[0]
    return 1


def _call_shape(args, kwargs) -> tuple:
    """What must match for invokes to share a forward: the tensors' shapes but the batch dimension, the plain
    values whole (two that differ past a shortened repr could not be batched, and would fail every job)."""
    def shape(value):
        return tuple(value.shape[1:]) if isinstance(value, torch.Tensor) else repr(value)

    return tuple(shape(a) for a in args), tuple((k, shape(v)) for k, v in kwargs.items())


def _rows_alone(args, kwargs) -> bool:
    """Whether an invoke's inputs are one batch-first tensor (its rows) and plain values, so another job's can be
    laid beside them. A second tensor need not be rows (a context every row reads): laid end to end with another
    job's, each job's rows would read both."""
    values = [*args, *kwargs.values()]
    tensors = [value for value in values if isinstance(value, torch.Tensor)]
    return (len(tensors) == 1 and tensors[0].dim() > 0
            and all(isinstance(value, torch.Tensor) or plain(value) for value in values))


def _concat(values, name):
    if all(isinstance(v, torch.Tensor) for v in values):
        try:
            return torch.cat(values)
        except RuntimeError as error:
            raise InterlaceError(
                f"the invokes' {name} cannot be batched: {error}. Inputs of different invokes must "
                "match in every dimension but the first."
            ) from None
    if any(v is not values[0] and v != values[0] for v in values[1:]):
        raise InterlaceError(f"the invokes pass different non-tensor values for {name}; they must be equal")
    return values[0]
