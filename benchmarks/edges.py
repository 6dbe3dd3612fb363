"""Where an empty trace's time goes, and why it is not the same on 2 and 64 blocks.

Run `python benchmarks/edges.py [--rounds N]`. On random GPT-2s 64 wide with 2 and 64 blocks (16 tokens), each
side below is timed at the forward's edges (overhead.py's `edge_times`: the time outside the model's forward, one
call of each side per round in a shuffled order) and printed as the median over rounds of its edges minus the
bare forward's, with the 64-block figure over the 2-block one:

- the bare forward is `with torch.no_grad(): model(...)`; its own edges are printed too (on 64 blocks they hold
  the freeing of its output, 64 blocks' key-value cache);
- a raw hook's fixed cost: one forward hook registered on block 0 before the call and removed after, with a body
  that does nothing (what any hand-written hook pays besides its body);
- interlace's run, layer by layer: the grad switch it uses instead of `torch.no_grad()`, then with the collector's
  pause around it (`interlace.collector`), then with an interleaver on an empty graph (the plan, the guard, the
  hooks' install), then the whole `with model.trace(..., early_stop=False): pass` (tracer, request, `Model.run`);
- what a cold cache line costs after each forward: reading one byte from each of 64 lines of a 64 MB buffer (1 MB
  apart), against reading one byte 64 times (the same Python work, one line), divided by 63.

The second table is the mechanism: a 64-block forward streams ~25 MB (weights and the vocabulary projection)
through a 32 MB last-level cache that other processes share, a 2-block one ~13 MB; after the longer one what
runs next finds more of its lines in memory rather than in that cache, at 1.5 to 3 times the cost each (two runs
of 7 December). Any Python work between two forwards pays it, a raw hook's and the bare forward's own included:
a trace that does the same work on 2 and 64 blocks (bytecodes.py and misses.py count it) costs about twice the µs
on 64.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, os.environ.get("INTERLACE_CHECKOUT") or str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))
import interlace  # noqa: E402
from interlace import collector  # noqa: E402
from interlace.backends.local import Interleaver  # noqa: E402
from interlace.graph import Graph  # noqa: E402
from overhead import ModelSpec, _traced_items, added_at_edges, bare, edge_times, small_gpt2  # noqa: E402

BUFFER = 64 << 20  # bytes of the buffer whose lines are read cold
READS = 64  # lines read after the forward
ONE_LINE, SPREAD = f"then one line, read {READS} times", f"then {READS} lines, {BUFFER // READS >> 20} MB apart"


def sides(module, ids, buffer: bytearray) -> dict:
    call = partial(module, input_ids=ids)

    def raw_hook():
        handle = module.transformer.h[0].register_forward_hook(lambda mod, args, out: None)
        try:
            with torch.no_grad():
                call()
        finally:
            handle.remove()

    def grad_switch():
        was = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            call()
        finally:
            torch._C._set_grad_enabled(was)

    def paused():
        collector.pause()
        try:
            grad_switch()
        finally:
            collector.resume()

    def interleaver():
        collector.pause()
        try:
            Interleaver(Graph(), module, [(0, 1)], 1, early_stop=False).run(call)
        finally:
            collector.resume()

    spread = [n * (BUFFER // READS) for n in range(READS)]

    def reading(offsets):
        def run():
            with torch.no_grad():
                call()
            for offset in offsets:
                buffer[offset]
        return run

    return {"bare": bare(ModelSpec("", module, [], kwargs={"input_ids": ids})),
            "a raw hook registered and removed": raw_hook,
            "interlace's grad switch": grad_switch, "+ the collector's pause": paused,
            "+ an interleaver on an empty graph": interleaver,
            "the whole empty trace": _traced_items(interlace.Model(module), ids, 0, False, None),
            ONE_LINE: reading([BUFFER // 2] * READS),
            SPREAD: reading(spread)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=301)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    buffer = bytearray(b"\1" * BUFFER)  # (written once: every page is mapped)
    added, own = {}, {}
    for blocks in (2, 64):
        module, ids = small_gpt2(blocks)
        spent = edge_times(module, sides(module, ids, buffer), args.rounds)
        own[blocks] = statistics.median(spent["bare"]) / 1e3
        added[blocks] = {side: added_at_edges(spent, side) for side in spent if side != "bare"}
    print(f"torch {torch.__version__}, 1 thread, {args.rounds} rounds; µs at the forward's edges over the bare "
          "forward's, median\n")
    print("| at the forward's edges | GPT-2 2x64 | GPT-2 64x64 | 64 / 2 |\n|---|---|---|---|")
    print(f"| the bare forward's own | {own[2]:.1f} | {own[64]:.1f} | {own[64] / own[2]:.1f} |")
    for side in added[2]:
        if side.startswith("then"):
            continue
        ratio = f"{added[64][side] / added[2][side]:.1f}" if added[2][side] > 0 else "—"
        print(f"| {side} | {added[2][side]:+.1f} | {added[64][side]:+.1f} | {ratio} |")
    print("\n| after the forward, one cold line | GPT-2 2x64 | GPT-2 64x64 | 64 / 2 |\n|---|---|---|---|")
    each = {blocks: (added[blocks][SPREAD] - added[blocks][ONE_LINE])
            / (READS - 1) * 1e3 for blocks in (2, 64)}
    print(f"| ns | {each[2]:.0f} | {each[64]:.0f} | {each[64] / each[2]:.1f} |")


if __name__ == "__main__":
    main()
