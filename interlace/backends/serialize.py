"""The wire format of a graph with its invokes' inputs, and of a results dict.

This module owns the bytes a client sends and a server returns:

    magic (b"ILG" graph, b"ILR" results) + version byte + flags byte, then a body
    (zstd-compressed when the flags say so): 8-byte little-endian header length, JSON header,
    safetensors section holding every tensor the header refers to.

The header is checked by the pydantic models below. Values inside it are tagged JSON (`{"ref": 3}`,
`{"tuple": [...]}`, `{"tensor": "0"}`, ...). Callables travel as registry names; a user function
travels only in trusted mode (cloudpickle). Loading never unpickles unless the caller says
`trusted=True`, and any malformed input is a `SerializationError`, never a crash.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import struct
from typing import Any, Literal

import cloudpickle
import safetensors.torch
import torch
import zstandard
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .. import ops
from ..errors import SerializationError
from ..graph import OPS, Graph, Node, Ref

GRAPH_MAGIC, VALUES_MAGIC = b"ILG", b"ILR"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAX_BYTES = 1 << 30
MAX_NODES = 1_000_000
_ZSTD, _PICKLED = 1, 2  # flag bits; _PICKLED lets a loader refuse before parsing anything
_LENGTH = struct.Struct("<Q")
_PATH_OPS = frozenset({"module_value", "parameter", "module_call", "skip"})
_DTYPES = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)}
_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


# -- the header schema -----------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class NodeModel(_Strict):
    index: int = Field(ge=0)
    op: str
    # a module path, registry name or method name; {"registry": name} for a registry callable
    # held as an object; {"pickle": base64} for a user callable (trusted graphs only)
    target: str | dict[str, str] | None = None
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    location: tuple[str, int] | None = None
    guard: int | None = None

    @field_validator("op")
    @classmethod
    def _known_op(cls, op: str) -> str:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; known ops: {', '.join(sorted(OPS))}")
        return op


class InvokeModel(_Strict):
    args: list[Any] = []
    kwargs: dict[str, Any] = {}


class Header(_Strict):
    version: Literal[1]
    nodes: list[NodeModel]
    invokes: list[InvokeModel] = []


class ValuesHeader(_Strict):
    version: Literal[1]
    values: list[tuple[int, Any]]


# -- writing ---------------------------------------------------------------------------------------
class _Encoder:
    """Turns values into tagged JSON, collecting tensors for the safetensors section."""

    def __init__(self, refs: bool = True):
        self.refs = refs  # graph arguments hold refs; inputs and results never do
        self.tensors: dict[str, torch.Tensor] = {}
        self._keys: dict[int, str] = {}  # id(tensor) -> key: one tensor object is stored once
        self._kept: list = []  # keeps those ids from being reused while we encode
        self._storages: set[int] = set()

    def encode(self, obj):
        kind = type(obj)
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
        data = tensor.detach().contiguous()
        # safetensors refuses tensors that share storage: store such views as copies
        if data.untyped_storage().data_ptr() in self._storages and data.numel():
            data = data.clone()
        self._storages.add(data.untyped_storage().data_ptr())
        key = self._keys[id(tensor)] = str(len(self.tensors))
        self.tensors[key] = data
        self._kept.append(tensor)
        return key

    def frame(self, magic: bytes, header: dict, compress: bool, flags: int = 0) -> bytes:
        text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
        try:
            section = safetensors.torch.save(self.tensors) if self.tensors else b""
        except Exception as error:  # a dtype safetensors has no code for (complex32, ...)
            raise SerializationError(f"cannot store the tensors: {error}") from None
        body = _LENGTH.pack(len(text)) + text + section
        if compress:
            body, flags = zstandard.ZstdCompressor(level=3).compress(body), flags | _ZSTD
        return magic + bytes([VERSION, flags]) + body


def _where(node: Node) -> str:
    at = f" at {node.location[0]}:{node.location[1]}" if node.location else ""
    return f"node %{node.index} ({node.op}{at})"


def _encode_target(node: Node, trusted: bool):
    target = node.target
    if target is None or type(target) is str:
        return target
    if not callable(target):
        raise SerializationError(f"cannot serialize a target of type {type(target).__name__}")
    name = ops.name_of(target)
    if name is not None:
        return {"registry": name}
    if not trusted:
        raise SerializationError(
            f"its target {getattr(target, '__qualname__', target)!r} is a Python function, not a "
            "registry operation, so the graph cannot travel as data. Use torch, operator or Tensor "
            "operations instead, or serialize with trusted=True (the receiver must load with "
            "trusted=True as well, and a server only accepts that when started in trusted mode).")
    try:
        return {"pickle": base64.b64encode(cloudpickle.dumps(target)).decode()}
    except Exception as error:
        raise SerializationError(f"cloudpickle cannot pickle its target: {error}") from None


def serialize_graph(graph: Graph, invokes=(), *, trusted: bool = False, compress: bool = False) -> bytes:
    """The bytes of `graph` and of each invoke's `(args, kwargs)` inputs."""
    encoder, nodes, flags = _Encoder(), [], 0
    for node in graph.nodes:
        try:
            target = _encode_target(node, trusted)
            _check_node(node.op, target, node.args, trusted)
            item = {"index": node.index, "op": node.op}
            # fields at their defaults are left out: a smaller header parses faster
            if target is not None:
                item["target"] = target
                flags |= _PICKLED if type(target) is dict and "pickle" in target else 0
            if node.args or node.kwargs:
                item["args"], item["kwargs"] = encoder.call(node.args, node.kwargs)
            if node.location:
                item["location"] = list(node.location)
            if node.guard is not None:
                item["guard"] = node.guard
        except SerializationError as error:
            raise SerializationError(f"{_where(node)}: {error}") from None
        except RecursionError:
            raise SerializationError(f"{_where(node)}: its arguments are nested too deeply (or contain themselves)") from None
        nodes.append(item)
    encoder.refs, encoded = False, []
    for number, (args, kwargs) in enumerate(invokes):
        try:
            args, kwargs = encoder.call(args, kwargs)
        except (SerializationError, RecursionError) as error:
            raise SerializationError(f"input of invoke {number}: {error}") from None
        encoded.append({"args": args, "kwargs": kwargs})
    return encoder.frame(GRAPH_MAGIC, {"version": VERSION, "nodes": nodes, "invokes": encoded}, compress, flags)


