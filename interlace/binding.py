"""Binding: after a run, the caller's names that held saved proxies hold the real values.

A proxy cannot turn into a tensor, so the names in the caller's scope (and lists, dicts and tuples
there, a few levels deep) that hold saved proxies are rebound to their values instead; proxies held
anywhere else give their value through `.value` and behave like it when used.
"""

from __future__ import annotations

import ctypes
import sys
from itertools import compress

from .proxy import Proxy

_MISSING = object()
# Containers longer than this are not searched for saved proxies when binding names (that would
# cost time on every trace); proxies in them still work and give their value through `.value`.
LARGEST_SCANNED = 1024
_SEARCHED = (list, dict, tuple)
# what may hold a saved proxy, told apart by type alone: a notebook's scope has hundreds of names (IPython's
# `_i1`, `_i2`, ...) and lists of results that hold none; they are passed over in C, not with a call each
_HOLDERS = frozenset({Proxy, *Proxy.__subclasses__(), *_SEARCHED})


def values_of(obj):
    """`obj` with saved proxies replaced by their values, through containers."""
    if isinstance(obj, Proxy):
        return obj.value
    kind = type(obj)
    if kind is tuple or kind is list:
        return kind([values_of(item) for item in obj])
    if kind is dict:
        return {key: values_of(item) for key, item in obj.items()}
    return obj


def bound(obj, recorders: tuple, depth: int):
    """`obj` with the saved proxies of `recorders` replaced by values; lists and dicts change in place."""
    if isinstance(obj, Proxy):
        if obj._tracer in recorders:
            value = obj._tracer.results.get(obj._index, _MISSING)
            return obj if value is _MISSING else value
        return obj
    kind = type(obj)
    if depth == 0 or kind not in _SEARCHED or len(obj) > LARGEST_SCANNED:
        return obj
    if _HOLDERS.isdisjoint(map(type, obj.values() if kind is dict else obj)):
        return obj
    if kind is list:
        for i, item in enumerate(obj):
            new = bound(item, recorders, depth - 1)
            if new is not item:
                obj[i] = new
    elif kind is dict:
        for key, item in obj.items():
            new = bound(item, recorders, depth - 1)
            if new is not item:
                obj[key] = new
    elif kind is tuple:
        items = [bound(item, recorders, depth - 1) for item in obj]
        if any(new is not old for new, old in zip(items, obj)):
            return tuple(items)
    return obj


def bind_saved(frame, recorders: tuple) -> None:
    """Rebind the names in `frame` that hold saved proxies of `recorders` to their values.

    Module and class scopes are plain dicts; function locals need PyFrame_LocalsToFast before
    Python 3.13 (from 3.13 on, `f_locals` writes through).
    """
    scope = frame.f_locals
    changed = False
    for name in [*compress(scope, map(_HOLDERS.__contains__, map(type, scope.values())))]:
        obj = scope[name]
        new = bound(obj, recorders, 3)
        if new is not obj:
            scope[name] = new
            changed = True
    if changed and scope is not frame.f_globals and sys.version_info < (3, 13):
        ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))
