"""Envoy: the mirror of one `nn.Module` that users reach into during a trace.

`envoy.output`, `.input` and `.inputs` record reads of the module's values; assigning to them records
a replacement; `.next()` moves to the module's next call (a later generation step), `.skip(value)`
makes the module not run, and calling an envoy runs its module on traced values. Child modules are
attributes (`net.layer1`) and items (`net.layers[3]`), exactly as in the wrapped module.
"""

from __future__ import annotations

import copy

import torch

from .errors import InterlaceError, ModulePathError


class Envoy:
    """Mirror of a module and its children.

    >>> import torch, interlace
    >>> net = interlace.Model(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
    >>> net[1].path
    '1'
    """

    def __init__(self, module: torch.nn.Module, path: str = "", root: "Envoy | None" = None):
        self._module = module
        self._path = path
        self._root = root if root is not None else self
        self._call = 0  # fixed call index chosen with at_call()
        self._tracer = None  # set on the root while a trace records
        self._aliases: dict[str, Envoy] = {}  # from Model(rename=...)
        self._children = {
            name: Envoy(child, f"{path}.{name}" if path else name, self._root)
            for name, child in module.named_children()
        }

    # -- tree -------------------------------------------------------------------------------
    @property
    def path(self) -> str:
        """The module's path as in `named_modules()` ('' for the root)."""
        return self._path

    @property
    def module(self) -> torch.nn.Module:
        return self._module

    def modules(self):
        """This envoy and every envoy below it, depth first."""
        yield self
        for child in self._children.values():
            yield from child.modules()

    def get(self, path: str) -> "Envoy":
        """The envoy at a dotted module path (`'layers.3.mlp'`)."""
        envoy = self
        for part in filter(None, path.split(".")):
            if part in envoy._children:
                envoy = envoy._children[part]
            elif part in envoy._aliases:
                envoy = envoy._aliases[part]
            else:
                raise ModulePathError(_missing_child(envoy, part))
        return envoy

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_children", "_module", "_root", "_path", "_aliases"):
            raise AttributeError(name)
        children = self._children
        if name in children:
            return children[name]
        if name in self._aliases:
            return self._aliases[name]
        tracer = self._root._tracer
        module = self._module
        if tracer is not None and (name in module._parameters or name in module._buffers):
            full = f"{self._path}.{name}" if self._path else name
            return tracer.record("parameter", full)
        try:
            return getattr(module, name)
        except AttributeError:
            raise ModulePathError(_missing_child(self, name)) from None

    def __getitem__(self, key):
        names = list(self._children)
        if isinstance(key, int):
            try:
                return self._children[names[key]]
            except IndexError:
                raise ModulePathError(
                    f"{self._path or 'the model'} has {len(names)} children; index {key} is out of range"
                ) from None
        if isinstance(key, str):
            return self.get(key)
        raise ModulePathError(f"index a module with an int or a path string, not {type(key).__name__}")

    def __len__(self) -> int:
        return len(self._children)

    def __iter__(self):
        return iter(self._children.values())

    def __repr__(self) -> str:
        return repr(self._module)

    # -- values -----------------------------------------------------------------------------
    def _active(self, what: str):
        tracer = self._root._tracer
        if tracer is None:
            raise InterlaceError(
                f"`{self._path or 'model'}.{what}` exists only inside `with model.trace(...)` "
                "(or `model.generate(...)`): the module's values are produced when the model runs."
            )
        return tracer

    def _value(self, kind: str):
        return self._active(kind).module_value(self, kind)

    def _replace(self, kind: str, value) -> None:
        tracer = self._active(kind)
        tracer.record("swap", None, (tracer.module_value(self, kind), value))

    output = property(lambda self: self._value("output"), lambda self, v: self._replace("output", v))
    output.__doc__ = "The module's output; assign to replace it."
    input = property(lambda self: self._value("input"), lambda self, v: self._replace("input", v))
    input.__doc__ = "The module's first input (first positional argument, else first keyword)."
    inputs = property(lambda self: self._value("inputs"), lambda self, v: self._replace("inputs", v))
    inputs.__doc__ = "All inputs of the call as `(args, kwargs)`; assign a pair to replace them."

    def next(self, steps: int = 1) -> "Envoy":
        """Move this module to its next call (the next generation step); returns the envoy."""
        self._active("next()").advance(self._path, steps)
        return self

    def at_call(self, call: int) -> "Envoy":
        """This module at its `call`-th call in the forward (0-based), e.g. a module run twice."""
        view = copy.copy(self)
        view._call = call
        return view

    def skip(self, value) -> None:
        """Do not run this module in this call; `value` is used as its output."""
        tracer = self._active("skip()")
        call, invoke = tracer.call_index(self), tracer.current_invoke
        tracer.record("skip", self._path, (value,), {"call": call, "invoke": invoke})

    def __call__(self, *args, **kwargs):
        tracer = self._root._tracer
        if tracer is None:
            return self._module(*args, **kwargs)
        return tracer.record("module_call", self._path, args, kwargs)


def _missing_child(envoy: Envoy, name: str) -> str:
    where = envoy._path or "the model"
    children = ", ".join(envoy._children) or "none"
    return (
        f"{where} ({type(envoy._module).__name__}) has no submodule or attribute '{name}'. "
        f"Its submodules are: {children}. Print the model to see the whole tree."
    )
