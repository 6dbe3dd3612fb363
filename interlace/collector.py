"""Pausing Python's cyclic garbage collector while a trace records and runs.

A trace makes several small objects per node (the node, its refs, proxies) that live until it ends.
Alive across the collector's young passes, they are moved to its oldest generation, and once about a
quarter of the objects there are new ones the collector walks every object of the process: hundreds
of thousands once torch and transformers are loaded, 0.1-0.3 s a walk. A trace makes no reference
cycles (its objects go by reference counting when it ends), so pausing the collector for its length
frees nothing later and removes that walk: on average ~20 µs per steering edit on a 64-block GPT-2
(`benchmarks/overhead.py`, its mean column). What other threads make meanwhile stays young, and the
first pass after the pause ends finds any cycles among it.

Pauses nest and may overlap across threads: the collector runs again when the last one ends, and
only if it ran before the first began (a caller who turned it off keeps it off). While pauses overlap
(threads tracing without a break), one of them starting or ending more than `LONGEST` seconds after
the overlap began, or after the last such pass, collects the young generation, so the cycles other
threads make never wait for long.

`settle()` is for a server's processes, once loaded: what they keep for good leaves the collector's
walks altogether.
"""

from __future__ import annotations

import gc
import threading
import time
from contextlib import contextmanager

LONGEST = 1.0  # seconds of overlapping pauses before the young generation is collected anyway

_lock = threading.Lock()
_pauses = 0
_was_enabled = False
_overlap_since: float | None = None  # when pauses began to overlap, or the last young pass since; None: none held


def pause() -> None:
    """Stop automatic collection until the matching `resume()`."""
    global _pauses, _was_enabled
    # (`with`, not acquire() then try: a Ctrl-C raised as acquire() returns would leave the lock held, and the
    # next trace waiting for it for good)
    with _lock:
        if not _pauses:
            _was_enabled = gc.isenabled()
            gc.disable()
        else:
            _collect_if_long()
        _pauses += 1


def resume() -> None:
    """End one `pause()`; the last one to end turns collection back on (if it was on)."""
    global _pauses, _overlap_since
    with _lock:
        _pauses -= 1
        if not _pauses:
            _overlap_since = None
            if _was_enabled:
                gc.enable()
        else:
            _collect_if_long()


def _collect_if_long() -> None:
    """(A pause starts or ends while others hold.) The clock is read only here: one pause at a time never reads it."""
    global _overlap_since
    if not _was_enabled:
        return
    now = time.monotonic()
    if _overlap_since is None:
        _overlap_since = now
    elif now - _overlap_since > LONGEST:
        gc.collect(0)
        _overlap_since = now


def settle() -> None:
    """In a long-lived process (a server's front, its worker process) once it holds what it keeps for good
    (torch, transformers, the model, the app): collect, then move every object left to the collector's
    permanent generation (`gc.freeze`). Its full passes then walk only what came after: in a server's front
    one walked the ~350,000 objects that loading leaves in 0.2 s (224 ms, once every 10-40 jobs of
    benchmarks/streaming.py), holding up every request meanwhile; now one takes ~3 ms."""
    gc.collect()
    gc.freeze()


@contextmanager
def paused():
    """`with paused():` the collector does not run inside the block."""
    pause()
    try:
        yield
    finally:
        resume()
