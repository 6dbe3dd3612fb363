"""The static checks' answer for the copies of a repeated block.

A server checks a block's copies by the first one's first node alone (validate.py's docstring): the
others differ from it only in their step (one int argument) and module call shift, and sit later in the
graph. That holds only while no check's answer depends on those; this tries each op.
"""

from __future__ import annotations

import re

import pytest

from interlace.backends import validate
from interlace.errors import GraphError
from interlace.graph import Graph, Ref

# a block's first node, by op: (op, target, kwargs); its args become each copy's `(step,)`
FIRST_NODES = [
    ("call", "builtins.int", {}),
    ("call", "operator.neg", {}),
    ("call", "operator.getitem", {}),  # takes two arguments
    ("call", "builtins.getattr", {}),  # reads its second argument
    ("call", "os.system", {}),  # not allowed
    ("call_method", "item", {}),
    ("call_method", "__reduce__", {}),  # not allowed
    ("module_value", "h.0", {"kind": "output", "call": 0, "invoke": 0}),  # takes no args
    ("skip", "h.0", {"call": 0, "invoke": 0}),
    ("module_call", "h.0", {}),
    ("cond", None, {}),
    ("log", None, {}),
    ("grad", None, {}),  # takes a reference
    ("swap", None, {}),
    ("stop", None, {"session": True, "skip_to": 9}),  # skip_to is compared with the node's position
    ("parameter", "h.0.weight", {}),
    ("apply", "builtins.int", {}),
]


def _answer(node, nodes) -> str:
    try:
        validate.check_node(node, nodes, False)
    except GraphError as error:
        return re.sub(r"node %\d+", "node %N", str(error))
    return "passes"


@pytest.mark.parametrize("guarded", [False, True])
@pytest.mark.parametrize("op, target, kwargs", FIRST_NODES)
def test_every_copy_of_a_block_gets_the_answer_of_its_first(op, target, kwargs, guarded):
    graph = Graph()
    cond = graph.add("cond", None, (True,))
    start = len(graph)
    graph.add(op, target, (0,), dict(kwargs), guard=cond.index if guarded else None)
    graph.add("call", "operator.mul", (Ref(start), 2))
    answers = set()
    for calls, step in [(0, 1), (1, 0), (3, -7), (100, 2**62)]:
        graph.add("log", None, ("between copies",))  # (copies later in the graph)
        first = graph.add_copy(start, start + 2, calls, step)
        answers.add(_answer(graph.nodes[first], graph.nodes))
    assert len(answers) == 1, answers


def test_every_op_is_tried():
    assert {op for op, _, _ in FIRST_NODES} == set(validate._CHECKS)