def serialize_values(values: dict, *, compress: bool = False) -> bytes:
    """The bytes of a results dict {node index: value}; values only, never callables."""
    encoder, items = _Encoder(refs=False), []
    for index, value in values.items():
        if type(index) is not int or index < 0:
            raise SerializationError(f"result keys must be node indices (int >= 0), not {index!r}")
        try:
            items.append([index, encoder.encode(value)])
        except (SerializationError, RecursionError) as error:
            raise SerializationError(f"value of node %{index}: {error}") from None
    return encoder.frame(VALUES_MAGIC, {"version": VERSION, "values": items}, compress)


# -- the whitelist, checked in both directions -----------------------------------------------------
def _check_node(op: str, target, args, trusted: bool) -> None:
    """What a target may be for each op; `target` in its JSON form."""
    if op in _PATH_OPS:
        if type(target) is not str:
            raise SerializationError(f"op {op!r} needs a module path as its target, not {_short(target)}")
    elif op == "call_method":
        if type(target) is not str or not ops.allowed_method(target):
            raise SerializationError(f"method {_short(target)} is not an allowed method")
    elif op in ("call", "apply"):
        if type(target) is dict and list(target) == ["pickle"]:
            if not trusted:
                raise SerializationError("its target is a pickled Python function; that needs trusted=True")
            return
        name = target["registry"] if type(target) is dict and list(target) == ["registry"] else target
        if not ops.is_registered(name):
            raise SerializationError(f"{_short(name)} is not a registered operation")
        # getattr reaches any object from any value: untrusted graphs keep to public names
        if name == "builtins.getattr" and not trusted:
            attr = args[1] if len(args) > 1 else None
            if type(attr) is not str or not ops.allowed_attribute(attr):
                raise SerializationError(f"getattr of {_short(attr)} is refused: only public attribute names")
    elif target is not None:
        raise SerializationError(f"op {op!r} takes no target, got {_short(target)}")


