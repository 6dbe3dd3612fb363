"""What interlace's output hook costs per call inside a real forward, next to a hand-written hook doing the same.

Run `python benchmarks/hooks.py [--baseline CHECKOUT] [--rounds N]`. A random 64-block GPT-2, 64 wide, saves or
steers (`out[:, -1] += c`) every block's output; each hook call is timed on its own (`perf_counter_ns` around
it, the same wrapper around ours and the hand-written one), and the median and lower quartile per call are
printed with ours minus the hand-written one's.

Timed around the whole trace, a change of 1 µs per hook is lost in the forward's own spread (several µs per
block from one run to the next); timed around the hook alone, inside the forward (where the model's code
between two hooks leaves the caches cold, so a hook costs 3-4x what it costs in a loop), it shows in one run.
`--baseline CHECKOUT` loads that checkout's `interlace` too, in this process under another name (the package
imports itself only relatively), and times its hooks in the same rounds, alternating with this one's.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
import interlace  # noqa: E402
from overhead import _traced_items, quantile, small_gpt2  # noqa: E402

BLOCKS = 64


def timing(hook, sink: list):
    """`hook`, appending the ns each call took to `sink`."""
    def timed(module, inputs, output):
        start = time.perf_counter_ns()
        result = hook(module, inputs, output)
        sink.append(time.perf_counter_ns() - start)
        return result
    return timed


def time_hooks(package, sink: list) -> None:
    """Make `package`'s output hooks append the ns each call took to `sink`."""
    interleaver = importlib.import_module(f"{package.__name__}.backends.local").Interleaver
    make = interleaver._post_hook
    interleaver._post_hook = lambda self, *args: timing(make(self, *args), sink)


def load_baseline(checkout: str, into: str):
    """The `interlace` package of `checkout`, imported as `interlace_baseline` from a copy in `into`."""
    shutil.copytree(Path(checkout) / "interlace", Path(into) / "interlace_baseline")
    sys.path.insert(0, into)
    return importlib.import_module("interlace_baseline")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", metavar="CHECKOUT", help="also time another checkout's hooks, alternating")
    parser.add_argument("--rounds", type=int, default=200, help="traces per side and kind of work")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    module, ids = small_gpt2(BLOCKS)
    steer = torch.full((64,), 0.01)
    with tempfile.TemporaryDirectory() as scratch:
        packages = {"interlace": interlace}
        if args.baseline:
            packages["baseline"] = load_baseline(args.baseline, scratch)
        print(f"torch {torch.__version__}, 1 thread, GPT-2 {BLOCKS}x64, {args.rounds} traces each; "
              "µs per hook call inside the forward, median (lower quartile)\n")
        print("| work | hand-written hook | " + " | ".join(packages) + " |")
        print("|---|---|" + "---|" * len(packages), flush=True)
        times = {"raw": [], **{name: [] for name in packages}}
        for name, package in packages.items():
            time_hooks(package, times[name])
        for work in ("save", "edit"):
            runs = [_raw(module, ids, work, steer, times["raw"])]
            runs += [_traced_items(package.Model(module), ids, BLOCKS, work == "edit", steer, {"early_stop": False})
                     for package in packages.values()]
            for number in range(args.rounds):
                for run in runs if number % 2 else runs[::-1]:
                    run()
            medians = {name: statistics.median(ts) / 1e3 for name, ts in times.items()}
            cells = [f"{medians[name]:.2f} ({quantile(times[name], 0.25) / 1e3:.2f})" for name in times]
            cells[1:] = [f"{cell}, +{medians[name] - medians['raw']:.2f}" for cell, name in zip(cells[1:], packages)]
            print(f"| {work} | " + " | ".join(cells) + " |")
            for ts in times.values():
                ts.clear()


def _raw(module, ids, work: str, steer, sink: list):
    kept = []

    def hook(block, inputs, output):
        if work == "edit":
            output[:, -1] += steer
        else:
            kept.append(output)

    hook = timing(hook, sink)

    def run():
        kept.clear()
        handles = [module.transformer.h[i].register_forward_hook(hook) for i in range(BLOCKS)]
        try:
            with torch.no_grad():
                module(input_ids=ids)
        finally:
            for handle in handles:
                handle.remove()
    return run


if __name__ == "__main__":
    main()
