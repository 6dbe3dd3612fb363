"""Does a trace cost more in a long script or a full notebook than in a small function? Two ratios.

Run `python benchmarks/user_code.py [--baseline CHECKOUT]`. A trace does two things that depend on the user's
code rather than on the model or the graph: each recorded node notes its line in the user's file, and at the
end of the `with` block the names in the caller's scope that hold saved proxies are bound to their values.
Both are measured side by side in one run (CPU time of this thread, one torch thread, lower quartile of
alternating repeats) on a random 2-block GPT-2 64 wide, with sources compiled at run time:

1. Recording 64 steering edits (`h[i].output[:, -1] += c`, the `with` body alone) in a loop at the top of a
   script's module-level code, and the same loop after 3,000 lines of it: µs per edit each, and their ratio
   (a frame's line number is found by reading its code's line table from the start: what matters is how far
   into one code object, a script's top level, a notebook cell or a function, the trace is).
2. A whole trace that saves one block's output, in a scope of 10 names, and in a scope like a long notebook's:
   3,000 names of other cells (IPython's `_i1`, `_i2`, ...), a list of 1,000 earlier results and a dict of
   200 lists of 30 tensors: µs per trace each, and their ratio.

`--baseline CHECKOUT` runs the same under another checkout's interlace, in a process of its own, after this one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.environ.get("INTERLACE_CHECKOUT") or str(Path(__file__).resolve().parents[1]))
import interlace  # noqa: E402
from overhead import quantile, small_gpt2  # noqa: E402

REPEATS = 60
OTHER_LINES = 3000

RECORD = """
with net.trace(input_ids=ids, early_stop=False):
    start = clock()
    for i in range(64):
        net.transformer.h[i % 2].output[:, -1] += steer
    took = (clock() - start) / 64
"""

TRACE = """
start = clock()
with net.trace(input_ids=ids, early_stop=False):
    kept = net.transformer.h[1].output.save()
took = clock() - start
"""


def timed(source: str, filename: str, scope: dict):
    """A callable that runs module-level `source` in `scope` and returns the µs it left in `took`."""
    code = compile(source, filename, "exec")

    def run():
        exec(code, scope)
        return scope["took"] * 1e6
    return run


def recording_cost(net, ids, steer, lines_before: int):
    """The loop of 64 edits after `lines_before` lines of a script's top level (µs per edit)."""
    filler = "".join(f"unused_{n} = {n}\n" for n in range(lines_before))
    scope = {"net": net, "ids": ids, "steer": steer, "clock": time.thread_time}
    return timed(filler + RECORD, f"script_{lines_before}.py", scope)


def trace_cost(net, ids, notebook: bool):
    """A trace at a cell's top level, in a scope of a few names or of a long notebook's (µs per trace)."""
    scope = {"net": net, "ids": ids, "clock": time.thread_time}
    if notebook:
        scope.update({f"_i{n}": f"cell {n}" for n in range(OTHER_LINES)})
        scope["acts"] = [torch.zeros(2) for _ in range(1000)]
        scope["by_prompt"] = {p: [torch.zeros(2) for _ in range(30)] for p in range(200)}
    return timed(TRACE, "cell.py", scope)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", metavar="CHECKOUT", help="then run the same under this checkout's interlace")
    options = parser.parse_args()
    torch.set_num_threads(1)
    module, ids = small_gpt2(2)
    net = interlace.Model(module)
    steer = torch.full((64,), 0.01)
    rows = {
        "record an edit, top of the script (µs)": recording_cost(net, ids, steer, 0),
        f"record an edit, after {OTHER_LINES:,} lines (µs)": recording_cost(net, ids, steer, OTHER_LINES),
        "a trace saving one output, 10 names in scope (µs)": trace_cost(net, ids, False),
        "the same trace, a notebook's scope (µs)": trace_cost(net, ids, True),
    }
    times: dict[str, list[float]] = {name: [] for name in rows}
    for repeat in range(REPEATS + 5):
        for name, run in rows.items():
            took = run()
            if repeat >= 5:  # (warmup)
                times[name].append(took)
    print(f"interlace {interlace.__file__}")
    costs = {name: quantile(values, 0.25) for name, values in times.items()}
    for name, cost in costs.items():
        print(f"{name:55s} {cost:9.1f}")
    (top, late), (few, many) = list(costs.values())[:2], list(costs.values())[2:]
    print(f"late in the script / at its top: {late / top:.2f}x; a notebook's scope / a small one: {many / few:.2f}x")
    if options.baseline:
        subprocess.run([sys.executable, __file__], env={**os.environ, "INTERLACE_CHECKOUT": options.baseline},
                       check=True)


if __name__ == "__main__":
    main()
