"""Repeated blocks on the wire (version 2): a `tracer.all()` block travels once, whatever the number of
steps; the loader builds its copies itself, equal to the sender's, and refuses descriptors that lie."""

import json
import pickle
import struct

import pytest
import torch

import interlace
from helpers import same, tiny, tiny_tokenizer
from interlace import GraphError, LanguageModel, LimitError, SerializationError
from interlace.backends import serialize, validate
from interlace.backends.limits import Limits
from interlace.backends.serialize import deserialize_request, serialize_request
from interlace.graph import Graph, Ref, Repeat, Request
from interlace.server.hosting import HostedModel

PROMPT = "w5 w6 w7"


@pytest.fixture(scope="module")
def lm():
    return LanguageModel(tiny("gpt2"), tokenizer=tiny_tokenizer())


def steered(lm, steps: int, *, stream: bool = False):
    """A steered generation, run here: (its request, its saved values by node, its tokens)."""
    steer = torch.linspace(-1, 1, lm.config.hidden_size)
    with lm.generate(PROMPT, max_new_tokens=steps, stream=stream) as tracer:
        hidden = interlace.list().save()
        with tracer.all():
            lm.transformer.h[1].output[:, -1] += steer
            hidden.append(lm.transformer.h[0].output[:, -1] * 2)
        tokens = lm.generator.output.save()
    return Request(tracer.graph, [tracer.spec(len(tracer.graph))]), tracer.results, tokens


def split(data: bytes):
    """(prefix, header dict, tensor section) of an uncompressed frame."""
    (length,) = struct.unpack_from("<Q", data, 9)
    return data[:9], json.loads(data[17 : 17 + length]), data[17 + length :]


