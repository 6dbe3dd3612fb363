"""What a trace costs on cold caches, counted rather than timed: the cache misses valgrind simulates.

Run `python benchmarks/misses.py [--rounds N]` (it needs valgrind, with its headers, and a C compiler:
`apt-get install valgrind gcc`). After a large model's forward the caches hold its weights, not interlace's
code and objects, so a trace's own work runs cold (see cold.py); timed, that costs tens of µs that move by as
much from one run to the next on a shared machine. Counted, it does not move: the script runs itself under
valgrind's callgrind with a simulated cache (I1 32 KB, D1 48 KB, last level 1 MB, this machine's per-core L2:
a miss there is a read from the shared L3 or from memory), streams 4 MB through it before each call, and
counts per call the instructions run and the last-level misses (code and data), for the bare forward, raw
PyTorch hooks (registered and removed per call, as in overhead.py) and interlace (early stop off), on 8
Linear(64, 64) layers (a forward small enough that its own misses, which vary by a few per cent from run
to run, hide nothing): the empty trace over the bare forward, and each extra save or steering edit
(`output[:, -1] += c`) over the same work by raw hooks, from the counts at 0 and 8 items. The empty trace's
row is the same within ~3 % from run to run; the per-item rows move by ~30 misses.

A miss costs ~20-30 ns on this machine (what a trace adds cold in cold.py and paired.py, less what it adds
warm, over these counts; TLB misses, which valgrind does not simulate, are in that too), so the misses, not
the instructions, are most of what a trace adds on a large model. `INTERLACE_CHECKOUT=/path` counts another
checkout's interlace (a commit to compare with).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHES = ["--I1=32768,8,64", "--D1=49152,12,64", "--LL=1048576,16,64"]
ITEMS = 8
STREAMED = 4 << 20  # bytes streamed through the caches before each call: four times the simulated last level

# collection on and off around each call, its counts zeroed after the warm-up and written out per variant
EXTENSION = """
#include <Python.h>
#include <valgrind/callgrind.h>
static PyObject *start(PyObject *m, PyObject *a) { CALLGRIND_START_INSTRUMENTATION; Py_RETURN_NONE; }
static PyObject *toggle(PyObject *m, PyObject *a) { CALLGRIND_TOGGLE_COLLECT; Py_RETURN_NONE; }
static PyObject *zero(PyObject *m, PyObject *a) { CALLGRIND_ZERO_STATS; Py_RETURN_NONE; }
static PyObject *dump(PyObject *m, PyObject *a) { CALLGRIND_DUMP_STATS; Py_RETURN_NONE; }
static PyMethodDef methods[] = {{"start", start, METH_NOARGS, 0}, {"toggle", toggle, METH_NOARGS, 0},
                                {"zero", zero, METH_NOARGS, 0}, {"dump", dump, METH_NOARGS, 0}, {0}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "callgrind_requests", 0, -1, methods};
