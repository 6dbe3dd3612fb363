"""Static checks of a graph before it runs: structure, targets, arity, module paths.

`check_structure` needs no model: every node has the arguments its op takes, references point to
earlier nodes of the right kind, call targets are allow-listed (or, in trusted graphs, callables).
`check_against_model` adds what only the model knows: module paths, parameter names and invoke
indices, with the closest names suggested. Each failure is a `GraphError` naming the node (index,
op, target) and its recorded location, quoted as text (never opened).

A copy of a repeated block (`Graph.repeats`) is checked by checking its template once: it has the
same nodes with references moved inside the copy and module calls moved by a shift >= 0, so what
holds for the template holds for it. Only its first node, whose args are its own step `(value,)`, is
not the template's: that of the block's first copy is checked, and it stands for the others', which
differ from it only in their int and their shift: with one int argument, no check's answer depends on
its value or on the node's position (a guard is before the block; tests/backends/test_validate.py
tries every op), so each of the others would get the same answer.
"""

from __future__ import annotations


from .. import ops
from ..errors import GraphError, InterlaceError, describe_location, did_you_mean
from ..graph import Graph, Node, Ref, copied_spans
from ..source import SOURCE, submodule
from .tree import ModelTree

_MODULE_VALUE_KEYS = frozenset({"kind", "call", "invoke", "optional"})
_KINDS = ("output", "input", "inputs")
# positional arity of the operator and builtin entries (torch functions check their own)
_UNARY = frozenset({"operator.neg", "operator.pos", "operator.abs", "operator.invert", "operator.not_", "operator.truth"})
_ARITY = {
    **{name: (1, 1) if name in _UNARY else (3, 3) if name == "operator.setitem" else (2, 2)
       for name in ops.FUNCTIONS if name.startswith("operator.")},
    "builtins.getattr": (2, 3),
    **{f"builtins.{name}": (0, 1) for name in ("list", "tuple", "dict", "int", "float", "bool")},
    **{f"builtins.{name}": (1, 1) for name in ("len", "abs")},
}


def fail(node: Node, message: str) -> GraphError:
    where = describe_location(node.location, read_source=False)
    target = f" [{node.target}]" if isinstance(node.target, str) else ""
    return GraphError(f"node %{node.index} ({node.op}{target}{', ' + where if where else ''}): {message}").at(node)


def check_structure(graph: Graph, *, trusted: bool = False, repeats=None) -> None:
    """Every node well-formed for its op; refs to earlier nodes; targets allowed.

    repeats: the copies to check by their templates (default `graph.repeats`)."""
    nodes = graph.nodes
    for node in own_nodes(nodes, graph.repeats if repeats is None else repeats, 0, len(nodes)):
        check_node(node, nodes, trusted)


def own_nodes(nodes, repeats, start: int, end: int):
    """Nodes `start..end` but those of copies whose template is among them; a block's first copy keeps
    its first node (see the module's docstring)."""
    position = start
    leading = {repeat.copies[0][0] for repeat in repeats if repeat.copies}
    for first, stop in copied_spans(repeats, start, end):
        yield from nodes[position : first + 1 if first in leading else first]
        position = stop
    yield from nodes[position:end]


def check_node(node: Node, nodes, trusted: bool) -> None:
    op, args, kwargs = node.op, node.args, node.kwargs
    if type(args) is not tuple or type(kwargs) is not dict or any(type(k) is not str for k in kwargs):
        raise fail(node, "args must be a tuple and kwargs a dict with str keys")
    if node.guard is not None and not (
        type(node.guard) is int and 0 <= node.guard < node.index and nodes[node.guard].op == "cond"
    ):
        raise fail(node, f"guard %{node.guard} is not an earlier cond node")
    checker = _CHECKS.get(op)
    if checker is None:
        raise fail(node, f"unknown op {op!r}")
    checker(node, nodes, trusted)


def _expect(node: Node, condition: bool, message: str) -> None:
    if not condition:
        raise fail(node, message)


def _path_target(node: Node) -> None:
    _expect(node, type(node.target) is str, f"op {node.op!r} needs a module path (a str) as its target")


def _ref_to(node: Node, value, nodes, kinds, what: str) -> None:
    _expect(node, type(value) is Ref and 0 <= value.index < node.index and nodes[value.index].op in kinds,
            f"its first argument must refer to an earlier {what} node")


def _check_module_value(node, nodes, trusted):
    _path_target(node)
    kwargs = node.kwargs
    _expect(node, not node.args and set(kwargs) <= _MODULE_VALUE_KEYS and {"kind", "call", "invoke"} <= set(kwargs),
            "a module value takes no args and the kwargs kind, call, invoke (and optional)")
    _expect(node, kwargs["kind"] in _KINDS, f"kind must be one of {', '.join(_KINDS)}")
    _call_and_invoke(node)
    _expect(node, type(kwargs.get("optional", False)) is bool, "optional must be a bool")


def _call_and_invoke(node):
    call, invoke = node.kwargs.get("call"), node.kwargs.get("invoke")
    _expect(node, type(call) is int and call >= 0, "call must be an int >= 0")
    _expect(node, invoke is None or type(invoke) is int and invoke >= 0, "invoke must be None or an int >= 0")


def _check_parameter(node, nodes, trusted):
    _path_target(node)
    _expect(node, not node.args and not node.kwargs, "a parameter takes no arguments")