# -- reading ---------------------------------------------------------------------------------------
class _Decoder:
    def __init__(self, tensors: dict):
        self.tensors = tensors

    def decode(self, obj, limit):
        """Decode tagged JSON; refs must point below `limit` (None: refs are not allowed here)."""
        kind = type(obj)
        if obj is None or kind is bool or kind is int or kind is str or kind is float:
            return obj
        tag, body = next(iter(obj.items())) if kind is dict and len(obj) == 1 else (None, None)
        if tag == "ref":
            if limit is None:
                raise SerializationError("a ref is not allowed here")
            if type(body) is not int or not 0 <= body < limit:
                raise SerializationError(f"ref {_short(body)} does not point to an earlier node (0..{limit - 1})")
            return Ref(body)
        if tag in ("tuple", "list", "slice", "size", "dict") and type(body) is list:
            if tag == "dict":
                if not all(type(p) is list and len(p) == 2 and type(p[0]) in (str, int) for p in body):
                    raise SerializationError("dict entries must be [str or int key, value] pairs")
                return {key: self.decode(value, limit) for key, value in body}
            if tag == "size" and all(type(n) is int and n >= 0 for n in body):
                return torch.Size(body)
            items = [self.decode(item, limit) for item in body]
            if tag == "slice" and len(items) == 3:
                return slice(*items)
            if tag in ("tuple", "list"):
                return tuple(items) if tag == "tuple" else items
        elif tag == "tensor" and type(body) is str:
            if body not in self.tensors:
                raise SerializationError(f"tensor {_short(body)} is missing from the tensor section")
            return self.tensors[body]
        elif tag == "dtype":
            if type(body) is not str or body not in _DTYPES:
                raise SerializationError(f"invalid dtype name {_short(body)}")
            return _DTYPES[body]
        elif tag == "device" and type(body) is str:
            try:
                return torch.device(body)
            except RuntimeError:
                raise SerializationError(f"invalid device {_short(body)}") from None
        elif tag == "float" and type(body) is str and body in _FLOATS:
            return _FLOATS[body]
        elif tag == "ellipsis" and body is None:
            return Ellipsis
        raise SerializationError(f"unrecognized value {_short(obj)}")


def _short(obj) -> str:
    text = repr(obj)
    return text if len(text) <= 80 else text[:77] + "..."


