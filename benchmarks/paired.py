"""A change's cost per trace and per item, against another checkout, in paired rounds of one process.

Run `python benchmarks/paired.py BASELINE_CHECKOUT [--rounds N]`. Both packages are loaded in this process (the
baseline's under another name, as `hooks.py --baseline` does), and each round runs every variant once, in a
shuffled order: an empty trace of a 2-block and of a 64-block GPT-2 (is it flat in depth?), and 64 saves and 64
steering edits (`out[:, -1] += c`) of the 64-block one, for this checkout, the baseline and raw PyTorch hooks,
beside the bare forward. Printed: the median
over rounds of (this checkout − baseline), and of each minus its reference (the bare forward for the empty
trace, raw hooks for saves and edits), per trace or per item (an item's share of its 64-item trace, the
trace's fixed cost included: ~1 µs an item). The empty trace is timed at the forward's edges (overhead.py's
`edge_times`: the time outside the model's forward), which leaves the forward's own noise out: on 64 blocks the
whole call's varies by more than a trace costs. Where each package's code lies in memory moves that figure too:
two copies of the same commit read 0.1-2.7 µs apart on 2 blocks and 6-10 µs on 64, either way (three runs of 7
December), so a change smaller than that shows only on 2 blocks, or counted (bytecodes.py, misses.py).

Why: on a shared machine the same work times several µs per item apart from one run to the next (a slow spell
moves raw hooks' per-item cost from 12 to 21 µs), so a difference between two single-run fits under ~5 µs is
noise. Differences taken within a round see the same spell on both sides; their median moves by 1-3 µs per
item from run to run (three runs of 6 December, an edit: -1.3, -1.4 and, with another script of the same
design, -2.4 to -6.1 µs), so run it two or three times and read the sign and the size across them.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hooks import load_baseline  # noqa: E402
from overhead import _raw_items, _traced_items, edge_times, interlace, small_gpt2  # noqa: E402

ITEMS = 64


def variants(packages: dict, work: str, blocks: int) -> tuple[dict, int, torch.nn.Module]:
    """The callables to time for `work` ("empty", "save", "edit") on a GPT-2 of `blocks` blocks, the count of
    items each does, and the model."""
    empty = work == "empty"
    module, ids = small_gpt2(blocks)
    items = 0 if empty else ITEMS
    steer = torch.full((64,), 0.01)

    def bare():
        with torch.no_grad():
            module(input_ids=ids)

    runs = {"bare": bare, "raw hooks": _raw_items(module, ids, items, work == "edit", steer)}
    for name, package in packages.items():
        net = package.Model(module)
        runs[name] = _traced_items(net, ids, items, work == "edit", steer, {"early_stop": False})
    return runs, items, module


def paired(runs: dict, rounds: int) -> dict:
    """CPU seconds of each run, one list per name, every name timed once a round in a shuffled order."""
    times = {name: [] for name in runs}
    names = list(runs)
    for run in runs.values():  # (warm up)
        run()
    for _ in range(rounds):
        random.shuffle(names)
        for name in names:
            start = time.thread_time()
            runs[name]()
            times[name].append(time.thread_time() - start)
    return times


def median_difference(a: list, b: list, per: int) -> float:
    return statistics.median(x - y for x, y in zip(a, b)) * 1e6 / max(per, 1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("baseline", metavar="BASELINE_CHECKOUT", help="a checkout (a `git worktree`) to compare with")
    parser.add_argument("--rounds", type=int, default=300, help="rounds per kind of work")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        packages = {"this": interlace, "baseline": load_baseline(args.baseline, scratch)}
        print(f"torch {torch.__version__}, 1 thread, {args.rounds} rounds; medians over rounds of paired differences\n")
        print("| work (reference) | this − baseline | this − reference | baseline − reference |")
        print("|---|---|---|---|")
        for work, blocks in (("empty", 2), ("empty", ITEMS), ("save", ITEMS), ("edit", ITEMS)):
            runs, items, module = variants(packages, work, blocks)
            if work == "empty":
                spent = edge_times(module, runs, args.rounds)
                times = {name: [ns / 1e9 for ns in each] for name, each in spent.items()}
            else:
                times = paired(runs, args.rounds)
            other = "bare" if work == "empty" else "raw hooks"
            unit = "µs a trace" if work == "empty" else "µs an item"
            cells = [median_difference(times["this"], times["baseline"], items),
                     median_difference(times["this"], times[other], items),
                     median_difference(times["baseline"], times[other], items)]
            label = (f"empty trace at the forward's edges, {blocks} blocks (bare forward)" if work == "empty"
                     else f"each {work}, {blocks} blocks (raw hooks)")
            print(f"| {label} | " + " | ".join(f"{cell:+.2f} {unit}" for cell in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
