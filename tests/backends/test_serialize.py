"""The wire format: every op and literal round-trips bit for bit, and bad bytes are clean errors."""

import inspect
import json
import math
import pickle
import random
import struct

import cloudpickle
import pytest
import torch
import transformers

import interlace
from interlace import GraphError, InterlaceError, LimitError, Model, SerializationError
from interlace.backends.limits import Limits
from interlace.backends.local import Interleaver
from interlace.backends.serialize import (
    _Decoder,
    deserialize_graph,
    deserialize_results,
    serialize_graph,
    serialize_results,
)
from interlace.errors import quote_sources
from interlace.graph import OPS, Graph, Ref

from helpers import same


# -- helpers ---------------------------------------------------------------------------------------
def rerun(net, graph, invokes):
    """Execute a (deserialized) graph on `net` the way a server would; returns its results."""
    sizes = [args[0].shape[0] for args, _ in invokes]
    rows = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(sizes))]
    batch = torch.cat([args[0] for args, _ in invokes])
    return Interleaver(graph, net.module, rows, sum(sizes)).run(lambda: net.module(batch))


def split(data: bytes):
    """(prefix, header dict, safetensors section) of uncompressed bytes."""
    (length,) = struct.unpack_from("<Q", data, 9)
    return data[:9], json.loads(data[17 : 17 + length]), data[17 + length :]


def pack(prefix: bytes, header, section: bytes = b"") -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return prefix + struct.pack("<Q", len(text)) + text + section


def tampered(data: bytes, change) -> bytes:
    """`data` with its JSON header changed in place by `change(header)`."""
    prefix, header, section = split(data)
    change(header)
    return pack(prefix, header, section)


def refused(data, match, error=SerializationError, **options):
    with pytest.raises(error, match=match) as info:
        deserialize_graph(data, **options)
    return str(info.value)


def double(t):
    return t * 2


# -- every op kind, through the public API ---------------------------------------------------------
def _basic(net, x, tracer):
    net.layers[1].output[:, 0] = net.layers[0].output[:, 1] * 2
    net.output.save()


def _swap(net, x, tracer):
    net.layers[0].output = net.layers[0].output * 0.5
    net.output.save()


def _skip(net, x, tracer):
    net.layers[1].skip(net.layers[0].output)
    net.output.save()


def _module_call(net, x, tracer):
    net.head(net.layers[0].output).save()


def _cond(net, x, tracer):
    with tracer.cond(net.layers[0].output.sum() > 0):
        net.layers[1].output[:] = 0
    with tracer.cond(net.layers[0].output.sum() < -1e9):
        net.layers[2].output[:] = 1
    net.output.save()


def _stop(net, x, tracer):
    net.layers[0].output.save()
    tracer.stop()


def _log(net, x, tracer):
    tracer.log("hidden", net.layers[0].output[0, :2])
    net.output.save()


def _grad(net, x, tracer):
    h = net.layers[1].output
    h.grad.save()
    net.output.sum().backward()


def _grad_swap(net, x, tracer):
    net.layers[1].output.grad = net.layers[1].output.grad * 0
    net.embed.output.grad.save()
    net.output.sum().backward()


def _call_method(net, x, tracer):
    net.layers[0].output.sum(dim=0).save()
    net.layers[0].output.to(torch.float16).save()
    torch.softmax(net.output, dim=-1).save()


def _parameter(net, x, tracer):
    (net.layers[0].output + net.embed.bias).save()
    net.head.weight.save()


def _apply(net, x, tracer):
    interlace.apply(double, net.layers[0].output).save()
    interlace.apply(lambda t, k: t[:, :k], net.layers[1].output, k=3).save()


SCENARIOS = [_basic, _swap, _skip, _module_call, _cond, _stop, _log, _grad, _grad_swap, _call_method,
             _parameter, _apply]


def _traced(mlp, x, scenario):
    net = Model(mlp)
    with net.trace(x) as tracer:
        scenario(net, x, tracer)
    return net, tracer


