"""How many Python bytecodes does interlace run on top of a plain forward? A count, not a time.

Run `python benchmarks/bytecodes.py [--by-function]`. On the shared machines a timing moves by several µs per
item between runs of the same code (see overhead.py), so a change of a few per cent to a trace's cost is
lost in them; the number of bytecodes a trace runs is the same on every run. It is not a time (a C call is
one bytecode, and a line run cold costs several times one run warm: see docs/performance.md), but work
taken off the Python path shows here exactly, and so does work added to it.

On a random GPT-2 (8 blocks, 64 wide, 16 tokens, early stop off), with `sys.settrace` counting opcodes in
every Python frame: an empty trace over the bare forward, and each extra save or steering edit
(`output[:, -1] += c`) of a block over the same work done by raw PyTorch hooks (registered and removed per
call, as in overhead.py), from the counts at 0 and 8 items. `--by-function` lists where interlace's go.
`INTERLACE_CHECKOUT=/path/to/checkout` counts another checkout's interlace (a commit to compare with).
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.environ.get("INTERLACE_CHECKOUT") or str(Path(__file__).resolve().parents[1]))
import interlace  # noqa: E402
from overhead import _raw_items, _traced_items, small_gpt2  # noqa: E402

ITEMS = 8


def count(run, by_function: collections.Counter | None = None) -> int:
    """Bytecodes `run()` executes in Python frames (after two runs, so that everything is imported and made), with the
    garbage collector off (a collection now and then could run finalizers' Python on either side of a difference)."""
    run()
    run()
    total = 0

    def trace(frame, event, arg):
        nonlocal total
        frame.f_trace_opcodes = True
        if event == "opcode":
            total += 1
            if by_function is not None:
                by_function[(frame.f_code.co_filename, frame.f_code.co_name)] += 1
        return trace

    gc.disable()
    sys.settrace(trace)
    try:
        run()
    finally:
        sys.settrace(None)
        gc.enable()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--by-function", action="store_true", help="where interlace's bytecodes go, per item")
    options = parser.parse_args()
    module, ids = small_gpt2(ITEMS)
    net = interlace.Model(module)
    steer = torch.full((64,), 0.01)

    def bare():
        with torch.no_grad():
            module(input_ids=ids)

    empty = count(_traced_items(net, ids, 0, False, steer))
    print(f"interlace {interlace.__file__}")
    print(f"empty trace: {empty - count(bare)} bytecodes over the bare forward")
    for work, edit in (("save", False), ("edit", True)):
        ours = (count(_traced_items(net, ids, ITEMS, edit, steer)) - empty) / ITEMS
        raw = (count(_raw_items(module, ids, ITEMS, edit, steer)) - count(_raw_items(module, ids, 0, edit, steer)))
        raw /= ITEMS
        print(f"each extra {work}: {ours:.0f} bytecodes, raw hooks {raw:.0f} (raw + {ours - raw:.0f})")
        if options.by_function:
            with_items, without = collections.Counter(), collections.Counter()
            count(_traced_items(net, ids, ITEMS, edit, steer), with_items)
            count(_traced_items(net, ids, 0, edit, steer), without)
            package = str(Path(interlace.__file__).parent)
            per_item = {key: (n - without[key]) / ITEMS for key, n in with_items.items() if key[0].startswith(package)}
            for (filename, function), n in sorted(per_item.items(), key=lambda item: -item[1])[:15]:
                print(f"    {n:6.0f}  {os.path.relpath(filename, package)}:{function}")


if __name__ == "__main__":
    main()