def _check_call(node, nodes, trusted):
    target = node.target
    target = ops.name_of(target) or target if callable(target) else target
    if isinstance(target, str):
        _expect(node, ops.is_registered(target), f"{target!r} is not an allowed operation")
        low, high = _ARITY.get(target, (0, None))
        count = len(node.args)
        _expect(node, low <= count and (high is None or count <= high),
                f"{target} takes {low if low == high else f'{low} to {high}'} arguments, got {count}")
        if target == "builtins.getattr":
            _expect(node, ops.allowed_attribute(node.args[1]),
                    f"getattr of {node.args[1]!r} is refused: only public attribute names")
    else:
        _expect(node, trusted and callable(target), "its target is not an allowed operation (a user function "
                "needs a trusted graph)")


def _check_apply(node, nodes, trusted):
    _expect(node, trusted and callable(node.target),
            "interlace.apply runs your own Python function, which only a trusted run allows")


def _check_call_method(node, nodes, trusted):
    if not ops.allowed_method(node.target):
        names = set(ops.TENSOR_METHODS).union(*ops.CONTAINER_METHODS.values())
        raise fail(node, f"method {node.target!r} is not an allowed method (a server runs the tensor, list and dict "
                         f"methods of interlace/ops.py){did_you_mean(str(node.target), names)}")
    _expect(node, len(node.args) >= 1, "a method call needs the object it is called on")


def _check_swap(node, nodes, trusted):
    _expect(node, node.target is None and len(node.args) == 2 and not node.kwargs,
            "a swap takes (the value it replaces, the new value)")
    _ref_to(node, node.args[0], nodes, ("module_value", "grad"), "module value or grad")


def _check_skip(node, nodes, trusted):
    _path_target(node)
    _expect(node, len(node.args) == 1 and set(node.kwargs) == {"call", "invoke"},
            "a skip takes (value,) and the kwargs call and invoke")
    _call_and_invoke(node)


def _check_module_call(node, nodes, trusted):
    _path_target(node)


def _check_one_ref(node, nodes, trusted):
    _expect(node, node.target is None and len(node.args) == 1 and not node.kwargs, f"{node.op} takes one argument")
    if node.op == "grad":
        _expect(node, type(node.args[0]) is Ref, "grad takes a reference to a tensor node")


def _check_stop(node, nodes, trusted):
    _expect(node, node.target is None and not node.args, "stop takes no arguments")
    if node.kwargs:  # a session.stop(): it ends its loop at node skip_to (None: the rest of the session)
        skip_to = node.kwargs.get("skip_to")
        _expect(node, set(node.kwargs) == {"session", "skip_to"} and node.kwargs["session"] is True and (
            skip_to is None or type(skip_to) is int and skip_to > node.index),
            "stop takes no arguments, or a session's: {session: true, skip_to: a later node or null}")


def _check_log(node, nodes, trusted):
    _expect(node, node.target is None and not node.kwargs, "log takes positional values only")


_CHECKS = {
    "module_value": _check_module_value, "parameter": _check_parameter, "call": _check_call,
    "call_method": _check_call_method, "swap": _check_swap, "skip": _check_skip, "apply": _check_apply,
    "module_call": _check_module_call, "grad": _check_one_ref, "cond": _check_one_ref,
    "stop": _check_stop, "log": _check_log,
}


def check_against_model(graph: Graph, root, extra_modules: dict, invokes: int, start: int = 0, end=None) -> None:
    """Module paths, parameter names and invoke indices of nodes `start..end` exist in this model, and
    their structure is sound (but that of nodes the decoder checked already: `Graph.checked`)."""
    paths, points = None, set()  # (the `.source` points found: each is looked up once)
    weights = None
    for node in own_nodes(graph.nodes, graph.repeats, start, len(graph) if end is None else end):
        if node.index >= graph.checked:
            check_node(node, graph.nodes, False)
        if node.op in ("module_value", "skip", "module_call"):
            if paths is None:
                paths = ModelTree.of(root).by_path
            target = node.target
            if target and target not in paths and target not in extra_modules and target not in points:  # ('': root)
                _source_point(node, root, paths, extra_modules)
                points.add(node.target)
            if node.op == "module_call" and node.target in extra_modules:
                raise fail(node, f"{node.target!r} is not a module of the model's own tree, and a graph may call "
                           "only those (generate with mode 'generate' and its allowed options instead)")
            invoke = node.kwargs.get("invoke") if node.op != "module_call" else None  # (its kwargs are the module's)
            if invoke is not None and invoke >= max(invokes, 1):
                raise fail(node, f"invoke {invoke} does not exist: this run has {invokes} invoke(s)")
        elif node.op == "parameter":
            if weights is None:
                weights = ModelTree.of(root).weight_names
            if node.target not in weights:
                raise fail(node, f"the model has no parameter or buffer {node.target!r}{did_you_mean(node.target, weights)}")


def _source_point(node: Node, root, paths: dict, extra_modules: dict) -> None:
    """A path through `.source` names a call site in the model's own forward: rewrite it now, or say
    which points exist."""
    if SOURCE not in node.target.split("."):
        raise fail(node, f"the model has no module {node.target!r}{did_you_mean(node.target, [*paths, *extra_modules])}")
    try:
        submodule(root, node.target)
    except InterlaceError as error:
        raise fail(node, str(error)) from None

