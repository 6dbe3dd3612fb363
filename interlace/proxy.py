"""Proxy: a stand-in for a value that exists only when the graph runs.

Every operator, attribute read, method call, indexing and `torch.*` function (through
`__torch_function__`) on a proxy appends a node to its recorder's graph and returns a new proxy.
Using a proxy where Python needs the real value now (`if`, `int()`, `len()`, iteration) raises a
`ProxyValueError` that says what to use instead.
"""

from __future__ import annotations

import operator
from collections.abc import KeysView

from . import ops
from .errors import InterlaceError, NotSavedError, ProxyValueError, describe_location

_MISSING = object()


class Proxy:
    """The recorded value of one graph node.

    >>> import torch, interlace
    >>> net = interlace.Model(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU()))
    >>> with net.trace(torch.ones(1, 2)):
    ...     h = net[0].output.save()
    >>> tuple(h.shape)
    (1, 3)
    """

    __slots__ = ("_tracer", "_index")

    def __init__(self, tracer, index: int):
        _set_tracer(self, tracer)  # (the slots' own setters: `__setattr__` records, and one proxy is made a node)
        _set_index(self, index)

    # -- verbs -----------------------------------------------------------------------------
    def save(self) -> "Proxy":
        """Keep this value after the trace; the name bound to it then holds the real value."""
        self._tracer.mark_saved(self)
        return self

    def stop(self) -> None:
        """End the model's forward once this value is computed (nnsight's `module.output.stop()`)."""
        self._tracer.record("stop")

    @property
    def value(self):
        """The real value after the trace ran (only for saved proxies)."""
        tracer = self._tracer
        value = tracer.results.get(self._index, _MISSING)
        if value is _MISSING:
            node = tracer.graph[self._index]
            job, stream = getattr(tracer, "job", None), getattr(tracer, "_stream", None)
            if node.saved and stream is not None and not tracer.results and not tracer.missing:
                raise NotSavedError(f"{node.describe()} has no value: {stream.unbound()}")  # (remote too)
            if node.saved and job is not None and not tracer.results and not tracer.missing:
                raise NotSavedError(f"{node.describe()} has no value yet: job {job.id} is not finished (or not "
                                    "fetched); call tracer.job.result() first, which waits and then binds it")
            if node.saved and tracer._closed:
                reason = tracer.missing.get(self._index, "the run did not reach it")
                raise NotSavedError(f"{node.describe()} was saved but has no value: {reason}.")
            if not tracer._closed:
                raise NotSavedError(
                    f"{node.describe()} is a value of a trace that is still open: it has a value once that trace's "
                    "`with` block has ended and its model has run. Use it in that trace, or in a trace after it")
            recorded = describe_location(node.location)  # which of the trace's lines made it
            raise NotSavedError(
                (f"{recorded}: " if recorded else "") + f"{node.describe()} was not saved, so it is gone after the "
                "trace. Call .save() on it inside the trace to keep it."
            )
        return value

    def _scanned(self):
        """This value on fake tensors while scanning (`trace(..., scan=True)`), else None."""
        scanner = self._tracer.scanner
        return None if scanner is None or self._tracer._closed else scanner.values.get(self._index)

    @property
    def shape(self):
        """The shape: a real `torch.Size` while scanning (`trace(..., scan=True)`), else traced."""
        value = self._scanned()
        if value is not None and hasattr(value, "shape"):
            return value.shape
        return self.__getattr__("shape")

    @property
    def grad(self) -> "Proxy":
        """The gradient of this value in the backward pass started inside the trace."""
        return self._tracer.record("grad", None, (self,))

    @grad.setter
    def grad(self, value) -> None:
        self._tracer.record("swap", None, (self.grad, value))

    def __setattr__(self, name, value):
        if name == "grad":
            return Proxy.grad.fset(self, value)
        raise ProxyValueError(
            f"cannot set attribute '{name}' on a traced value; only .grad can be assigned. "
            "To change a module's value assign to the module: `model.layer.output = new_value`."
        )

    # -- reads that record -----------------------------------------------------------------
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        if self._tracer._recorder() is None:  # after the trace: the value's (or why there is none)
            if name.startswith("_"):  # (what tools probe for, `_repr_html_`, is no value's business)
                raise AttributeError(name)
            return getattr(self.value, name)
        return _Attribute(self, name)

    def __getitem__(self, key):
        return self._tracer.item(self, key)

    def __setitem__(self, key, value) -> None:
        self._tracer.store(self, key, value)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        tracer = _find_tracer((args, kwargs))
        args, kwargs = tuple(args), dict(kwargs or {})
        name = ops.name_of(func)
        if name is not None:
            return tracer.record("call", name, args, kwargs)
        # a real tensor's method or operator with a traced argument: `steer + layer.output`
        method = ops.tensor_method_of(func)
        if method is not None:
            op, target, reflected = method
            return tracer.record(op, target, args[::-1] if reflected else args, kwargs)
        return tracer.record("call", func, args, kwargs)  # any other callable: local traces only

    # -- values Python needs now -----------------------------------------------------------
    # (after the trace a proxy left unbound has no value: it was not saved, or not computed; reading it
    # raises NotSavedError saying which)
    def __bool__(self):
        if self._tracer._closed:
            return bool(self.value)
        raise ProxyValueError(
            "a traced value was used as a Python bool (`if`, `and`, `or`, `not`), but it has no "
            "value until the model runs. Use `with tracer.cond(value):` for a data-dependent "
            "branch, or compute on it with interlace.apply(fn, value)."
        )

    def _needs_value(self, what: str, convert):
        """`convert(value)` after the trace; during it, an error saying what to do instead."""
        if self._tracer._closed:
            return convert(self.value)
        raise ProxyValueError(
            f"a traced value was used as {what}, but it has no value until the model runs. "
            "Keep it as a proxy (index and compute with torch ops), or use "
            "interlace.apply(fn, value) to run your own function on the real value; for a size "
            "(`value.shape[1]`, `value.size(0)`), trace with scan=True, which makes shapes real numbers."
        )

    def __int__(self):
        return self._needs_value("a Python int", int)

    def __float__(self):
        return self._needs_value("a Python float", float)

    def __index__(self):
        return self._needs_value("an index (int)", operator.index)

    def __len__(self):
        scanned = self._scanned()
        if isinstance(scanned, (tuple, list)):  # a tuple's length is known while scanning, as a shape is
            return len(scanned)
        return self._needs_value("len(); use value.shape[0] (a traced value) instead", len)

    def __iter__(self):
        node = self._tracer.graph[self._index]
        if not self._tracer._closed and node.op == "module_value" and node.kwargs["kind"] == "inputs":
            return iter((self[0], self[1]))  # always a pair: `args, kwargs = module.inputs`
        scanned = self._scanned()
        if isinstance(scanned, (tuple, list)):  # `hidden, weights = attention.output` while scanning
            return iter([self[i] for i in range(len(scanned))])
        if node.op == "call_method" and node.target == "keys" and not self._tracer._closed:
            # `{**kwargs}`, `dict(**kwargs)`, `f(**kwargs)` iterate `kwargs.keys()`: its names are known while
            # scanning, as a tuple's length is (each value then is `kwargs[name]`, a traced value)
            if isinstance(scanned, KeysView):
                return iter(list(scanned))
            # (not a TypeError: Python would put its own "keys() returned a non-iterable" in its place)
            raise InterlaceError(
                "a traced mapping was unpacked (`{**kwargs}`, `dict(**kwargs)`, `f(**kwargs)`), but its keys are "
                "known only when the model runs. Read one value as kwargs['name'] (a traced value), or trace with "
                "scan=True, which knows the keys (then `{**kwargs}` gives a dict of traced values)"
            )
        return self._needs_value("an iterable (a for loop or `a, b = value`); index it instead, e.g. value[0]", iter)

    def __str__(self) -> str:
        if self._tracer._closed:
            return str(self.value)
        # (`print(h)` in the block: its value comes when the graph runs)
        return repr(self)[:-1] + ": no value while recording; tracer.log(value) prints it when the trace runs, " \
            "trace(..., scan=True) gives shapes now>"

    def __repr__(self) -> str:
        value = self._tracer.results.get(self._index, _MISSING)
        if value is not _MISSING:
            return repr(value)
        text = f"<Proxy {self._tracer.graph[self._index].describe()} (%{self._index})"
        if self._tracer._closed:  # (repr never raises: a debugger or a REPL shows it)
            try:
                self.value
            except NotSavedError as error:
                text += f": {error}"
        return text + ">"

    __hash__ = object.__hash__


