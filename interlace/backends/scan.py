"""Scanning: evaluate a graph on fake tensors while it is recorded (`trace(..., scan=True)`).

Each invoke's input is first run through the model under `FakeTensorMode`, capturing every module's
inputs and outputs (shapes and dtypes, no real compute, the weights untouched). Every node is then
evaluated on those fake values the moment it is recorded, so a shape error is raised at the user's
own line before the real model runs, and `proxy.shape` is a real `torch.Size` during recording.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..errors import ExecutionError, InterlaceError
from ..graph import Node
from ..source import points
from .local import Interleaver, unlike
from .rows import first_input

# gradients are not computed on fake tensors: their values stay unknown, and lines using them unchecked
_GRADIENT_METHODS = frozenset({"backward", "retain_grad", "requires_grad_"})
_NO_EFFECT = frozenset({"log", "stop", "cond", "grad"})


class Scanner(Interleaver):
    """Evaluates nodes as they are recorded, on fake values; unknown values stay None."""

    def __init__(self, graph, root: torch.nn.Module, *, modules: dict | None = None):
        super().__init__(graph, root, [], 0, modules=modules)
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.captured: dict[int, dict[tuple, object]] = {}
        self.forwards: dict[int, object] = {}  # each invoke's forward, to capture again (see _op_module_value)
        self.hooked: dict[int, set[str]] = {}  # the module paths each capture saw
        self.device = next((p.device for p in root.parameters()), torch.device("cpu"))

    def capture(self, invoke: int, forward) -> None:
        """Run `forward(fake)` (which calls the model on `fake(inputs)`), recording every module call."""
        seen: dict[tuple, object] = {}
        modules = [*self.root.named_modules(), *points(self.root), *self.extra_modules.items()]
        self.forwards[invoke], self.hooked[invoke] = forward, {path for path, _ in modules}
        try:
            fake_run(self.root, modules, lambda: forward(self.fake), self.mode, seen)
        except Exception as error:
            raise InterlaceError(
                f"scanning could not run the model on fake tensors ({type(error).__name__}: {error}); "
                "run without scan=True"
            ) from error
        self.captured[invoke] = seen

    def fake(self, value):
        """`value` with every tensor turned into a fake tensor on the model's device."""
        return map_tensors(value, lambda tensor: self.mode.from_tensor(tensor.to(self.device)))

    def evaluate(self, node: Node) -> None:
        """Compute the fake value of a node just recorded; errors name the user's line."""
        if (node.op in _NO_EFFECT or node.op == "call_method" and node.target in _GRADIENT_METHODS
                or any(self.values.get(ref) is None for ref in node.refs())):
            self.values[node.index] = None
            return
        try:
            with self.mode, quiet("torch._subclasses.fake_tensor"):  # the error reaches the user as ours
                self.values[node.index] = getattr(self, "_op_" + node.op)(node)
        except InterlaceError:
            raise
        except Exception as error:
            raise self._execution_error(node, error) from error

    def _execution_error(self, node, error) -> ExecutionError:
        wrapped = super()._execution_error(node, error)
        return ExecutionError(f"{wrapped} (found while scanning, before the model ran)")

    def _op_module_value(self, node):
        invoke = node.kwargs["invoke"] or 0
        if invoke in self.forwards and node.target not in self.hooked[invoke]:
            self.capture(invoke, self.forwards[invoke])  # a `.source` point made after the invoke was captured
        captured = self.captured.get(invoke, {})
        kind = node.kwargs["kind"]
        value = captured.get((node.target, "output" if kind == "output" else "input", node.kwargs["call"]))
        if value is None or kind == "output":
            return value
        args, kwargs = value
        return first_input(args, kwargs) if kind == "input" else (args, kwargs)

    def _op_parameter(self, node):
        return self.fake(super()._op_parameter(node))

    def _op_skip(self, node):
        """A module skipped: the fake run saw the module's own output, which the modules after it expect; a
        value given in its place unlike it is an error here."""
        output = self.captured.get(node.kwargs["invoke"] or 0, {}).get((node.target, "output", node.kwargs["call"]))
        if difference := unlike(output, self._resolve(node.args[0])):
            raise ExecutionError(f"{self._where(node)}: {node.target} is skipped and gives a value of {difference}; the "
                                 "modules after it expect what it gives (found while scanning, before the model ran)"
                                 ).at(node)
        return None

    def _op_swap(self, node):
        """A module's value replaced: the fake run does not see the replacement, but the modules after it
        expect the shape and dtype it had, so a replacement unlike it is an error here."""
        target = self.nodes[node.args[0].index]
        if target.op == "module_value" and (difference := unlike(self.values[target.index], self._resolve(node.args[1]))):
            raise ExecutionError(f"{self._where(node)}: {target.describe()} is replaced by a value of {difference}; the "
                                 "modules after it expect what it gave (found while scanning, before the model ran)"
                                 ).at(node)
        return None


def map_tensors(value, fn):
    """`value` with each tensor `t` in it (through tuples, lists and dicts) replaced by `fn(t)`."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


def fake_run(root: torch.nn.Module, modules, forward, mode: FakeTensorMode, seen: dict) -> None:
    """Call `forward()` under `mode` with the weights untouched, noting in `seen` each call of `modules` ((path,
    module) pairs): `(path, "input", call) -> (args, kwargs)` and `(path, "output", call) -> output`. What was
    seen before an error stays in `seen`."""
    counts: dict[tuple, int] = {}
    handles = []

    def record(path, kind, value):
        call = counts.get((path, kind), 0)
        counts[(path, kind)] = call + 1
        seen[(path, kind, call)] = value

    for path, module in modules:
        handles.append(module.register_forward_pre_hook(
            lambda m, args, kwargs, path=path: record(path, "input", (args, kwargs)), with_kwargs=True))
        handles.append(module.register_forward_hook(lambda m, args, output, path=path: record(path, "output", output)))
    try:
        with batched_experts(root), fake_buffers(root, mode), mode, quiet("torch._subclasses.fake_tensor"), \
                torch.no_grad():
            forward()
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def batched_experts(module: torch.nn.Module):
    """Mixture-of-experts layers on `batched_mm` for a fake run: torch has no fake `grouped_mm` for float32."""
    get = getattr(module, "get_experts_implementation", None)
    original = get() if get is not None else None
    switch = original is not None and "grouped_mm" in original.values()
    if switch:
        module.set_experts_implementation({k: "batched_mm" if v == "grouped_mm" else v for k, v in original.items()})
    try:
        yield
    finally:
        if switch:
            module.set_experts_implementation(original)


@contextmanager
def fake_buffers(root: torch.nn.Module, mode: FakeTensorMode):
    """The model's buffers as fake tensors for a fake run, which writes some in place (a BatchNorm's running
    statistics, a step counter): the real ones must stay as they were."""
    real = [(module, name, buffer) for module in root.modules() for name, buffer in module._buffers.items()
            if buffer is not None]
    for module, name, buffer in real:
        module._buffers[name] = mode.from_tensor(buffer)  # (one fake per real tensor: shared ones stay shared)
    try:
        yield
    finally:
        for module, name, buffer in real:
            module._buffers[name] = buffer


@contextmanager
def quiet(logger_name: str):
    """Silence a logger: fake-tensor failures are reported as our errors, not printed as tracebacks."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