PyMODINIT_FUNC PyInit_callgrind_requests(void) { return PyModule_Create(&module); }
"""


def variants():
    """[(name, run)] on 8 Linear(64, 64) layers, in the order their counts are written."""
    import torch

    sys.path.insert(0, os.environ.get("INTERLACE_CHECKOUT") or str(HERE.parent))
    sys.path.insert(1, str(HERE))
    import interlace
    from overhead import _raw_items, _traced_items

    class Layers(torch.nn.Module):
        """The layers under GPT-2's names and call (`transformer.h`, `input_ids=`): overhead.py's work runs on them."""

        def __init__(self):
            super().__init__()
            self.transformer = torch.nn.Module()
            self.transformer.h = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(ITEMS))

        def forward(self, input_ids):
            for layer in self.transformer.h:
                input_ids = layer(input_ids)
            return input_ids

    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = Layers().eval()
    net = interlace.Model(module)
    x, steer = torch.randn(1, 16, 64), torch.full((64,), 0.01)

    def bare():
        with torch.no_grad():
            module(input_ids=x)

    return [("bare forward", bare), ("empty trace", _traced_items(net, x, 0, False, steer))] + [
        (f"{side} {work}", make(*on, ITEMS, work == "edit", steer))
        for work in ("save", "edit") for side, make, on in (("raw", _raw_items, (module, x)),
                                                            ("interlace", _traced_items, (net, x)))]


def worker(extension_dir: str, rounds: int) -> None:
    """(Under valgrind.) Count every variant: warm up, zero the counts, run `rounds` calls, write them out."""
    import torch

    sys.path.insert(0, extension_dir)
    import callgrind_requests as requests

    runs = variants()
    stream = torch.zeros(STREAMED // 4)
    gc.disable()  # (a collection now and then would land on one variant's count)
    requests.start()
    for _, run in runs:
        for _ in range(10):  # (a function is specialized after 8 calls: the counts are of what runs from then on)
            run()
        requests.zero()
        for _ in range(rounds):
            stream.add_(1.0)
            requests.toggle()
            run()
            requests.toggle()
        requests.dump()
    print(json.dumps([name for name, _ in runs]))


def build_extension(where: str) -> None:
    source = Path(where, "callgrind_requests.c")
    source.write_text(EXTENSION)
    target = Path(where, "callgrind_requests" + sysconfig.get_config_var("EXT_SUFFIX"))
    include = sysconfig.get_paths()["include"]
    subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", "-O2", f"-I{include}", str(source), "-o",
                    str(target)], check=True)


def totals(path: Path) -> dict:
    """{event: count} of one callgrind dump."""
    lines = path.read_text().splitlines()
    events = next(line for line in lines if line.startswith("events:")).split()[1:]
    counts = next(line for line in lines if line.startswith(("totals:", "summary:"))).split()[1:]
    return dict(zip(events, map(int, counts)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="calls counted per variant")
    parser.add_argument("--worker", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.rounds)
    if shutil.which("valgrind") is None or not Path("/usr/include/valgrind/callgrind.h").exists():
        sys.exit("misses.py needs valgrind and its headers (`apt-get install valgrind`) and a C compiler")
    with tempfile.TemporaryDirectory() as where:
        build_extension(where)
        out = Path(where, "callgrind.out")
        command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--collect-atstart=no", "--cache-sim=yes",
                   *CACHES, f"--callgrind-out-file={out}", sys.executable, __file__, "--worker", where,
                   "--rounds", str(args.rounds)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"the run under valgrind failed:\n{done.stderr[-3000:]}")
        names = json.loads(done.stdout.strip().splitlines()[-1])
        dumps = sorted(Path(where).glob("callgrind.out.*"), key=lambda path: int(path.suffix[1:]))
        per_call = {}
        for name, dump in zip(names, dumps):
            count = totals(dump)
            per_call[name] = (count["Ir"] / args.rounds, count["ILmr"] / args.rounds,
                              (count["DLmr"] + count["DLmw"]) / args.rounds)
    report(per_call)


def report(per_call: dict) -> None:
    def row(label, counts):
        instructions, code, data = counts
        print(f"{label:<34}{instructions:>14,.0f}{code:>12,.0f}{data:>12,.0f}{code + data:>12,.0f}")

    def minus(a, b, per=1):
        return tuple((x - y) / per for x, y in zip(a, b))

    print(f"{'per call, after 4 MB streamed':<34}{'instructions':>14}{'code miss':>12}{'data miss':>12}{'misses':>12}")
    row("bare forward", per_call["bare forward"])
    row("empty trace, over the bare forward", minus(per_call["empty trace"], per_call["bare forward"]))
    for work in ("save", "edit"):
        raw = minus(per_call[f"raw {work}"], per_call["bare forward"], ITEMS)
        ours = minus(per_call[f"interlace {work}"], per_call["empty trace"], ITEMS)
        row(f"each {work}, raw hooks", raw)
        row(f"each {work}, interlace", ours)
        row(f"each {work}, interlace over raw", minus(ours, raw))


if __name__ == "__main__":
    main()