def test_the_scenarios_cover_every_op(mlp, x):
    seen = set()
    for scenario in SCENARIOS:
        seen |= {node.op for node in _traced(mlp, x, scenario)[1].graph}
    assert seen == OPS


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__.strip("_"))
def test_round_trip_executes_bit_identically(mlp, x, scenario, compress):
    net, tracer = _traced(mlp, x, scenario)
    trusted = scenario is _apply
    data = serialize_graph(tracer.graph, tracer.invokes, trusted=trusted, compress=compress)
    graph, invokes = deserialize_graph(data, trusted=trusted)
    assert graph == tracer.graph
    assert [n.location for n in graph] == [n.location for n in tracer.graph]
    assert same(invokes, [(tuple(a), dict(k)) for a, k in tracer.invokes])
    results = rerun(net, graph, invokes)
    assert tracer.results and list(results) == list(tracer.results)
    for index, value in tracer.results.items():
        assert same(results[index].detach(), value.detach()), graph[index]


def test_the_example_from_the_design():
    net = interlace.Model(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    x = torch.randn(2, 4)
    with net.trace(x) as tracer:
        h = net[0].output
        net[1].output[:, 0] = h[:, 1] * 2
        out = net.output.save()
    graph, invokes = deserialize_graph(serialize_graph(tracer.graph, tracer.invokes))
    assert graph == tracer.graph
    results = Interleaver(graph, net.module, [(0, 2)], 2).run(lambda: net.module(*invokes[0][0], **invokes[0][1]))
    assert [torch.equal(v, out) for v in results.values()] == [True]


def test_several_invokes(mlp):
    torch.manual_seed(2)
    net = Model(mlp)
    with net.trace() as tracer:
        with tracer.invoke(torch.randn(1, 3)):
            net.layers[0].output[:] = 0
            net.output.save()
        with tracer.invoke(torch.randn(2, 3)):
            net.output.save()
    graph, invokes = deserialize_graph(serialize_graph(tracer.graph, tracer.invokes, compress=True))
    assert graph == tracer.graph and len(invokes) == 2
    results = rerun(net, graph, invokes)
    assert all(same(results[i], v) for i, v in tracer.results.items())


# -- literals --------------------------------------------------------------------------------------
_base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
LITERALS = {
    "none": None, "bools": (True, False), "int": -(2**70), "float": 1.5, "neg_zero": -0.0,
    "inf": math.inf, "neg_inf": -math.inf, "nan": math.nan, "str": "héllo \"quoted\" \u2603",
    "ref": Ref(0), "tuple": (1, (2, "x"), ()), "list": [1, [2.5, None], []],
    "dict": {"a": 1, 3: [Ref(0)], "3": "string key", "": {}}, "slice": slice(1, None, Ref(0)),
    "ellipsis": (Ellipsis, slice(None), 0), "dtypes": (torch.bfloat16, torch.float32, torch.bool, torch.int8),
    "device": (torch.device("cpu"), torch.device("cuda", 1)), "size": torch.Size([2, 0, 3]),
    "float32": torch.randn(3, 4), "float16": torch.randn(5).half(), "bfloat16": torch.randn(2, 2).bfloat16(),
    "int64": torch.tensor([-(2**62), 0, 7]), "bool": torch.tensor([True, False, True]),
    "zero_dim": torch.tensor(3.25), "empty": torch.empty(0, 4), "non_contiguous": _base.t(),
    "shared_storage": (_base, _base[1:], _base[:, 1]), "nan_tensor": torch.tensor([math.nan, -0.0, math.inf]),
}


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("name", list(LITERALS))
def test_literal_round_trips(name, compress):
    value = LITERALS[name]
    graph = Graph()
    graph.add("module_value", "layer", kwargs={"kind": "output", "call": 0, "invoke": None})
    graph.add("call", "torch.add", args=(value, [value]), kwargs={"value": value}, location=("user.py", 3))
    has_ref = "%0" in repr(value)  # refs belong in graphs only, not in inputs or results
    data = serialize_graph(graph, [] if has_ref else [((value,), {"key": value})], compress=compress)
    loaded, invokes = deserialize_graph(data)
    assert same(loaded[1].args, graph[1].args) and same(loaded[1].kwargs, graph[1].kwargs)
    assert loaded[1].location == ("user.py", 3)
    if invokes:
        assert same(invokes[0], ((value,), {"key": value}))
    if not has_ref:
        values, logs = deserialize_results(serialize_results({5: value}, [(2, (value, 1))], compress=compress))
        assert same(values, {5: value}) and same(logs, [(2, (value, 1))])


def test_one_tensor_object_is_stored_once_and_comes_back_as_one_object():
    t = torch.randn(64, 64)
    graph = Graph()
    graph.add("log", args=(t, t, t.clone()))
    single = len(serialize_graph(graph))
    graph.add("log", args=(t,))
    assert len(serialize_graph(graph)) < single + 200
    loaded, _ = deserialize_graph(serialize_graph(graph))
    assert loaded[0].args[0] is loaded[0].args[1] is loaded[1].args[0]
    assert loaded[0].args[2] is not loaded[0].args[0]


def test_values_round_trip_results_of_a_trace(mlp, x):
    net = Model(mlp)
    with net.trace(x) as tracer:
        net.layers[0].output.save()
        net.layers[2].inputs.save()
        net.head.weight.save()
    back, logs = deserialize_results(serialize_results(tracer.results, compress=True))
    assert logs == []
    assert list(back) == list(tracer.results)
    for index, value in tracer.results.items():
        assert same(back[index], value.detach() if isinstance(value, torch.Tensor) else value)


# -- what cannot be written ------------------------------------------------------------------------
def test_a_user_function_needs_trusted_mode(mlp, x):
    net, tracer = _traced(mlp, x, _apply)
    with pytest.raises(SerializationError) as info:
        serialize_graph(tracer.graph, tracer.invokes)
    message = str(info.value)
    apply_node = next(n for n in tracer.graph if n.op == "apply")
    assert f"node %{apply_node.index} (apply at " in message
    assert f"test_serialize.py:{apply_node.location[1]}" in message
    assert "'double'" in message and "allow-list" in message and "trusted=True" in message


def test_an_unsupported_type_names_the_node_and_the_type():
    graph = Graph()
    graph.add("module_value", "x", kwargs={"kind": "output", "call": 0, "invoke": None})
    graph.add("log", args=(Ref(0), {"deep": [object()]}), location=("/home/me/experiment.py", 42))
    with pytest.raises(SerializationError, match=r"node %1 \(log at /home/me/experiment.py:42\): .*builtins.object"):
        serialize_graph(graph)
    with pytest.raises(SerializationError, match="invoke 0.*numpy|invoke 0.*set"):
        serialize_graph(Graph(), [(({1, 2},), {})])
    with pytest.raises(SerializationError, match="value of node %3.*function"):
        serialize_results({3: double})
    with pytest.raises(SerializationError, match="dict keys must be str or int"):
        serialize_results({3: {(1, 2): 0}})
    with pytest.raises(LimitError, match=r"value of node %4: .* over the limit of 100 \(max_result_bytes\)"):
        serialize_results({3: torch.ones(10), 4: torch.ones(20)}, limits=Limits(max_result_bytes=100))
    cyclic = []
    cyclic.append(cyclic)
    with pytest.raises(SerializationError, match="node %0.*nested too deeply"):
        serialize_graph(_one("log", args=(cyclic,)))


def _one(op, target=None, args=(), kwargs=None):
    graph = Graph()
    graph.add(op, target, args, kwargs, ("u.py", 1))
    return graph


@pytest.mark.parametrize("op, target, args, match", [
    ("call_method", "_private", (1,), "method '_private' is not an allowed method"),
    ("call", "os.system", ("ls",), "'os.system' is not an allowed operation"),
    ("call", None, (1,), "its target is not an allowed operation"),
    ("call", "builtins.getattr", (1, "__class__"), "getattr of '__class__' is refused"),
    ("call", "operator.add", (1,), "operator.add takes 2 arguments, got 1"),
    ("save", "something", (1,), "unknown op 'save'"),
    ("module_value", None, (), "needs a module path"),
    ("swap", None, (1, 2), "must refer to an earlier module value or grad node"),
])
def test_targets_outside_the_allow_list_are_refused_when_writing(op, target, args, match):
    with pytest.raises(GraphError, match=r"node %0 \(" + op + r".*u.py:1\): .*" + match):
        serialize_graph(_one(op, target, args))


def test_a_method_the_server_lacks_is_refused_on_the_users_line_with_the_closest_names():
    graph = Graph()
    value = graph.add("module_value", "layers.0", kwargs={"kind": "output", "call": 0, "invoke": 0})
    line = inspect.currentframe().f_lineno  # the user's line: hidden.sofmax(-1), a typo
    graph.add("call_method", "sofmax", (Ref(value.index), -1), {}, (__file__, line))
    with pytest.raises(GraphError) as caught:
        serialize_graph(graph)
    message = str(caught.value)
    assert "line = inspect.currentframe().f_lineno  # the user's line: hidden.sofmax(-1), a typo): method 'sofmax' " \
           "is not an allowed method" in message
    assert message.endswith("did you mean 'softmax', 'log_softmax', 'max'?")


def test_locations_a_server_names_get_their_lines_on_the_client():
    here = __file__
    line = test_locations_a_server_names_get_their_lines_on_the_client.__code__.co_firstlineno
    message = f"{here}:{line}\n  waiting for x ({here}:{line}). Also {here}:{line}. Not nowhere.py:3"
    quoted = quote_sources(message)
    text = f"{here}:{line}: def test_locations_a_server_names_get_their_lines_on_the_client():"
    assert quoted == f"{text}\n  waiting for x ({text}). Also {text}. Not nowhere.py:3"
    assert quote_sources(quoted) == quoted  # a quoted line is left as it is


def test_a_message_naming_many_lines_reads_each_once_and_quotes_only_the_first_few(monkeypatch):
    read = []
    monkeypatch.setattr("linecache.getline", lambda filename, lineno: read.append((filename, lineno)) or "text")
    many = " ".join(f"f{number}.py:{number}" for number in range(100))
    quoted = quote_sources(f"{many} {many}")
    assert read == [(f"f{number}.py", number) for number in range(20)]
    each = " ".join(f"f{number}.py:{number}" + (": text" if number < 20 else "") for number in range(100))
    assert quoted == f"{each} {each}"


# -- what cannot be read ---------------------------------------------------------------------------
@pytest.fixture
def data(mlp, x):
    """The bytes of a small traced graph holding tensors, a cond guard and several refs."""
    net = Model(mlp)
    with net.trace(x) as tracer:
        with tracer.cond(net.layers[0].output.sum() > 0):
            net.layers[1].output[:, 0] = torch.ones(2)
        net.output.save()
    return serialize_graph(tracer.graph, tracer.invokes)


def test_wrong_magic_version_and_flags(data):
    refused(b"PK\x03\x04" + data[4:], r"not an interlace graph: expected magic b'ILG'")
    refused(data[:3] + b"\x07" + data[4:], r"uses wire format version 7, but this interlace reads version 1 or 2: the sender's interlace is newer")
    refused(data[:4] + b"\x80" + data[5:], "unknown flags 0x80")
    with pytest.raises(SerializationError, match="not an interlace result"):
        deserialize_results(data)
    refused("a string", "expected bytes, got str")


def test_every_truncation_is_a_clean_error(data):
    refused(data[:4], "prefix is incomplete")
    refused(data[:9], "no header length")
    refused(data[:40], r"header length \d+ is larger than the 23 bytes that follow")
    for cut in range(len(data)):
        with pytest.raises(SerializationError):
            deserialize_graph(data[:cut])
    assert deserialize_graph(data)


def test_tampered_json(data):
    prefix, header, section = split(data)
    text = json.dumps(header).encode()
    refused(pack(prefix, text.replace(b'"nodes": [', b'"nodes": {', 1), section), "invalid header")
    refused(pack(prefix, b"\xff" * 10, section), "invalid header")
    refused(pack(prefix, json.dumps({"version": 1}).encode(), section), "invalid header: nodes: Field required")
    refused(pack(prefix, json.dumps({**header, "extra": 1}).encode(), section), "extra: Extra inputs")
    refused(tampered(data, lambda h: h["nodes"][0].update(index="0")), "nodes.0.index")
    refused(tampered(data, lambda h: h["nodes"][1].update(index=7)), r"node %1 \(.*has index 7")


def test_oversize(data):
    refused(data, r"over the limit of 100 \(max_frame_bytes\)", LimitError, limits=Limits(max_frame_bytes=100))
    packed = serialize_graph(_chain(50), compress=True)
    assert len(packed) < 2000
    refused(packed, r"the header is \d+ bytes, over the limit of 2000 \(max_header_bytes\)", LimitError,
            limits=Limits(max_header_bytes=2000))
    refused(packed, r"the graph has 51 nodes, over the limit of 10 \(max_nodes\)", LimitError, limits=Limits(max_nodes=10))
    assert len(deserialize_graph(packed, limits=Limits(max_nodes=51))[0]) == 51
    prefix, header, section = split(data)
    refused(prefix + struct.pack("<Q", 2**63) + b"{}", "header length 9223372036854775808 is larger than the 2 bytes that follow")
    refused(data, r"over the limit of 100 bytes \(max_tensor_bytes\)", LimitError, limits=Limits(max_tensor_bytes=100))
    deep = b"[" * 100_000 + b"]" * 100_000
    refused(pack(prefix, b'{"version": 1, "nodes": [], "traces": [{"args": ' + deep + b"}]}"), "invalid header")


def test_unknown_ops_and_targets(data):
    refused(tampered(data, lambda h: h["nodes"][1].update(op="exec")), r"node %1 .*unknown op kind 'exec'", GraphError)
    refused(tampered(data, lambda h: h["nodes"][1].update(op="call", target="posix.system")),
            r"node %1 \(call \[posix.system\], .*test_serialize.py:\d+\): 'posix.system' is not an allowed operation",
            GraphError)
    refused(tampered(data, lambda h: h["nodes"][1].update(op="call", target={"registry": "eval"})),
            "invalid header: nodes.1.target")
    refused(tampered(data, lambda h: h["nodes"][1].update(op="call_method", target="__reduce_ex__")),
            "'__reduce_ex__' is not an allowed method", GraphError)
    refused(tampered(data, lambda h: h["nodes"][1].update(op="call", target="builtins.getattr",
                                                          args=[{"ref": 0}, "__globals__"])),
            "getattr of '__globals__' is refused", GraphError)
    refused(tampered(data, lambda h: h["nodes"][0].update(target={"what": 1})), "nodes.0.target")


@pytest.mark.parametrize("bad, match", [
    ({"ref": 5}, r"ref 5 does not point to an earlier node \(0..1\)"),
    ({"ref": 2}, "ref 2 does not point to an earlier node"),
    ({"ref": -1}, "ref -1 does not point"),
    ({"ref": "0"}, "ref '0' does not point"),
    ({"tensor": "99"}, "tensor '99' is missing from the tensor section"),
    ({"dtype": "float128"}, "invalid dtype name 'float128'"),
    ({"dtype": "__class__"}, "invalid dtype name"),
    ({"device": "warp:9"}, "invalid device 'warp:9'"),
    ({"float": "1e3"}, "unrecognized value"),
    ({"tuple": 3}, "unrecognized value"),
    ({"dict": [[[1], 2]]}, r"dict entries must be \[str or int key, value\] pairs"),
    ({"slice": [1, 2]}, "unrecognized value"),
    ({"size": [-1]}, "unrecognized value"),
    ({"tensor": "0", "ref": 1}, "unrecognized value"),
    ([1, 2], r"unrecognized value \[1, 2\]"),
])
def test_bad_values(data, bad, match):
    def change(header):
        header["nodes"][2]["args"] = [bad]
    refused(tampered(data, change), r"node %2 \(.*\): " + match)


def test_refs_and_guards(data):
    prefix, header, section = split(data)
    guarded = next(i for i, n in enumerate(header["nodes"]) if n.get("guard") is not None)
    header["nodes"][guarded]["guard"] = guarded
    refused(pack(prefix, header, section), f"guard %{guarded} is not an earlier cond node", GraphError)
    header["nodes"][guarded]["guard"] = 0  # a module_value, not a cond
    refused(pack(prefix, header, section), "guard %0 is not an earlier cond node", GraphError)
    refused(tampered(data, lambda h: h["traces"][0]["invokes"][0]["args"].append({"ref": 0})),
            r"trace 0: ref 0 does not point to an earlier node \(there is none here\)")
    refused(tampered(data, lambda h: h["traces"][0].update(end=1)), "the traces must cover every node")
    refused(tampered(data, lambda h: h["traces"].append({"start": 0, "end": 1})), "does not follow the previous trace")


def test_tensor_section_and_zstd_errors(data):
    prefix, header, section = split(data)
    refused(pack(prefix, header, section[:-3]), "malformed interlace data: SafetensorError")
    refused(pack(prefix, header, b"garbage!garbage!"), "malformed interlace data")
    refused(data[:4] + b"\x01" + data[5:9] + b"not zstd at all", "invalid zstd data")
    packed = serialize_graph(_chain(50), compress=True)
    refused(packed[:-5], "truncated graph")
    extra = {"x": torch.ones(3)}
    import safetensors.torch
    refused(pack(prefix, header, safetensors.torch.save({**safetensors.torch.load(section), **extra})),
            r"the tensor section holds 1 tensor\(s\) the header never refers to \(\['x'\]\)")


def test_random_corruption_never_crashes(data):
    rng = random.Random(0)
    for _ in range(400):
        corrupt = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            corrupt[rng.randrange(len(corrupt))] = rng.randrange(256)
        try:
            deserialize_graph(bytes(corrupt))
        except InterlaceError:
            pass


# -- trusted mode ----------------------------------------------------------------------------------
def test_untrusted_loading_never_unpickles(mlp, x, monkeypatch):
    net, tracer = _traced(mlp, x, _apply)
    data = serialize_graph(tracer.graph, tracer.invokes, trusted=True)

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickled in untrusted mode")

    for module in (pickle, cloudpickle):
        monkeypatch.setattr(module, "loads", forbidden)
    refused(data, r"holds pickled Python functions \(made with trusted=True\); load it with trusted=True")
    # a sender that clears the flag: the header's pickled target is still refused
    stripped = data[:4] + bytes([data[4] & ~2]) + data[5:]
    refused(stripped, "its target is a pickled Python function; that needs trusted=True")
    monkeypatch.undo()
    graph, _ = deserialize_graph(data, trusted=True)
    assert graph[[n.op for n in graph].index("apply")].target(torch.ones(1)).item() == 2


def test_allowed_callables_travel_by_name_without_trust():
    graph = Graph()
    graph.add("call", torch.softmax, (torch.ones(3),), {"dim": 0})
    graph.add("call", torch.nn.functional.gelu, (Ref(0),))
    data = serialize_graph(graph)
    assert b"cloudpickle" not in data and b'"target":"torch.softmax"' in data
    loaded, _ = deserialize_graph(data)
    assert [n.target for n in loaded] == ["torch.softmax", "torch.nn.functional.gelu"]
    net = Model(torch.nn.Linear(2, 2))
    with net.trace(torch.ones(1, 2)) as tracer:
        interlace.apply(torch.nn.functional.relu, net.output).save()  # an allowed function: a plain call
    assert tracer.graph[1].op == "call" and tracer.graph[1].target == "torch.nn.functional.relu"


def _chain(n: int) -> Graph:
    import operator  # noqa: F401  (the registry names operator.add)

    graph = Graph()
    graph.add("module_value", "layer", kwargs={"kind": "output", "call": 0, "invoke": None})
    for i in range(n):
        graph.add("call", "operator.add", (Ref(i), 1.0))
    return graph


def test_a_model_output_is_rebuilt_only_as_a_class_of_transformers_modeling_outputs():
    """The class name in the data picks a class of `transformers.modeling_outputs` or nothing: any other
    name (a module, a class elsewhere, the base class) gives the fields as a dict."""
    output = transformers.modeling_outputs.CausalLMOutputWithPast(logits=torch.ones(1, 2, 3))
    values, _ = deserialize_results(serialize_results({0: output}))
    assert type(values[0]) is type(output) and torch.equal(values[0].logits, output.logits)
    for name in ("os", "Path", "ModelOutput", "__class__", "torch"):
        decoder = _Decoder({"0": output.logits}, Limits())
        value = decoder.decode({"output": [name, [["logits", {"tensor": "0"}]]]}, None)
        assert type(value) is dict and torch.equal(value["logits"], output.logits)
