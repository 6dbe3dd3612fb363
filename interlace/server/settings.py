"""ServerSettings: everything an operator sets when starting `interlace serve`, with defaults.

The budgets of a single run are `Limits` (the executor's own); the rest bounds what one key and
the whole server take on: queue depth, rate, jobs at once, how long results are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..backends.limits import Limits


@dataclass(frozen=True)
class ServerSettings:
    limits: Limits = field(default_factory=Limits)
    queue_depth: int = 64  # jobs waiting per hosted model; more is 429
    rate_per_minute: int = 600  # jobs one key may submit per minute; more is 429
    concurrent_per_key: int = 16  # jobs of one key queued or running at once; more is 429
    max_invokes: int = 64  # invokes of one trace
    result_seconds: float = 3600.0  # how long a finished job's result is kept
    trusted: bool = False  # accept pickled user functions (interlace.apply): only for trusted users
    check_weights: bool = False  # checksum the weights after every job (a test mode)