_set_tracer, _set_index = Proxy._tracer.__set__, Proxy._index.__set__


class _Attribute(Proxy):
    """`proxy.name`: becomes a `getattr` node when used as a value, a method call when called."""

    __slots__ = ("_base", "_name")

    def __init__(self, base: Proxy, name: str):
        object.__setattr__(self, "_tracer", base._tracer)
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_index", None)

    def __getattribute__(self, name):
        if name == "_index":
            index = object.__getattribute__(self, "_index")
            if index is None:
                base, attr = object.__getattribute__(self, "_base"), object.__getattribute__(self, "_name")
                index = base._tracer.record("call", "builtins.getattr", (base, attr))._index
                object.__setattr__(self, "_index", index)
            return index
        return object.__getattribute__(self, name)

    def __call__(self, *args, **kwargs):
        return self._tracer.record("call_method", self._name, (self._base,) + args, kwargs)


def _find_tracer(obj):
    if isinstance(obj, Proxy):
        return obj._tracer
    if isinstance(obj, (tuple, list)):
        for item in obj:
            found = _find_tracer(item)
            if found is not None:
                return found
    if isinstance(obj, dict):
        return _find_tracer(tuple(obj.values()))
    return None


# the operators' registry names are looked up once, here, not on every use
def _binary(fn):
    name = ops.name_of(fn)

    def method(self, other):
        return self._tracer.record("call", name, (self, other))

    return method


def _reflected(fn):
    name = ops.name_of(fn)

    def method(self, other):
        return self._tracer.record("call", name, (other, self))

    return method


def _in_place(fn):
    name = ops.name_of(fn)

    def method(self, other):
        changed = self._tracer.record("call", name, (self, other))
        # `x op= y` binds the name `x` to this node: a saved `x` stays saved (a tensor's is the same object, changed)
        nodes = self._tracer.graph.nodes
        if nodes[self._index].saved and type(changed) is Proxy and changed._tracer.graph.nodes is nodes:
            changed.save()
        return changed

    return method


def _unary(fn):
    name = ops.name_of(fn)

    def method(self):
        return self._tracer.record("call", name, (self,))

    return method


for _name in "add sub mul truediv floordiv mod pow matmul and or xor lshift rshift".split():
    _fn = getattr(operator, _name + ("_" if _name in ("and", "or") else ""))
    setattr(Proxy, f"__{_name}__", _binary(_fn))
    setattr(Proxy, f"__r{_name}__", _reflected(_fn))
    setattr(Proxy, f"__i{_name}__", _in_place(getattr(operator, f"i{_name}")))
for _name in "lt le eq ne gt ge".split():
    setattr(Proxy, f"__{_name}__", _binary(getattr(operator, _name)))
for _name in "neg pos abs invert".split():
    setattr(Proxy, f"__{_name}__", _unary(getattr(operator, _name)))
