"""Limits: the budgets an untrusted graph is held to, each with a default and a name to set it by.

Loading checks the byte and count limits before it parses or allocates; running checks the element,
value and time limits before each operation. A server builds one `Limits` from its command-line
flags (`--max-nodes`, ...); a local user passes one to `deserialize_graph` for data they did not make.

>>> Limits(max_nodes=10).max_nodes
10
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ..errors import InterlaceError


@dataclass(frozen=True)
class Limits:
    # bytes, checked while loading
    max_frame_bytes: int = 256 << 20  # the whole request or result, as received
    max_header_bytes: int = 32 << 20  # the JSON header, after decompression
    max_tensor_bytes: int = 256 << 20  # the tensor section, after decompression
    max_nodes: int = 100_000
    max_traces: int = 64  # traces in one request (a session)
    max_depth: int = 32  # nesting of tuples, lists and dicts in a value
    max_string_length: int = 10_000
    max_int_bits: int = 256  # Python ints, in the graph and computed
    # computed values, checked before each operation of an untrusted run
    max_list_length: int = 1_000_000  # Python containers, strings from tensors (tolist)
    max_pieces: int = 10_000  # tensors returned by split, chunk, unbind
    max_elements: int = 1 << 28  # elements of one result (1 GiB of float32)
    max_total_elements: int = 1 << 31  # elements created by the whole run
    max_result_bytes: int = 256 << 20  # saved values sent back
    max_seconds: float = 300.0  # wall clock of one run, checked between operations
    flops_per_second: float = 1e11  # what one operation may assume of the machine, held to the time left
    # the model's own work
    max_tokens: int = 65_536  # token positions of one batch (rows x padded length)
    max_new_tokens: int = 1_024
    max_invokes: int = 256  # invokes of one trace (a server checks it before queueing)

    def __post_init__(self):
        """Every limit is a positive finite number: NaN would compare false and switch a check off."""
        for spec in fields(self):
            value = getattr(self, spec.name)
            if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
                raise InterlaceError(f"limit {spec.name} must be a positive finite number, not {value!r}")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


DEFAULT = Limits()  # (checking every field of a new one costs ~10 µs, on every trace)