def _unframe(data, magic: bytes, what: str, trusted: bool, max_bytes: int):
    """Check the prefix and the limits; returns (JSON header bytes, tensors)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SerializationError(f"expected bytes, got {type(data).__name__}")
    data = memoryview(data).cast("B")  # slices below are views: a large tensor is not copied twice
    if len(data) > max_bytes:
        raise SerializationError(f"{len(data)} bytes is over the limit of {max_bytes} (max_bytes)")
    if data[:3] != magic:
        raise SerializationError(f"not an interlace {what}: expected magic {magic!r}, got {bytes(data[:3])!r}")
    if len(data) < 5:
        raise SerializationError(f"truncated {what}: the prefix is incomplete")
    version, flags, body = data[3], data[4], data[5:]
    if version not in SUPPORTED_VERSIONS:
        raise SerializationError(
            f"unsupported {what} format version {version}; this interlace reads versions "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}: use the same interlace version on both sides")
    if flags & ~(_ZSTD | _PICKLED):
        raise SerializationError(f"unknown flags {flags:#04x} in the {what} prefix")
    if flags & _PICKLED and not trusted:
        raise SerializationError(f"this {what} holds pickled Python functions (made with trusted=True); "
                                 "load it with trusted=True only if you trust its sender")
    if flags & _ZSTD:
        try:  # the frame must declare its size, so the limit holds before anything is allocated
            size = zstandard.frame_content_size(body)
            if size < 0 or size > max_bytes:
                raise SerializationError(f"zstd frame content size {size} is unknown or over the limit of {max_bytes}")
            body = memoryview(zstandard.ZstdDecompressor().decompress(body))
        except zstandard.ZstdError as error:
            raise SerializationError(f"invalid zstd data: {error}") from None
    if len(body) < _LENGTH.size:
        raise SerializationError(f"truncated {what}: no header length")
    (length,), rest = _LENGTH.unpack_from(body), len(body) - _LENGTH.size
    if length > rest:
        raise SerializationError(f"truncated {what}: header length {length} is larger than the {rest} bytes that follow")
    section = body[_LENGTH.size + length:]
    tensors = safetensors.torch.load(bytes(section)) if len(section) else {}
    return bytes(body[_LENGTH.size:_LENGTH.size + length]), tensors


def _guarded(load):
    """Every failure of a loader becomes a SerializationError: a server must never crash on input."""
    @functools.wraps(load)
    def wrapper(data, **options):
        try:
            return load(data, **options)
        except SerializationError:
            raise
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()[:3])
            raise SerializationError(f"invalid header: {problems}") from None
        except Exception as error:  # safetensors, recursion, ...: malformed bytes
            raise SerializationError(f"malformed interlace data: {type(error).__name__}: {error}") from None
    return wrapper


@_guarded
def deserialize_graph(data: bytes, *, trusted: bool = False, max_bytes: int = MAX_BYTES, max_nodes: int = MAX_NODES):
    """(Graph, invokes) from `serialize_graph` bytes; refuses pickled functions unless `trusted`."""
    text, tensors = _unframe(data, GRAPH_MAGIC, "graph", trusted, max_bytes)
    header = Header.model_validate_json(text)  # its size is bounded by max_bytes
    if len(header.nodes) > max_nodes:
        raise SerializationError(f"the graph has {len(header.nodes)} nodes, over the limit of {max_nodes} (max_nodes)")
    decoder, graph = _Decoder(tensors), Graph()
    for position, model in enumerate(header.nodes):
        try:
            if model.index != position:
                raise SerializationError(f"has index {model.index}; nodes must be numbered in order")
            args = tuple([decoder.decode(a, position) for a in model.args])
            kwargs = {k: decoder.decode(v, position) for k, v in model.kwargs.items()}
            _check_node(model.op, model.target, args, trusted)
            guard = model.guard
            if guard is not None and not (0 <= guard < position and graph.nodes[guard].op == "cond"):
                raise SerializationError(f"guard %{guard} is not an earlier cond node")
        except SerializationError as error:
            raise SerializationError(f"{_where(Node(position, model.op, location=model.location))}: {error}") from None
        target = model.target
        if type(target) is dict:
            registry = target.get("registry")
            # reached only when trusted: _check_node refuses pickled targets otherwise
            target = ops.resolve(registry) if registry else cloudpickle.loads(base64.b64decode(target["pickle"], validate=True))
        graph.add(model.op, target, args, kwargs, model.location, guard)
    invokes = [(tuple([decoder.decode(a, None) for a in invoke.args]),
                {k: decoder.decode(v, None) for k, v in invoke.kwargs.items()}) for invoke in header.invokes]
    return graph, invokes


@_guarded
def deserialize_values(data: bytes, *, max_bytes: int = MAX_BYTES) -> dict:
    """The results dict {node index: value} from `serialize_values` bytes."""
    text, tensors = _unframe(data, VALUES_MAGIC, "result", False, max_bytes)
    decoder = _Decoder(tensors)
    return {index: decoder.decode(value, None) for index, value in ValuesHeader.model_validate_json(text).values}
