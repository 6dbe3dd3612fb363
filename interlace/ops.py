"""The registry of callables a graph may name: stable names <-> callables, and allowed method names.

This is the whitelist a server trusts. `call` nodes name an entry here (`operator.add`,
`torch.softmax`, `torch.nn.functional.gelu`, `Tensor.add`, `builtins.getattr`, ...); `call_method`
nodes name a method from `METHODS`. Anything else is a user callable, which only a trusted graph may
hold. The tables are built once, on first use.
"""

from __future__ import annotations

import builtins
import operator

import torch

_OPERATOR_NAMES = (
    "add sub mul truediv floordiv mod pow matmul neg pos abs invert and_ or_ xor lshift rshift "
    "lt le eq ne gt ge not_ truth getitem setitem delitem contains "
    "iadd isub imul itruediv ifloordiv imod ipow imatmul iand ior ixor ilshift irshift"
).split()
_BUILTIN_NAMES = (
    "getattr list tuple dict set len min max sum abs round any all sorted reversed zip "
    "enumerate range int float bool str isinstance slice"
).split()
_TORCH_NAMESPACES = {
    "torch": torch,
    "torch.nn.functional": torch.nn.functional,
    "torch.linalg": torch.linalg,
    "torch.fft": torch.fft,
    "torch.special": torch.special,
}
# Python container and ModelOutput methods a recorded value may call, beside every public
# torch.Tensor method.
_EXTRA_METHODS = (
    "append extend insert pop index count keys values items get update copy to_tuple "
    "__getitem__ __setitem__ __len__ __contains__"
).split()
# Callables that touch files, global state or the process: never reachable from a graph's names.
_REFUSED = frozenset(
    "torch.save torch.load torch.from_file torch.compile torch.manual_seed torch.seed "
    "torch.set_default_dtype torch.set_default_device torch.set_default_tensor_type "
    "torch.set_num_threads torch.set_num_interop_threads torch.set_grad_enabled "
    "torch.set_printoptions torch.set_rng_state torch.set_flush_denormal "
    "torch.set_deterministic_debug_mode torch.set_float32_matmul_precision "
    "torch.set_warn_always torch.use_deterministic_algorithms torch.set_anomaly_enabled".split()
)
_REFUSED_METHODS = frozenset(
    "set_ untyped_storage storage data_ptr share_memory_ register_hook "
    "register_post_accumulate_grad_hook apply_ map_ map2_ numpy pin_memory".split()
)
# In-place operations: a node with one of these targets changes its first argument.
MUTATING_TARGETS = frozenset(
    ["operator.setitem", "operator.delitem"]
    + [f"operator.{name}" for name in _OPERATOR_NAMES if name.startswith("i") and name != "invert"]
)

_by_name: dict[str, object] = {}
_by_id: dict[int, str] = {}
METHODS: frozenset[str] = frozenset()


def _build() -> None:
    global METHODS
    table: dict[str, object] = {}
    for name in _OPERATOR_NAMES:
        table[f"operator.{name}"] = getattr(operator, name)
    for name in _BUILTIN_NAMES:
        table[f"builtins.{name}"] = getattr(builtins, name)
    for prefix, namespace in _TORCH_NAMESPACES.items():
        for name in dir(namespace):
            if name.startswith("_"):
                continue
            value = getattr(namespace, name, None)
            qualified = f"{prefix}.{name}"
            if callable(value) and not isinstance(value, type) and qualified not in _REFUSED:
                table.setdefault(qualified, value)
    tensor_methods = []
    for name in dir(torch.Tensor):
        value = getattr(torch.Tensor, name, None)
        if not callable(value) or (name.startswith("_") and not name.startswith("__")):
            continue
        if name in _REFUSED_METHODS:
            continue
        table[f"Tensor.{name}"] = value
        if not name.startswith("__"):
            tensor_methods.append(name)
    for name, value in table.items():
        _by_id.setdefault(id(value), name)
    _by_name.update(table)
    METHODS = frozenset(tensor_methods + _EXTRA_METHODS)


def _ensure() -> None:
    if not _by_name:
        _build()


def name_of(fn) -> str | None:
    """The registry name of `fn`, or None when it is not a registry entry."""
    _ensure()
    return _by_id.get(id(fn))


def resolve(name: str):
    """The callable registered under `name`; KeyError names the unknown entry."""
    _ensure()
    try:
        return _by_name[name]
    except KeyError:
        raise KeyError(f"'{name}' is not a registered operation") from None


def is_registered(name) -> bool:
    _ensure()
    return isinstance(name, str) and name in _by_name


def allowed_method(name: str) -> bool:
    _ensure()
    return name in METHODS


def allowed_attribute(name: str) -> bool:
    """Attribute reads a graph may record: anything but private and dunder names."""
    return not name.startswith("_")


def is_in_place_method(name: str) -> bool:
    """Tensor methods like `add_` and `zero_` change the tensor they are called on."""
    return name.endswith("_") and not name.startswith("_") or name == "__setitem__"