def frame(header: dict, section: bytes, count: int, version: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    prefix = b"ILG" + bytes([header["version"] if version is None else version, 0]) + struct.pack("<I", count)
    return prefix + struct.pack("<Q", len(text)) + text + section


# -- round trips -------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 4, 32])
def test_a_block_over_every_step_round_trips_to_an_equal_graph_and_bit_identical_results(lm, steps):
    request, results, tokens = steered(lm, steps)
    data = serialize_request(request)
    assert data[3] == (2 if steps > 1 else 1)  # version 2 only when something repeats
    loaded = deserialize_request(data)
    assert loaded.graph == request.graph and len(loaded.graph) == len(request.graph)
    assert loaded.graph.repeats == request.graph.repeats
    assert [(t.start, t.end, t.options) for t in loaded.traces] == [(t.start, t.end, t.options) for t in request.traces]
    outcome = lm.run(loaded, untrusted=True)  # as a server runs it
    assert sorted(outcome.results) == sorted(results) and len(results[request.graph.saved()[0]]) == steps
    assert all(same(outcome.results[index], value) for index, value in results.items())
    assert same(outcome.results[request.graph.saved()[-1]], tokens)


@pytest.mark.parametrize("steps", [4, 32])
def test_a_front_that_leaves_the_copies_to_its_worker_sends_the_template_once_and_runs_the_same(lm, steps):
    """A server's front reads a request without making its copies (`make_copies=False`): each copy but the
    first (whose first node is checked) holds its template's own nodes, which pickle sends as references; the
    run makes them, equal to the copies made on reading, and gives the same values."""
    request, results, tokens = steered(lm, steps)
    data = serialize_request(request)
    made = deserialize_request(data)
    left = deserialize_request(data, make_copies=False)
    assert not left.graph.copies_made and len(left.graph) == len(made.graph)
    assert [node.op for node in left.graph.nodes] == [node.op for node in made.graph]  # what checks read of a copy
    repeat = made.graph.repeats[0]
    (first, _, _), *later = repeat.copies
    size = repeat.end - repeat.start
    assert left.graph.nodes[first : first + size] == made.graph.nodes[first : first + size]
    assert all(left.graph[copy + offset] is left.graph[repeat.start + offset]
               for copy, _, _ in later for offset in range(size))
    sent = pickle.dumps(left, protocol=pickle.HIGHEST_PROTOCOL)
    assert len(sent) < len(pickle.dumps(made, protocol=pickle.HIGHEST_PROTOCOL)) * (0.3 if steps == 32 else 0.8)
    received = pickle.loads(sent)
    received.graph.make_copies()
    assert received.graph.copies_made and received.graph == made.graph
    assert [node.index for node in received.graph] == list(range(len(made.graph)))
    outcome = lm.run(pickle.loads(sent), untrusted=True)  # (the run makes them itself)
    assert not HostedModel(lm, name="tiny", limits=Limits()).admit(data).graph.copies_made  # (what a front does)
    assert sorted(outcome.results) == sorted(results)
    assert all(same(outcome.results[index], value) for index, value in results.items())
    assert same(outcome.results[request.graph.saved()[-1]], tokens)


def test_a_block_that_reads_another_block_per_step_round_trips_and_runs_the_same(lm):
    """The copies of a block that reads an earlier block's value per step are no plain shifts of it: they
    travel as nodes (the earlier block still travels once), and the server's run gives the same values."""
    with lm.generate(PROMPT, max_new_tokens=4) as tracer:
        doubled = interlace.list().save()
        with tracer.all():
            state = lm.transformer.h[1].output[:, -1]
        with tracer.all():
            doubled.append(state * 2)
    request = Request(tracer.graph, [tracer.spec(len(tracer.graph))])
    assert len(request.graph.repeats) == 1  # the first block's
    loaded = deserialize_request(serialize_request(request))
    assert loaded.graph == request.graph
    outcome = lm.run(loaded, untrusted=True)
    assert sorted(outcome.results) == sorted(tracer.results)
    assert all(same(outcome.results[index], value) for index, value in tracer.results.items())
    assert not torch.equal(doubled[0], doubled[1])


def test_the_request_does_not_grow_with_the_steps_beyond_one_descriptor_per_copy(lm):
    sizes, listed = {}, {}
    for steps in (4, 48):  # (the tiny model holds 64 positions)
        request, _, _ = steered(lm, steps)
        data = serialize_request(request)
        sizes[steps], listed[steps] = len(data), len(split(data)[1]["nodes"])
        assert struct.unpack_from("<I", data, 5)[0] == len(request.graph)  # the count: copies included
    assert listed[48] == listed[4]
    descriptor = len("[999,99,99],")
    assert 0 < sizes[48] - sizes[4] <= 44 * descriptor


def test_the_prefix_declares_the_nodes_the_loader_builds_before_anything_is_parsed(lm):
    """What a server reads to decide where to check a request (on its event loop when small), copies included."""
    for steps in (1, 40):
        request = steered(lm, steps)[0]
        data = serialize_request(request)
        assert serialize.declared_nodes(data) == len(deserialize_request(data).graph) == len(request.graph)
    assert serialize.declared_nodes(b"ILR" + data[3:]) is None  # results, not a request
    assert serialize.declared_nodes(data[:5]) is None  # a prefix cut short


def test_reading_and_checking_do_not_grow_with_the_steps(lm, monkeypatch):
    """The loader checks each listed node once and the first copy's first node (its step), the copies by
    arithmetic; checking against the model does not check a decoded graph's structure again, and checks
    the same nodes of a graph that was not decoded: as many for 32 steps as for 4."""
    checked = []
    real = validate.check_node
    counting = lambda node, *rest: checked.append(node.index) or real(node, *rest)  # noqa: E731
    monkeypatch.setattr(validate, "check_node", counting)
    monkeypatch.setattr(serialize, "check_node", counting)
    counts = {}
    for steps in (4, 32):
        request, _, _ = steered(lm, steps)
        data = serialize_request(request)
        checked.clear()
        loaded = deserialize_request(data)
        counts[steps] = sorted(checked)
        checked.clear()
        validate.check_against_model(loaded.graph, lm.module, lm._extra_modules(), 1)
        assert checked == []
        validate.check_against_model(request.graph, lm.module, lm._extra_modules(), 1)
        assert sorted(checked) == counts[steps]
    assert len(counts[32]) == len(counts[4])


def test_a_graph_grown_after_it_was_decoded_has_its_new_nodes_checked(lm):
    request, _, _ = steered(lm, 4)
    loaded = deserialize_request(serialize_request(request))
    loaded.graph.add("call", "os.system", ("ls",))
    with pytest.raises(GraphError, match="'os.system' is not an allowed operation"):
        validate.check_against_model(loaded.graph, lm.module, lm._extra_modules(), 1)


def test_a_server_of_version_1_gets_every_node_listed(lm):
    request, results, _ = steered(lm, 5)
    data = serialize_request(request, version=1)
    prefix, header, _ = split(data)
    assert prefix[3] == 1 and header["version"] == 1 and "repeats" not in header
    assert len(header["nodes"]) == len(request.graph)
    loaded = deserialize_request(data)
    assert loaded.graph == request.graph and loaded.graph.repeats == []
    outcome = lm.run(loaded, untrusted=True)
    assert all(same(outcome.results[index], value) for index, value in results.items())


def test_a_version_1_request_written_by_hand_still_loads():
    nodes = [{"index": 0, "op": "module_value", "target": "transformer.h.0",
              "kwargs": {"kind": "output", "call": 0, "invoke": 0}},
             {"index": 1, "op": "call", "target": "operator.mul", "args": [{"ref": 0}, 2], "saved": True}]
    header = {"version": 1, "nodes": nodes, "traces": [{"start": 0, "end": 2, "invokes": [{"args": [PROMPT]}]}]}
    loaded = deserialize_request(frame(header, b"", 2))
    assert [node.op for node in loaded.graph] == ["module_value", "call"] and loaded.graph[1].args == (Ref(0), 2)
    assert loaded.graph.repeats == []


def test_a_node_saved_after_its_block_sends_the_copies_as_they_are(lm):
    """Saving a block's value after the block saves the first step's alone: those copies no longer match
    their template, so they are listed node by node."""
    with lm.generate(PROMPT, max_new_tokens=3) as tracer:
        with tracer.all():
            hidden = lm.transformer.h[0].output[:, -1]
        hidden.save()
        index = hidden._index
    request = Request(tracer.graph, [tracer.spec(len(tracer.graph))])
    assert request.graph.repeats and request.graph.intact_repeats() == []
    data = serialize_request(request)
    assert data[3] == 1
    loaded = deserialize_request(data)
    assert loaded.graph == request.graph and loaded.graph.saved() == [index]


def test_a_trace_that_fails_in_a_session_takes_its_repeats_along(lm):
    with lm.session() as session:
        with pytest.raises(ZeroDivisionError):
            with lm.generate(PROMPT, max_new_tokens=3) as tracer:
                with tracer.all():
                    lm.transformer.h[0].output[:, -1] *= 2
                1 / 0
        assert session.graph.repeats == [] and len(session.graph) == 0
        with lm.trace(PROMPT):
            out = lm.lm_head.output.save()
    assert out.shape[-1] == lm.config.vocab_size


def test_a_session_loop_over_a_generation_round_trips(lm, monkeypatch):
    """session.iter copies whole traces: the first value's block travels once, the copies of the
    later values' traces are listed, and the session's results come out the same; each value's copy holds
    the block's copies as made (recorded with every copy made at the block's end: the same graph and values)."""
    def record():
        with lm.session() as session:
            logits = interlace.list().save()
            with session.iter([1.0, 2.0]) as scale:
                with lm.generate(PROMPT, max_new_tokens=3) as tracer:
                    with tracer.all():
                        lm.transformer.h[0].output[:, -1] *= scale
                        logits.append(lm.lm_head.output[0, -1])
            request = session.request()
        return request, logits

    request, logits = record()
    real = Graph.repeat
    with monkeypatch.context() as patch:
        patch.setattr(Graph, "repeat", lambda self, start, end, copies, later=False: real(self, start, end, copies))
        at_once, at_once_logits = record()
    assert request.graph == at_once.graph and same(list(logits), list(at_once_logits))
    assert not torch.equal(logits[1], logits[4])  # (step 1 of each value: scaled apart)
    loaded = deserialize_request(serialize_request(request))
    assert len(request.graph.repeats) == 1 and loaded.graph == request.graph
    left = deserialize_request(serialize_request(request), make_copies=False)
    left.graph.make_copies()  # (a copy of a trace holds the block's copies as its own nodes)
    assert left.graph == request.graph
    outcome = lm.run(loaded)
    assert len(logits) == 6 and same(outcome.results[request.graph.saved()[0]], list(logits))


def test_streamed_steps_come_from_the_copies_the_server_made(lm):
    request, results, _ = steered(lm, 4)
    loaded = deserialize_request(serialize_request(request))
    steps = []
    outcome = lm.run(loaded, untrusted=True, on_step=steps.append)
    hidden = request.graph.saved()[0]
    assert [step.index for step in steps] == [0, 1, 2, 3]
    assert all(same(step.items[hidden], [item]) for step, item in zip(steps, outcome.results[hidden]))


# -- descriptors that lie -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sent(lm):
    """(header, tensor section, node count) of a 4-step request: a 9-node block, copies at 10, 19, 28."""
    request, _, _ = steered(lm, 4)
    prefix, header, section = split(serialize_request(request))
    assert header["repeats"] == [{"start": 1, "end": 10, "copies": [[10, 1, 1], [19, 2, 2], [28, 3, 3]]}]
    assert [node["index"] for node in header["nodes"]] == [*range(10), 37]
    return header, section, struct.unpack_from("<I", prefix, 5)[0]


def changed(sent, change, *, count=None, limits=None, version=None):
    header, section, total = sent
    header = json.loads(json.dumps(header))
    change(header)
    return lambda: deserialize_request(frame(header, section, total if count is None else count, version),
                                       limits=limits)


def copies(*triples):
    return lambda header: header["repeats"][0].update(copies=[list(t) for t in triples])


@pytest.mark.parametrize("change, count, error, match", [
    (copies([10, -1, 1], [19, 2, 2], [28, 3, 3]), None, GraphError, r"moves module calls by -1; a shift is 0 to 1024"),
    (copies([10, 1025, 1], [19, 2, 2], [28, 3, 3]), None, GraphError, r"moves module calls by 1025.*max_new_tokens"),
    (copies([10, 1, 1], [15, 2, 2], [28, 3, 3]), None, GraphError, r"copy at node 15 overlaps its template or the copy"),
    (copies([5, 1, 1], [19, 2, 2], [28, 3, 3]), None, GraphError, r"copy at node 5 overlaps its template"),
    (copies([-8, 1, 1], [19, 2, 2], [28, 3, 3]), None, GraphError, r"copy at node -8 overlaps"),
    (copies([19, 2, 2], [10, 1, 1], [28, 3, 3]), None, GraphError, r"copy at node 10 overlaps"),
    (copies([10, 1, 1], [19, 2, 2], [28, 3, 2**300]), None, LimitError, r"int literal .*\(max_int_bits\)"),
    (copies([10, 1, 1], [19, 2, 2], [28, 3, 2**260]), None, LimitError, r"the step of its copy at node 28 is over 256 bits"),
    (copies(), 11, GraphError, r"repeat 0 \(template nodes 1\.\.10\): it has no copies"),
    (lambda h: h["repeats"][0].update(end=1), None, GraphError, r"its template is empty"),
    (lambda h: h["repeats"][0].update(start=-1), None, SerializationError, r"repeats\.0\.start"),
    (lambda h: h["repeats"][0].update(start=30, end=31), None, GraphError, r"copy at node 10 overlaps its template"),
    (lambda h: h["repeats"][0].update(start=2, end=11), None, GraphError, r"copy at node 10 overlaps its template"),
    (lambda h: h["repeats"].append({"start": 11, "end": 13, "copies": [[40, 1, 1]]}), 40, GraphError,
     r"repeat 1: its template \(nodes 11\.\.13\) overlaps a copy"),
    (lambda h: h["repeats"][0]["copies"].append([40, 4, 4]), 47, GraphError, r"ends at node 49, past the graph's 47 nodes"),
    (lambda h: h["repeats"].append({"start": 0, "end": 1, "copies": [[12, 0, 0]]}), 39, GraphError,
     r"copies of repeated blocks overlap at node 12"),
    (copies([10, 1, 1], [19, 2, 2], [29, 3, 3]), None, SerializationError,
     r"has index 37; nodes must be numbered in order \(the copies of repeated blocks are not listed\)"),
    (copies([10, 1, 1], [19, 2, 2], [28, 3, "3"]), None, SerializationError, r"repeats\.0\.copies\.2\.2"),
    (copies([10, 1, 1], [19, 2, 2], [28, 3, True]), None, SerializationError, r"repeats\.0\.copies\.2\.2"),
])
def test_malformed_descriptors_are_refused(sent, change, count, error, match):
    with pytest.raises(error, match=match):
        changed(sent, change, count=count)()


def test_a_version_1_header_has_no_repeats(sent):
    with pytest.raises(SerializationError, match=r"a version 1 header has no repeats"):
        changed(sent, lambda h: h.update(version=1), version=1)()
    with pytest.raises(SerializationError, match=r"the prefix says version 2 but the header 1"):
        changed(sent, lambda h: h.update(version=1), version=2)()


def test_the_count_must_include_the_copies(sent):
    with pytest.raises(SerializationError, match=r"the prefix says 11 nodes but the header holds 38 \(its listed"):
        changed(sent, lambda h: None, count=11)()


def test_an_expansion_past_max_nodes_is_refused_before_any_copy_is_made(sent, monkeypatch):
    made = []
    monkeypatch.setattr(Graph, "add_copy", lambda self, *a: made.append(a))
    many = [[10 + 9 * i, 1, 1] for i in range(1000)]
    with pytest.raises(LimitError, match=r"the repeated blocks make the graph over 100 nodes \(max_nodes\)"):
        changed(sent, copies(*many), count=99, limits=Limits(max_nodes=100))()
    with pytest.raises(LimitError, match=r"over the limit of 100 \(max_nodes\)"):  # the prefix, before parsing
        changed(sent, copies(*many), count=9011, limits=Limits(max_nodes=100))()
    assert made == []


@pytest.mark.parametrize("make_copies", [True, False])
def test_a_copy_whose_first_node_cannot_hold_a_step_is_refused(make_copies):
    """A copy's first node takes its step as its one argument: copies of a block that starts with a module
    value (which takes none) fail their own check."""
    nodes = [{"index": 0, "op": "module_value", "target": "transformer.h.0",
              "kwargs": {"kind": "output", "call": 0, "invoke": 0}},
             {"index": 1, "op": "call", "target": "operator.mul", "args": [{"ref": 0}, 2], "saved": True}]
    header = {"version": 2, "nodes": nodes, "repeats": [{"start": 0, "end": 2, "copies": [[2, 1, 1]]}],
              "traces": [{"start": 0, "end": 4, "invokes": [{"args": [PROMPT]}]}]}
    with pytest.raises(GraphError, match=r"node %2 \(module_value \[transformer\.h\.0\]\): a module value takes no args"):
        deserialize_request(frame(header, b"", 4), make_copies=make_copies)
    header["nodes"][0] = {"index": 0, "op": "call", "target": "builtins.int", "args": [0]}
    header["nodes"][1]["args"] = [{"ref": 0}, 2]
    loaded = deserialize_request(frame(header, b"", 4), make_copies=make_copies)
    loaded.graph.make_copies()
    assert [node.args for node in loaded.graph] == [(0,), (Ref(0), 2), (1,), (Ref(2), 2)]


# -- the graph ----------------------------------------------------------------------------------------------
def test_graph_repeat_records_its_copies_and_truncate_drops_them():
    graph = Graph()
    graph.add("module_value", "a", kwargs={"kind": "output", "call": 0, "invoke": 0})
    graph.add("call", "builtins.int", (0,))
    graph.add("module_value", "a", kwargs={"kind": "output", "call": 0, "invoke": 0})
    graph.add("call", "operator.add", (Ref(2), Ref(0)))
    repeat = graph.repeat(1, 4, [(1, 1), (2, 2)])
    assert repeat == Repeat(1, 4, ((4, 1, 1), (7, 2, 2))) and graph.repeats == [repeat]
    assert graph[7].args == (2,) and graph[8].kwargs["call"] == 2 and graph[9].args == (Ref(8), Ref(0))
    assert graph.intact_repeats() == [repeat]
    graph.truncate(9)
    assert graph.repeats == [Repeat(1, 4, ((4, 1, 1),))] and len(graph) == 9
    graph.truncate(3)
    assert graph.repeats == []
    assert graph.repeat(1, 2, []).copies == () and graph.repeats == []
