"""Limits: the budgets an untrusted graph is held to, each with a default and a name to set it by.

Loading checks the byte and count limits before it parses or allocates; running checks the element,
value and time limits before each operation. A server builds one `Limits` from its command-line
flags (`--max-nodes`, ...); a local user passes one to `deserialize_graph` for data they did not make.

>>> Limits(max_nodes=10).max_nodes
10
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from ..errors import InterlaceError


def _limit(default, described: str):
    """A field of `Limits`: its default, and what it bounds (the server's `--help` says it)."""
    return field(default=default, metadata={"help": described})


@dataclass(frozen=True)
class Limits:
    # bytes, checked while loading
    max_frame_bytes: int = _limit(256 << 20, "the most bytes of a whole request or result, as received")
    max_header_bytes: int = _limit(32 << 20, "the most bytes of a request's JSON header, after decompression")
    max_tensor_bytes: int = _limit(256 << 20, "the most bytes of a request's tensor section, after decompression")
    max_nodes: int = _limit(100_000, "the most nodes in a graph (each recorded operation is one)")
    max_traces: int = _limit(64, "the most traces in one request (a session)")
    max_depth: int = _limit(32, "the most levels of nesting of tuples, lists and dicts in a value")
    max_string_length: int = _limit(10_000, "the most characters of a string in a graph (a prompt's: "
                                            "--max-prompt-length)")
    max_prompt_length: int = _limit(
        1_000_000, "the most characters of a prompt (a string an invoke passes), before tokenizing (its tokens: "
                   "--max-tokens)")
    max_int_bits: int = _limit(256, "the most bits of a Python int, in a graph or computed by it")
    # computed values, checked before each operation of an untrusted run
    max_list_length: int = _limit(1_000_000, "the most items of a Python container a run computes (or "
                                             "characters of a string, from tolist)")
    max_pieces: int = _limit(10_000, "the most tensors one split, chunk or unbind may return")
    max_elements: int = _limit(1 << 28, "the most elements of one computed tensor (1 << 28: 1 GiB of float32)")
    max_total_elements: int = _limit(1 << 31, "the most elements of all the tensors a job creates, together")
    max_result_bytes: int = _limit(256 << 20, "the most bytes of the saved values a job sends back")
    max_seconds: float = _limit(300.0, "the most seconds of wall clock a job may run (checked between operations)")
    flops_per_second: float = _limit(
        1e11, "not a limit but the machine's speed the server assumes, in floating-point operations per "
              "second: an operation that would take longer than its job's time left at this rate is refused before "
              "it runs")
    # the model's own work
    max_tokens: int = _limit(65_536, "the most token positions of one batch (rows x padded length)")
    max_new_tokens: int = _limit(1_024, "the most new tokens one generation may ask for")
    max_invokes: int = _limit(256, "the most invokes in one trace (checked before the job is queued)")

    def __post_init__(self):
        """Every limit is a positive finite number: NaN would compare false and switch a check off."""
        for spec in fields(self):
            value = getattr(self, spec.name)
            if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
                raise InterlaceError(f"limit {spec.name} must be a positive finite number, not {value!r}")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def described(cls, name: str) -> str:
        """What limit `name` bounds, in words."""
        return next(f.metadata["help"] for f in fields(cls) if f.name == name)


DEFAULT = Limits()  # (checking every field of a new one costs ~10 µs, on every trace)
