"""interlace: read and change the internals of any PyTorch model.

>>> import torch, interlace
>>> net = interlace.Model(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh()))
>>> with net.trace(torch.ones(1, 3)):
...     hidden = net[0].output.save()
>>> isinstance(hidden, torch.Tensor)
True
"""

from . import tracer as _tracer
from .backends.local import BatchIndexWarning
from .envoy import Envoy
from .errors import (
    CancelledError,
    ExecutionError,
    GraphError,
    InterlaceError,
    LimitError,
    ModelError,
    ModulePathError,
    NotSavedError,
    OutOfOrderError,
    ProxyValueError,
    RefusedError,
    SerializationError,
)
from .graph import Graph, Node
from .models.base import Model
from .models.language import LanguageModel
from .models.standardized import RenameConfig, StandardizationError, StandardizedTransformer
from .proxy import Proxy
from .wrapper import WrapperModule

NNsight = Model


def apply(fn, *args, **kwargs):
    """Run `fn` on the real values of `args` when the graph runs (inside a trace), else call it now."""
    if not _tracer._active:
        return fn(*args, **kwargs)
    return _tracer.current().apply(fn, *args, **kwargs)


def list():  # noqa: A001 - mirrors the builtin on purpose: a list that lives in the graph
    """A list recorded in the graph; `.append(value)` inside loops and steps, `.save()` to keep it."""
    return _tracer.current().record("call", "builtins.list")


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
    "StandardizationError",
    "StandardizedTransformer",
    "WrapperModule",
    "apply",
    "list",
]
