"""interlace: read and change the internals of any PyTorch model.

>>> import torch, interlace
>>> net = interlace.Model(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh()))
>>> with net.trace(torch.ones(1, 3)):
...     hidden = net[0].output.save()
>>> isinstance(hidden, torch.Tensor)
True
"""

import builtins
import importlib

# the public names and the modules that define them, imported on first use: `interlace keys ...` (which
# needs none of them) then starts without loading torch
_WHERE = {
    "BatchIndexWarning": ".backends.local", "Envoy": ".envoy", "Graph": ".graph", "Node": ".graph",
    "Model": ".models.base", "NNsight": ".models.base", "LanguageModel": ".models.language", "Proxy": ".proxy",
    "RenameConfig": ".models.standardized", "StandardizationError": ".models.standardized",
    "StandardizedTransformer": ".models.standardized", "StepsInPlainListWarning": ".tracer",
    "WrapperModule": ".wrapper",
    **{name: ".errors" for name in ("CancelledError", "ExecutionError", "GraphError", "InterlaceError", "LimitError",
                                    "ModelError", "ModulePathError", "NotSavedError", "OutOfOrderError",
                                    "ProxyValueError", "RefusedError", "SerializationError", "SourceError")},
}


def __getattr__(name: str):
    if name not in _WHERE:  # a submodule (interlace.tracer, ...), as eager imports made them attributes
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'interlace' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(_WHERE[name], __name__), "Model" if name == "NNsight" else name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)


def apply(fn, *args, **kwargs):
    """Run `fn` on the real values of `args` when the graph runs (inside a trace), else call it now."""
    from . import tracer

    if not tracer.active():
        return fn(*args, **kwargs)
    return tracer.current().apply(fn, *args, **kwargs)


def save(value):
    """Keep `value` after the trace, as `value.save()` does (nnsight's `nnsight.save(x)`): a traced value, or a
    list, tuple or dict holding traced values (each is saved; the name bound to the container then holds it
    with their real values). Returns `value`."""
    from .proxy import Proxy

    if isinstance(value, Proxy):
        return value.save()
    items = value.values() if type(value) is dict else value if type(value) in (tuple, builtins.list) else ()
    for item in items:
        save(item)
    return value


def list():  # noqa: A001 - mirrors the builtin on purpose: a list that lives in the graph
    """A list recorded in the graph; `.append(value)` inside loops and steps, `.save()` to keep it."""
    from . import tracer

    return tracer.current().record("call", "builtins.list")


__all__ = [
    "BatchIndexWarning",
    "CancelledError",
    "Envoy",
    "ExecutionError",
    "Graph",
    "GraphError",
    "InterlaceError",
    "LanguageModel",
    "LimitError",
    "Model",
    "ModelError",
    "ModulePathError",
    "NNsight",
    "Node",
    "NotSavedError",
    "OutOfOrderError",
    "Proxy",
    "ProxyValueError",
    "RefusedError",
    "RenameConfig",
    "SerializationError",
    "SourceError",
    "StandardizationError",
    "StandardizedTransformer",
    "StepsInPlainListWarning",
    "WrapperModule",
    "apply",
    "list",
    "save",
]
