"""The graph as plain data: building, comparing, listing, pickling."""

import pickle

import torch

from interlace import Model
from interlace.graph import Graph, Outcome, Ref, map_refs


def test_graph_is_plain_comparable_data():
    def build():
        g = Graph()
        a = g.add("module_value", "layer", kwargs={"kind": "output", "call": 0, "invoke": 0}, location=("f.py", 3))
        b = g.add("call", "operator.add", (Ref(a.index), 1), location=("f.py", 4), saved=True)
        g.add("call", "operator.mul", (Ref(b.index), 2))
        return g

    first, second = build(), build()
    assert first == second and hash(first) == hash(second)
    second[2].saved = True
    assert first != second
    second[2].saved = False
    second.add("log", None, ("x",))
    assert first != second
    assert first.users() == [[1], [2], []]
    assert first.saved() == [1]
    assert first[1].refs() == (0,)


def test_a_graph_pickles_to_an_equal_graph_that_runs_the_same():
    """A server's worker process gets its batch pickled: every field comes back, no cached state."""
    g = Graph()
    a = g.add("module_value", "layer", kwargs={"kind": "output", "call": 1, "invoke": 0}, location=("f.py", 3))
    b = g.add("call", "operator.getitem", (Ref(a.index), (slice(None), slice(Ref(a.index), None))), guard=0)
    g.add("call", "operator.add", (Ref(b.index),), {"other": Ref(a.index)}, location=("f.py", 5), saved=True)
    g[1].refs()  # cached on the node: the copy computes its own
    back = pickle.loads(pickle.dumps(g))
    assert back == g and [repr(n) for n in back] == [repr(n) for n in g]
    assert [(n.guard, n.saved, n.location) for n in back] == [(None, False, ("f.py", 3)), (0, False, None),
                                                             (None, True, ("f.py", 5))]
    assert [n.refs() for n in back] == [(), (0,), (1, 0)]
    assert back[2].bind({0: 10, 1: 20}) == ((20,), {"other": 10})


def test_each_copy_of_a_block_has_its_own_lists_and_moves_its_refs():
    """An operation may change a list it is handed in place: copies of a block never share one."""
    g = Graph()
    g.add("module_value", "layer", kwargs={"kind": "output", "call": 0, "invoke": 0})
    g.add("call", "operator.add", (Ref(0), [1, 2]), {"extra": {"k": [3]}})
    first = g.add_copy(0, 2, 1, 7)
    template, copy = g[1], g[first + 1]
    assert copy.args == (Ref(first), [1, 2]) and copy.kwargs == {"extra": {"k": [3]}}
    assert copy.args[1] is not template.args[1] and copy.kwargs["extra"]["k"] is not template.kwargs["extra"]["k"]
    assert g[first].kwargs["call"] == 1 and g[0].kwargs["call"] == 0


def test_map_refs_reaches_into_containers_and_slices():
    value = {"a": [Ref(1), (Ref(2), slice(Ref(3), None))], "b": 4}
    mapped = map_refs(value, lambda ref: ref.index * 10)
    assert mapped == {"a": [10, (20, slice(30, None))], "b": 4}


def test_listing_shows_one_node_a_line_with_the_user_line():
    net = Model(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    with net.trace(torch.randn(2, 4)) as tracer:
        net[0].output[:, 0] = 0
        net[1].output[..., 1:3].sum(dim=-1).save()
    lines = str(tracer.graph).splitlines()
    assert len(lines) == len(tracer.graph) == 5
    assert lines[4].endswith("saved  # test_graph.py:" + lines[4].rsplit(":", 1)[1])
    assert lines[1].startswith("%1 = call[operator.setitem](%0, (:, 0), 0)")
    assert "(..., 1:3)" in lines[3] and "call_method[sum](%3, dim=-1)" in lines[4]
    assert all("test_graph.py:" in line for line in lines)


def test_an_outcome_prints_shapes_not_numbers():
    outcome = Outcome({3: torch.zeros(200, 4096), 5: [1, 2], 8: 1.5}, [(3, ("x",))], {9: "the trace stopped"})
    assert repr(outcome) == ("Outcome(results={%3: Tensor[200, 4096] float32, %5: list of 2, %8: 1.5}, logs=1, "
                             "missing={9: 'the trace stopped'})")


def test_a_node_made_by_hand_keeps_the_location_it_was_given():
    """Only a recorder's `(code, offset)` is turned into a line; what a caller hands `Node` is returned as it is."""
    from interlace.graph import Node

    assert [Node(0, "call", location=where).location for where in (None, (), ("f.py", 3))] == [None, (), ("f.py", 3)]
