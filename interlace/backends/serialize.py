"""The wire format: a request (a graph, its traces' inputs and options) and results.

    prefix   magic (b"ILG" request, b"ILR" results) | version u8 | flags u8 | count u32 LE
    body     header length u64 LE | JSON header | safetensors section     (zstd-compressed when
                                                                            flags & 1)

Version 1 is frozen. Version 2 (requests only, written only when a graph has repeated blocks) adds
`repeats` to the header: a block applied to many generation steps is sent once, with where each
copy starts, its call shift and its step; the loader checks those numbers against the limits and
builds the copies itself (`Graph.add_copy`; a server's front leaves them to the process that runs the
request, `Graph.add_copy_later`): a request's size, reading and checking do not grow with the number
of steps, and no copy comes from the sender. A reader takes both versions.

`count` is the number of nodes (request, copies included) or values (results), so an over-long graph
is refused before anything is parsed. The header is checked by the pydantic models below; values inside it are
tagged JSON (`{"ref": 3}`, `{"tuple": [...]}`, `{"tensor": "0"}`, ...), and every tensor the header
refers to lives in the safetensors section (none that it does not). Call targets travel as names of
the allow-list in `ops`; a user function travels only in trusted mode (cloudpickle, flags & 2).

Loading treats every byte as hostile: the frame, the decompressed header (decompression is streamed
and stops at the limit), the tensor section, the node count, nesting depth, string lengths, list
lengths and int sizes are all checked against `Limits` before they are used, pickle is never
loaded without `trusted=True`, and any failure is a `SerializationError` or `GraphError` naming the
node, never a crash.
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import functools
import json
import math
import re
import reprlib
import struct
from typing import Any, Literal

import cloudpickle
import safetensors.torch
import torch
import zstandard
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import ops
from ..errors import (GraphError, InterlaceError, LimitError, SerializationError, VersionError, describe_location,
                      quote_sources)
from ..graph import OPS, Graph, Node, Ref, Repeat, Request, TraceSpec, copied_spans
from ..stream import Step
from .limits import Limits
from .validate import check_node, check_structure

GRAPH_MAGIC, VALUES_MAGIC = b"ILG", b"ILR"
VERSION = 2  # the newest version of a request this interlace reads and writes (results stay at 1)
SUPPORTED_VERSIONS = (1, 2)
_ZSTD, _PICKLED = 1, 2  # flag bits; _PICKLED lets a loader refuse before parsing anything
_PREFIX = struct.Struct("<3sBBI")
_LENGTH = struct.Struct("<Q")
_DTYPES = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)}
_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


# -- the header schema -----------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class NodeModel(_Strict):
    index: int = Field(ge=0)
    op: str = Field(max_length=64)  # an op kind of graph.OPS; an unknown one is a GraphError naming the node
    # a module path, allow-list name or method name; {"pickle": base64} for a user function
    target: str | dict[Literal["pickle"], str] | None = None
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    location: tuple[str, int] | None = None
    guard: int | None = None
    saved: bool = False


class InvokeModel(_Strict):
    args: list[Any] = []
    kwargs: dict[str, Any] = {}


class TraceModel(_Strict):
    start: int = Field(ge=0)
    end: int = Field(ge=0)
    invokes: list[InvokeModel] = []
    options: dict[str, Any] = {}


class RepeatModel(_Strict):
    start: int = Field(ge=0)
    end: int = Field(ge=0)
    copies: list[tuple[int, int, int]]  # (first node, call shift, step value) per copy


class Header(_Strict):
    version: Literal[1, 2]
    nodes: list[NodeModel]  # version 2: every node but the copies of repeated blocks
    traces: list[TraceModel]
    repeats: list[RepeatModel] = []  # version 2 only


class ValuesHeader(_Strict):
    version: Literal[1]
    values: list[tuple[int, Any]]
    logs: list[tuple[int, list[Any]]] = []


class StepEvent(_Strict):
    """One generation step of a streamed job, as its `step` event carries it (JSON)."""

    step: int = Field(ge=0)
    tokens: list[int] | None = None
    text: list[str] | None = None
    values: str | None = None  # base64 of `serialize_results` bytes: the step's values and list items
    items: list[int] = []  # which of those values are the items a saved list gained in the step


# -- writing ---------------------------------------------------------------------------------------
class _Encoder:
    """Turns values into tagged JSON, collecting tensors for the safetensors section."""

    def __init__(self, refs: bool = True, limit: int | None = None):
        self.refs = refs  # graph arguments hold refs; inputs and results never do
        self.limit = limit  # bytes of the encoded values (header and tensors), checked as they grow
        self.size = 0  # an upper bound on the header bytes encoded so far: each item, once per reference
        self.tensors: dict[str, torch.Tensor] = {}
        self._keys: dict[int, str] = {}  # id(tensor) -> key: one tensor object is stored once
        self._kept: list = []  # keeps those ids from being reused while we encode
        self._storages: set[int] = set()
        self.nbytes = 0  # of the tensors collected so far

    def encode(self, obj):
        kind = type(obj)
        if self.limit is not None:  # a value held by many references is written once per reference
            self.size += 16 + (len(obj) if kind is str else 0)
            if self.size + self.nbytes > self.limit:
                raise LimitError(f"the reply would be over {self.limit} bytes (max_result_bytes), counting "
                                 "each value once per place it is held; save less")
        if obj is None or kind is bool or kind is int or kind is str:
            return obj
        if kind is float:
            return obj if math.isfinite(obj) else {"float": repr(obj)}
        if kind is Ref and self.refs:
            return {"ref": obj.index}
        if kind is tuple or kind is list:
            return {kind.__name__: [self.encode(item) for item in obj]}
        if kind is dict:
            if any(type(key) not in (str, int) for key in obj):
                raise SerializationError(f"dict keys must be str or int: {_short(list(obj))}")
            # pairs, not a JSON object: JSON would turn int keys into strings
            return {"dict": [[key, self.encode(item)] for key, item in obj.items()]}
        if kind is slice:
            return {"slice": [self.encode(obj.start), self.encode(obj.stop), self.encode(obj.step)]}
        if obj is Ellipsis:
            return {"ellipsis": None}
        if kind is torch.dtype:
            return {"dtype": str(obj).removeprefix("torch.")}
        if kind is torch.device:
            return {"device": str(obj)}
        if kind is torch.Size:
            return {"size": list(obj)}
        if isinstance(obj, torch.Tensor):
            return {"tensor": self._tensor(obj)}
        if _is_model_output(obj):  # a Hugging Face model's output: its class's name, then its fields
            return {"output": [kind.__name__, [[key, None if _is_cache(value) else self.encode(value)]
                                               for key, value in obj.items()]]}
        if _is_cache(obj):
            raise SerializationError(f"a {kind.__name__} (the model's key/value cache) cannot be sent: save the "
                                     "tensors you need from it instead")
        raise SerializationError(f"cannot serialize a value of type {kind.__module__}.{kind.__qualname__}")

    def call(self, args, kwargs) -> tuple[list, dict]:
        if any(type(key) is not str for key in kwargs):
            raise SerializationError("keyword argument names must be str")
        return [self.encode(a) for a in args], {k: self.encode(v) for k, v in kwargs.items()}

    def _tensor(self, tensor: torch.Tensor) -> str:
        key = self._keys.get(id(tensor))
        if key is not None:
            return key
        if tensor.layout != torch.strided or tensor.is_quantized or tensor.device.type == "meta":
            raise SerializationError(f"cannot serialize a {tensor.layout} {tensor.dtype} tensor on {tensor.device}")
        size = tensor.numel() * tensor.element_size()  # before a view (an expand) is made contiguous
        if self.limit is not None and self.size + self.nbytes + size > self.limit:
            raise LimitError(f"the results hold {self.nbytes + size} bytes of tensors, over the limit of "
                             f"{self.limit} (max_result_bytes); save less")
        data = tensor.detach().contiguous()
        # safetensors refuses tensors that share storage: store such views as copies
        if data.untyped_storage().data_ptr() in self._storages and data.numel():
            data = data.clone()
        self._storages.add(data.untyped_storage().data_ptr())
        key = self._keys[id(tensor)] = str(len(self.tensors))
        self.tensors[key] = data.cpu()
        self.nbytes += data.numel() * data.element_size()
        self._kept.append(tensor)
        return key

    def frame(self, magic: bytes, header: dict, count: int, compress: bool, flags: int = 0) -> bytes:
        """The prefix (the header's version), and the body."""
        text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
        try:
            section = safetensors.torch.save(self.tensors) if self.tensors else b""
        except Exception as error:  # a dtype safetensors has no code for (complex32, ...)
            raise SerializationError(f"cannot store the tensors: {error}") from None
        body = _LENGTH.pack(len(text)) + text + section
        if compress:
            body, flags = zstandard.ZstdCompressor(level=3).compress(body), flags | _ZSTD
        return _PREFIX.pack(magic, header["version"], flags, count) + body


def _where(node: Node) -> str:
    at = f" at {describe_location(node.location, read_source=False)}" if node.location else ""
    return f"node %{node.index} ({node.op}{at})"


def _encode_target(node: Node, trusted: bool):
    target = node.target
    if target is None or type(target) is str:
        return target
    if not callable(target):
        raise SerializationError(f"cannot serialize a target of type {type(target).__name__}")
    name = ops.name_of(target)
    if name is not None:
        return name
    if not trusted:
        raise SerializationError(
            f"its target {getattr(target, '__qualname__', target)!r} is a Python function, not an "
            "operation of the allow-list (interlace.ops), so the graph cannot travel as data. Use torch, "
            "operator or Tensor operations instead, or serialize with trusted=True (the receiver must "
            "load with trusted=True as well, and a server only accepts that when started with --trusted).")
    try:
        return {"pickle": base64.b64encode(cloudpickle.dumps(target)).decode()}
    except Exception as error:
        raise SerializationError(f"cloudpickle cannot pickle its target: {error}") from None


def serialize_request(request: Request, *, trusted: bool = False, compress: bool = False,
                      version: int = VERSION) -> bytes:
    """The bytes of a request: the graph, and each trace's span, invokes and options.

    version: the newest the receiver reads; version 2 is written only when the graph has repeated
    blocks (`Graph.repeats`), whose copies are then left out (the receiver makes them).
    """
    if version not in SUPPORTED_VERSIONS:
        raise VersionError(f"cannot write wire format version {version}; this interlace writes version "
                           f"{' or '.join(map(str, SUPPORTED_VERSIONS))}")
    graph = request.graph
    if version < 2:
        graph.make_copies()  # (every node is listed)
    repeats = graph.intact_repeats() if version >= 2 and graph.repeats else []
    encoder, nodes, flags = _Encoder(), [], 0
    for node in _unrepeated(graph.nodes, repeats):
        try:
            target = _encode_target(node, trusted)
            item = {"index": node.index, "op": node.op}
            # fields at their defaults are left out: a smaller header parses faster
            if target is not None:
                item["target"] = target
                flags |= _PICKLED if type(target) is dict else 0
            if node.args or node.kwargs:
                item["args"], item["kwargs"] = encoder.call(node.args, node.kwargs)
            if node.location:
                item["location"] = list(node.location)
            if node.guard is not None:
                item["guard"] = node.guard
            if node.saved:
                item["saved"] = True
        except SerializationError as error:
            raise SerializationError(f"{_where(node)}: {error}").at(node) from None
        except RecursionError:
            raise SerializationError(f"{_where(node)}: its arguments are nested too deeply (or contain themselves)").at(node) from None
        nodes.append(item)
    try:
        check_structure(graph, trusted=trusted, repeats=repeats)
    except GraphError as error:  # (the user's own graph, checked where it was written: quote their lines)
        quoted = GraphError(quote_sources(str(error)))
        quoted.node = error.node
        raise quoted from None
    traces = []
    for number, trace in enumerate(request.traces):
        invokes = []
        encoder.refs = True  # (a session's trace may take an earlier node's value as its input)
        for invoke, (args, kwargs) in enumerate(trace.invokes):
            try:
                args, kwargs = encoder.call(args, kwargs)
            except (SerializationError, RecursionError) as error:
                raise SerializationError(f"input of invoke {invoke}: {error}") from None
            invokes.append({"args": args, "kwargs": kwargs})
        encoder.refs = False
        try:
            options = encoder.call((), trace.options)[1]
        except (SerializationError, RecursionError) as error:
            raise SerializationError(f"options of trace {number}: {error}") from None
        traces.append({"start": trace.start, "end": trace.end, "invokes": invokes, "options": options})
    header = {"version": 1, "nodes": nodes, "traces": traces}
    if repeats:
        header["version"] = 2
        header["repeats"] = [{"start": r.start, "end": r.end, "copies": [list(c) for c in r.copies]} for r in repeats]
    return encoder.frame(GRAPH_MAGIC, header, len(graph), compress, flags)


def _unrepeated(nodes, repeats):
    """The nodes but those of the copies in `repeats`: what a version 2 header lists."""
    position = 0
    for first, stop in copied_spans(repeats):
        yield from nodes[position:first]
        position = stop
    yield from nodes[position:]


def serialize_graph(graph: Graph, invokes=(), *, options: dict | None = None, trusted: bool = False,
                    compress: bool = False) -> bytes:
    """The bytes of `graph` run as one trace on `invokes` (each an `(args, kwargs)` pair)."""
    trace = TraceSpec(0, len(graph), list(invokes), dict(options or {}))
    return serialize_request(Request(graph, [trace]), trusted=trusted, compress=compress)


def serialize_results(values: dict, logs=(), *, compress: bool = False, graph: Graph | None = None,
                      limits: Limits | None = None) -> bytes:
    """The bytes of a run's results: {node index: saved value} and `(node index, values)` logs.

    Values only, never callables. `limits.max_result_bytes` bounds the tensors sent back; errors name
    the node (with its location when `graph` is given).
    """
    limits = limits or Limits()
    encoder, items = _Encoder(refs=False, limit=limits.max_result_bytes), []

    def fail(index, message, error=LimitError):
        node = graph[index] if graph is not None and 0 <= index < len(graph) else None
        where = _where(node) if node is not None else f"node %{index}"
        raised = error(f"value of {where}: {message}")
        if error is SerializationError:  # (not the request's bytes: a value the run saved)
            raised.hint = "save tensors and plain values (numbers, strings, lists, tuples and dicts of them)"
        return raised.at(node) if node is not None else raised

    for index, value in values.items():
        if type(index) is not int or index < 0:
            raise SerializationError(f"result keys must be node indices (int >= 0), not {index!r}")
        try:
            items.append([index, encoder.encode(value)])
        except LimitError as error:
            raise fail(index, str(error)) from None
        except (SerializationError, RecursionError) as error:
            raise fail(index, str(error) if isinstance(error, SerializationError) else "nested too deeply",
                       SerializationError) from None
    encoded_logs = []
    for index, logged in logs:  # counted in the reply like values
        try:
            encoded_logs.append([index, [encoder.encode(value) for value in logged]])
        except LimitError as error:
            raise fail(index, f"its log line: {error}") from None
        except (SerializationError, RecursionError):
            encoded_logs.append([index, [_short(logged)]])  # a log line is text to its reader
    header = {"version": 1, "values": items, "logs": encoded_logs}
    frame = encoder.frame(VALUES_MAGIC, header, len(items), compress)
    if len(frame) > limits.max_result_bytes:
        raise LimitError(f"the reply is {len(frame)} bytes, over the limit of {limits.max_result_bytes} "
                         "(max_result_bytes); save or log less")
    return frame


def serialize_step(step: Step, *, graph: Graph | None = None, limits: Limits | None = None) -> dict:
    """A `Step` as the JSON of a `step` event: tokens and text as lists, values in the wire format."""
    saved = {**step.values, **step.items}
    values = serialize_results(saved, graph=graph, limits=limits) if saved else None
    return StepEvent(step=step.index, tokens=None if step.tokens is None else step.tokens.tolist(), text=step.text,
                     values=None if values is None else base64.b64encode(values).decode("ascii"),
                     items=sorted(step.items)).model_dump()


def _is_model_output(obj) -> bool:
    if not type(obj).__module__.startswith("transformers."):
        return False
    from transformers.utils import ModelOutput

    return isinstance(obj, ModelOutput)


def _is_cache(obj) -> bool:
    if not type(obj).__module__.startswith("transformers."):
        return False
    from transformers.cache_utils import Cache

    return isinstance(obj, Cache)


def _model_output(name: str, fields: dict):
    """The output class `name` of `transformers.modeling_outputs` holding `fields`; a dict for a class not
    there (a model's own output class): a name in the data never picks anything else to build."""
    from transformers import modeling_outputs
    from transformers.utils import ModelOutput

    kind = getattr(modeling_outputs, name, None)
    if isinstance(kind, type) and issubclass(kind, ModelOutput) and kind.__module__ == modeling_outputs.__name__:
        try:
            return kind(**fields)
        except TypeError:  # fields of another transformers version
            pass
    return fields


# -- reading ---------------------------------------------------------------------------------------
class _Decoder:
    """Tagged JSON -> values, within the limits; remembers which tensors were referred to."""

    def __init__(self, tensors: dict, limits: Limits):
        self.tensors, self.limits = tensors, limits
        self.used: set[str] = set()
        # the strings of a graph are bounded by max_string_length; an invoke's, its prompts, by max_prompt_length
        self.strings = (limits.max_string_length, "max_string_length")

    @contextlib.contextmanager
    def prompts(self):
        """Decode an invoke's inputs: its strings are prompts, whose length in tokens a run bounds (max_tokens)."""
        self.strings = (self.limits.max_prompt_length, "max_prompt_length")
        try:
            yield
        finally:
            self.strings = (self.limits.max_string_length, "max_string_length")

    def decode(self, obj, limit, depth: int = 0):
        """Decode tagged JSON; refs must point below `limit` (None: refs are not allowed here)."""
        kind = type(obj)
        if obj is None or kind is bool or kind is float:
            return obj
        if kind is int:
            if obj.bit_length() > self.limits.max_int_bits:
                raise LimitError(f"an int of {obj.bit_length()} bits is over the limit of "
                                 f"{self.limits.max_int_bits} (max_int_bits)")
            return obj
        if kind is str:
            return self.text(obj)
        if depth >= self.limits.max_depth:
            raise LimitError(f"a value is nested more than {self.limits.max_depth} levels deep (max_depth)")
        tag, body = next(iter(obj.items())) if kind is dict and len(obj) == 1 else (None, None)
        if tag == "ref":
            if limit is None:
                raise SerializationError("a ref is not allowed here")
            if type(body) is not int or not 0 <= body < limit:
                raise SerializationError(f"ref {_short(body)} does not point to an earlier node "
                                         + (f"(0..{limit - 1})" if limit else "(there is none here)"))
            return Ref(body)
        if tag in ("tuple", "list", "slice", "size", "dict") and type(body) is list:
            if len(body) > self.limits.max_list_length:
                raise LimitError(f"a {tag} of {len(body)} items is over the limit of "
                                 f"{self.limits.max_list_length} (max_list_length)")
            if tag == "dict":
                if not all(type(p) is list and len(p) == 2 and type(p[0]) in (str, int) for p in body):
                    raise SerializationError("dict entries must be [str or int key, value] pairs")
                return {self.decode(key, None, depth + 1): self.decode(value, limit, depth + 1) for key, value in body}
            if tag == "size" and all(type(n) is int and 0 <= n < 2**63 for n in body):
                return torch.Size(body)
            items = [self.decode(item, limit, depth + 1) for item in body]
            if tag == "slice" and len(items) == 3:
                return slice(*items)
            if tag in ("tuple", "list"):
                return tuple(items) if tag == "tuple" else items
        elif tag == "tensor" and type(body) is str:
            if body not in self.tensors:
                raise SerializationError(f"tensor {_short(body)} is missing from the tensor section")
            self.used.add(body)
            return self.tensors[body]
        elif tag == "dtype":
            if type(body) is not str or body not in _DTYPES:
                raise SerializationError(f"invalid dtype name {_short(body)}")
            return _DTYPES[body]
        elif tag == "device" and type(body) is str:
            try:
                return torch.device(self.text(body))
            except RuntimeError:
                raise SerializationError(f"invalid device {_short(body)}") from None
        elif tag == "float" and type(body) is str and body in _FLOATS:
            return _FLOATS[body]
        elif tag == "ellipsis" and body is None:
            return Ellipsis
        elif tag == "output" and type(body) is list and len(body) == 2 and type(body[0]) is str and type(body[1]) is list:
            fields = self.decode({"dict": body[1]}, limit, depth)  # (its fields: a dict's pairs, checked as one)
            if all(type(key) is str for key in fields):
                return _model_output(self.text(body[0]), fields)
        raise SerializationError(f"unrecognized value {_short(obj)}")

    def text(self, value: str) -> str:
        most, name = self.strings
        if len(value) > most:
            raise LimitError(f"a string of {len(value)} characters is over the limit of {most} ({name})")
        return value

    def check_all_used(self) -> None:
        unused = set(self.tensors) - self.used
        if unused:
            raise SerializationError(f"the tensor section holds {len(unused)} tensor(s) the header never refers "
                                     f"to ({_short(sorted(unused))}); a valid frame carries only what it uses")


_REPR = reprlib.Repr()  # bounded depth (maxlevel 6): no RecursionError on deeply nested lists
_REPR.maxstring = _REPR.maxother = 60


def log_text(values) -> str:
    """One `log` line as text, as `print` would write it; a value too deep for `str` is shortened."""
    try:
        return " ".join(map(str, values))
    except RecursionError:
        return " ".join(map(_short, values))


def _short(obj) -> str:
    text = _REPR.repr(obj)
    return text if len(text) <= 80 else text[:77] + "..."


class _Body:
    """The frame's body, read in order; decompressed as a stream when zstd, never past a limit."""

    def __init__(self, data: memoryview, compressed: bool):
        self.data, self.offset = data, 0
        self.stream = zstandard.ZstdDecompressor().stream_reader(data) if compressed else None

    def read(self, size: int) -> bytes:
        if self.stream is None:
            chunk = self.data[self.offset : self.offset + size]
            self.offset += len(chunk)
            return bytes(chunk)
        data = bytearray()  # grows in place: the bytes are held once, up to the limit
        try:
            while len(data) < size:
                chunk = self.stream.read(min(size - len(data), 1 << 20))
                if not chunk:
                    break
                data += chunk
        except zstandard.ZstdError as error:
            raise SerializationError(f"invalid zstd data: {error}") from None
        return bytes(data) if len(data) < (1 << 20) else data


def declared_nodes(data: bytes) -> int | None:
    """The node count a request's prefix declares (copies included), or None where there is no prefix to read:
    what reading and checking the request will cost, known before any of it is parsed."""
    if len(data) < _PREFIX.size or bytes(data[:3]) != GRAPH_MAGIC:
        return None
    return _PREFIX.unpack_from(data)[3]


def _unframe(data, magic: bytes, what: str, trusted: bool, limits: Limits, count_limit: int, versions=(1,)):
    """Check the prefix and the limits; returns (version, count, JSON header bytes, tensors)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SerializationError(f"expected bytes, got {type(data).__name__}")
    data = memoryview(data).cast("B")  # slices below are views: a large tensor is not copied twice
    if len(data) > limits.max_frame_bytes:
        raise LimitError(f"{len(data)} bytes is over the limit of {limits.max_frame_bytes} (max_frame_bytes)")
    if data[:3] != magic:
        raise SerializationError(f"not an interlace {what}: expected magic {magic!r}, got {bytes(data[:3])!r}")
    if len(data) < 5:
        raise SerializationError(f"truncated {what}: the prefix is incomplete")
    version, flags = data[3], data[4]
    if version not in versions:
        newer = "newer" if version > max(versions) else "older"
        raise VersionError(
            f"this {what} uses wire format version {version}, but this interlace reads version "
            f"{' or '.join(map(str, versions))}: the sender's interlace is {newer}; use the same "
            "interlace version on both sides")
    if len(data) < _PREFIX.size:
        raise SerializationError(f"truncated {what}: the prefix is incomplete")
    count = _PREFIX.unpack_from(data)[3]
    if flags & ~(_ZSTD | _PICKLED):
        raise SerializationError(f"unknown flags {flags:#04x} in the {what} prefix")
    if flags & _PICKLED and not trusted:
        raise SerializationError(f"this {what} holds pickled Python functions (made with trusted=True); "
                                 "load it with trusted=True only if you trust its sender")
    if count > count_limit:
        raise LimitError(f"the {what} has {count} {'nodes' if what == 'graph' else 'values'}, over the limit "
                         f"of {count_limit} (max_nodes)")
    body = _Body(data[_PREFIX.size:], bool(flags & _ZSTD))
    length = body.read(_LENGTH.size)
    if len(length) < _LENGTH.size:
        raise SerializationError(f"truncated {what}: no header length")
    (length,) = _LENGTH.unpack(length)
    follow = len(data) - _PREFIX.size - _LENGTH.size
    if body.stream is None and length > follow:  # a frame that lies about itself is malformed, not large
        raise SerializationError(f"truncated {what}: header length {length} is larger than the {follow} bytes "
                                 "that follow")
    if length > limits.max_header_bytes:
        raise LimitError(f"the header is {length} bytes, over the limit of {limits.max_header_bytes} (max_header_bytes)")
    text = body.read(length)
    if len(text) < length:
        raise SerializationError(f"truncated {what}: header length {length} is larger than the {len(text)} bytes that follow")
    section = body.read(limits.max_tensor_bytes + 1)
    if len(section) > limits.max_tensor_bytes:
        raise LimitError(f"the tensor section is over the limit of {limits.max_tensor_bytes} bytes (max_tensor_bytes)")
    tensors = safetensors.torch.load(bytes(section)) if section else {}
    return version, count, text, tensors


def _guarded(load):
    """Every failure of a loader becomes an interlace error: a server must never crash on input."""
    @functools.wraps(load)
    def wrapper(data, **options):
        try:
            return load(data, **options)
        except InterlaceError:
            raise
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()[:3])
            raise SerializationError(f"invalid header: {problems}") from None
        except MemoryError:
            raise LimitError("the data needs more memory than this process has") from None
        except Exception as error:  # safetensors, recursion, ...: malformed bytes
            raise SerializationError(f"malformed interlace data: {type(error).__name__}: {_short(str(error))}") from None
    return wrapper


@_guarded
def deserialize_request(data: bytes, *, trusted: bool = False, limits: Limits | None = None,
                        make_copies: bool = True) -> Request:
    """A `Request` from `serialize_request` bytes; refuses pickled functions unless `trusted`.

    make_copies=False leaves the copies of repeated blocks to `Graph.make_copies` (`Graph.add_copy_later`):
    a server's front checks the request and hands it to the process that runs it."""
    limits = limits or Limits()
    version, count, text, tensors = _unframe(data, GRAPH_MAGIC, "graph", trusted, limits, limits.max_nodes,
                                             SUPPORTED_VERSIONS)
    _check_int_literals(text, limits)
    header = Header.model_validate_json(text)
    if header.version != version:
        raise SerializationError(f"the prefix says version {version} but the header {header.version}")
    if len(header.traces) > limits.max_traces:
        raise LimitError(f"the request has {len(header.traces)} traces, over the limit of {limits.max_traces} (max_traces)")
    copies = _copies(header, count, limits)
    decoder, graph = _Decoder(tensors, limits), Graph()
    for model in header.nodes:
        _add_copies(graph, copies, trusted, make_copies)  # the copies of repeated blocks fill the gaps between listed nodes
        position = len(graph)
        node = Node(position, model.op, location=model.location)
        try:
            if model.index != position:
                raise SerializationError(f"has index {model.index}; nodes must be numbered in order"
                                         + (" (the copies of repeated blocks are not listed)" if copies else ""))
            if model.op not in OPS:
                raise GraphError(f"unknown op kind {model.op[:64]!r}; the op kinds are {', '.join(sorted(OPS))}")
            args = tuple([decoder.decode(a, position) for a in model.args])
            kwargs = {decoder.text(k): decoder.decode(v, position) for k, v in model.kwargs.items()}
            location = model.location and (decoder.text(model.location[0]), model.location[1])
            target = model.target
            if type(target) is str:
                decoder.text(target)
            elif type(target) is dict:
                if not trusted:
                    raise SerializationError("its target is a pickled Python function; that needs trusted=True")
                target = cloudpickle.loads(base64.b64decode(target["pickle"], validate=True))
        except InterlaceError as error:
            raise type(error)(f"{_where(node)}: {error}").at(node) from None
        check_node(graph.add(model.op, target, args, kwargs, location, model.guard, model.saved), graph.nodes, trusted)
    _add_copies(graph, copies, trusted, make_copies)
    if len(graph) != count:
        raise SerializationError(f"the prefix says {count} nodes but the header holds {len(graph)}"
                                 + (" (with the copies of its repeated blocks)" if copies else ""))
    graph.repeats = [Repeat(r.start, r.end, tuple(r.copies)) for r in header.repeats]
    traces = []
    for number, trace in enumerate(header.traces):
        try:
            if not trace.start <= trace.end <= len(graph) or traces and trace.start != traces[-1].end:
                raise SerializationError(f"span {trace.start}..{trace.end} does not follow the previous trace")
            # an input may be the value of a node before the trace (a session's value)
            with decoder.prompts():
                invokes = [(tuple([decoder.decode(a, trace.start) for a in invoke.args]),
                            {decoder.text(k): decoder.decode(v, trace.start) for k, v in invoke.kwargs.items()})
                           for invoke in trace.invokes]
            options = _checked_options({decoder.text(k): decoder.decode(v, None) for k, v in trace.options.items()})
        except InterlaceError as error:
            raise type(error)(f"trace {number}: {error}") from None
        traces.append(TraceSpec(trace.start, trace.end, invokes, options))
    if not traces or traces[-1].end != len(graph):
        raise SerializationError("the traces must cover every node of the graph, in order")
    decoder.check_all_used()
    graph.checked = 0 if trusted else len(graph)  # (a trusted decode allows functions an untrusted run refuses)
    return Request(graph, traces)


def _add_copies(graph: Graph, copies: dict, trusted: bool, make: bool) -> None:
    """The copies that start where `graph` ends (made, or left to `Graph.make_copies`). Their templates were
    checked as they were read: a block's copies are checked by the first one's first node, which holds its
    step (validate.py says why the others need no check), so that one is made here in any case."""
    while len(graph) in copies:
        start, end, calls, value, leading = copies[len(graph)]
        if make or leading:
            first = graph.add_copy(start, end, calls, value)
            if leading:
                check_node(graph.nodes[first], graph.nodes, trusted)
        else:
            graph.add_copy_later(start, end)


def _copies(header: Header, count: int, limits: Limits) -> dict[int, tuple]:
    """{first node: (start, end, calls, value, whether it is its block's first copy)} of every copy of a
    repeated block, checked by arithmetic before any is made: a template before its copies and in no copy,
    copies in order and apart, call shifts within max_new_tokens, and the nodes they make within max_nodes
    and the prefix's count."""
    if header.version < 2 and "repeats" in header.model_fields_set:
        raise SerializationError("a version 1 header has no repeats (repeated blocks need version 2)")
    copies: dict[int, tuple] = {}
    total = len(header.nodes)
    for number, repeat in enumerate(header.repeats):
        where = f"repeat {number} (template nodes {repeat.start}..{repeat.end})"
        size = repeat.end - repeat.start
        if size <= 0:
            raise GraphError(f"{where}: its template is empty (end must be greater than start)")
        if not repeat.copies:
            raise GraphError(f"{where}: it has no copies")
        follows = repeat.end  # where the next copy may start at the earliest
        for number, (first, calls, value) in enumerate(repeat.copies):
            if first < follows:
                raise GraphError(f"{where}: its copy at node {first} overlaps its template or the copy before it; "
                                 f"copies follow their template in order, each {size} nodes long")
            if not 0 <= calls <= limits.max_new_tokens:
                raise GraphError(f"{where}: its copy at node {first} moves module calls by {calls}; a shift is "
                                 f"0 to {limits.max_new_tokens} (max_new_tokens)")
            if value.bit_length() > limits.max_int_bits:
                raise LimitError(f"{where}: the step of its copy at node {first} is over {limits.max_int_bits} "
                                 "bits (max_int_bits)")
            total += size
            if total > limits.max_nodes:
                raise LimitError(f"the repeated blocks make the graph over {limits.max_nodes} nodes (max_nodes)")
            copies[first] = (repeat.start, repeat.end, calls, value, number == 0)
            follows = first + size
    if total != count:
        raise SerializationError(f"the prefix says {count} nodes but the header holds {total} (its listed nodes "
                                 "and the copies of its repeated blocks)")
    spans = copied_spans(header.repeats)  # (the header's repeats serve as Repeats: start, end, copies)
    for (_, stop), (first, _) in zip(spans, spans[1:]):
        if first < stop:
            raise GraphError(f"copies of repeated blocks overlap at node {first}")
    for number, repeat in enumerate(header.repeats):
        inside = bisect.bisect_right(spans, (repeat.end, -1)) - 1  # the last copy starting before the template ends
        if inside >= 0 and spans[inside][1] > repeat.start:
            raise GraphError(f"repeat {number}: its template (nodes {repeat.start}..{repeat.end}) overlaps a copy "
                             "of a repeated block; a template is made of listed nodes")
    if spans and spans[-1][1] > count:
        raise GraphError(f"a copy of a repeated block ends at node {spans[-1][1]}, past the graph's {count} nodes")
    return copies


def _check_int_literals(text, limits: Limits) -> None:
    """Refuse an int literal longer than `max_int_bits` allows before parsing: reading one is quadratic in its digits."""
    digits = math.ceil(limits.max_int_bits * math.log10(2)) + 1
    found = re.search(rb"[\[,:]\s*-?\d{%d}" % (digits + 1), text)
    if found:
        raise LimitError(f"an int literal at byte {found.start()} of the header has more than {digits} digits, over "
                         f"the limit of {limits.max_int_bits} bits (max_int_bits)")


# the options of a trace and the type each must have
_OPTIONS = {"mode": str, "kwargs": dict, "early_stop": bool}
_MODES = ("trace", "generate", "session")


def _checked_options(options: dict) -> dict:
    """A trace's options, each of a known name and type, before anything uses them."""
    for name, value in options.items():
        kind = _OPTIONS.get(name)
        if kind is None:
            raise SerializationError(f"unknown trace option {name!r}; the options are {', '.join(_OPTIONS)}")
        if type(value) is not kind:
            raise SerializationError(f"trace option {name!r} must be a {kind.__name__}, not {_short(value)}")
    if options.get("mode", "trace") not in _MODES:
        raise SerializationError(f"trace option 'mode' must be one of {', '.join(_MODES)}, not {_short(options['mode'])}")
    if any(type(key) is not str for key in options.get("kwargs", {})):
        raise SerializationError("the keys of trace option 'kwargs' must be str")
    return options


def deserialize_graph(data: bytes, *, trusted: bool = False, limits: Limits | None = None):
    """(Graph, invokes) from `serialize_graph` bytes (a request with one trace)."""
    request = deserialize_request(data, trusted=trusted, limits=limits)
    if len(request.traces) != 1:
        raise SerializationError(f"expected one trace, found {len(request.traces)}: use deserialize_request")
    return request.graph, request.traces[0].invokes


@_guarded
def deserialize_results(data: bytes, *, limits: Limits | None = None) -> tuple[dict, list]:
    """({node index: value}, [(node index, logged values)]) from `serialize_results` bytes."""
    limits = limits or Limits()
    _, count, text, tensors = _unframe(data, VALUES_MAGIC, "result", False, limits, limits.max_nodes)
    header = ValuesHeader.model_validate_json(text)
    if len(header.values) != count:
        raise SerializationError(f"the prefix says {count} values but the header holds {len(header.values)}")
    decoder = _Decoder(tensors, limits)
    values = {index: decoder.decode(value, None) for index, value in header.values}
    logs = [(index, tuple(decoder.decode(value, None) for value in logged)) for index, logged in header.logs]
    decoder.check_all_used()
    return values, logs


def deserialize_step(data: dict, *, limits: Limits | None = None) -> Step:
    """The `Step` of a `step` event's JSON, checked as results are."""
    try:
        event = StepEvent.model_validate(data)
    except ValidationError as error:
        raise SerializationError(f"a step event is malformed: {error}") from None
    values = {}
    if event.values is not None:
        try:
            data = base64.b64decode(event.values, validate=True)
        except ValueError:
            raise SerializationError("a step event's values are not base64") from None
        values, _ = deserialize_results(data, limits=limits)
    items = {index: values.pop(index) for index in event.items if index in values}
    tokens = None if event.tokens is None else torch.tensor(event.tokens, dtype=torch.long)
    return Step(event.step, tokens, event.text, values, items)
