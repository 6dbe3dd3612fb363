"""What a trace costs when the caches are cold, as they are after a large model's forward.

Run `python benchmarks/cold.py`. On a tiny model (Linear(4, 4), so the forward itself costs next to
nothing), it times the bare forward and an empty trace (early stop off), each right after streaming
N MB of other data through the caches (an in-place add over a buffer), and prints what the trace adds
for each N. A 64-block GPT-2 64 wide streams ~25 MB per forward (weights and its 13 MB vocabulary
projection): what a trace adds after such a forward is the row near that size, not the first row.
CPU time of this thread, one torch thread, lower quartile of the repeats.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import interlace  # noqa: E402


def _lower_quartile(run, before, repeats: int) -> float:
    """µs of `run()` (CPU time), each time right after `before()`."""
    spent = []
    for _ in range(repeats):
        before()
        start = time.thread_time_ns()
        run()
        spent.append(time.thread_time_ns() - start)
    spent.sort()
    return spent[len(spent) // 4] / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 1, 4, 16, 32, 64], help="MB streamed before each")
    args = parser.parse_args()
    torch.set_num_threads(1)
    module = torch.nn.Linear(4, 4).eval()
    model = interlace.Model(module)
    x = torch.randn(1, 4)
    buffer = torch.zeros(max(args.sizes) * 2**20 // 4)

    def bare():
        with torch.no_grad():
            module(x)

    def empty():
        with model.trace(x, early_stop=False):
            pass

    print(f"{'MB streamed before':>20}{'bare forward µs':>18}{'empty trace µs':>17}{'trace adds µs':>16}")
    for size in args.sizes:
        part = buffer[: size * 2**20 // 4]

        def stream():
            if part.numel():
                part.add_(1.0)

        for _ in range(20):  # warm both paths
            bare()
            empty()
        alone = _lower_quartile(bare, stream, args.repeats)
        traced = _lower_quartile(empty, stream, args.repeats)
        print(f"{size:>20}{alone:>18.1f}{traced:>17.1f}{traced - alone:>16.1f}")


if __name__ == "__main__":
    main()
