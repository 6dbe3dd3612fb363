"""How much does interlace cost on top of a plain PyTorch forward?

Run `python benchmarks/overhead.py [--quick]`. Everything is measured in one run, side by side:
each repeat runs every variant of a row once in turn (so drift hits all of them alike), and a row
reports the median over repeats, after warmup. Four sections:

0. Per item (`--fit-only` runs this alone): on GPT-2s 64 wide with 2 and 64 blocks (16 tokens,
   early stop off everywhere), the empty trace, and k saves or k steering edits
   (`output[:, -1] += c`) of k blocks for several k, as raw hooks (registered and removed per call; a save keeps the output)
   and as interlace; a least-squares line through (k, time - bare forward) gives fixed µs + µs per
   item, so a regression shows in one run. The empty trace is also timed at the forward's edges (`edge_times`:
   the time outside the model's forward, trace against bare forward in shuffled pairs; `edges.py` takes it
   apart), which leaves the forward's noise out of it: on 64 blocks that is the precise figure, the other the
   difference of two noisy quartiles.
   With a venv holding nnsight (`.venv-nnsight/`, or the
   python named by `$NNSIGHT_PYTHON`; torch==2.13.0 installed first, then `nnsight==0.8.1
   "transformers==5.*"`) the same work runs there under nnsight, with its own bare forward measured
   beside it; else that column is skipped. `--baseline CHECKOUT` runs it once more under another
   checkout's interlace (`git worktree add /tmp/base <commit>`), with this script's harness, in a
   process of its own (it runs after this one: compare each column's µs per item over its own raw hooks). CPU time of this thread, one torch thread, lower quartile
   of the repeats (these machines are shared: neighbours only add time, to wall time most of all);
   "mean" fits the mean instead, which also counts what comes now and then, as the garbage
   collector's full passes do.

1. Per model (a 12-block MLP and a random-weight GPT-2 small, 128 tokens; the real SmolLM2-135M at
   batch 1 and 8, 16 and 128 tokens) and scenario (save every
   block's output; save the last block's; add a constant in place to the middle block's output and
   save the model output; save block 2 with early stop): the bare forward, the same work done by
   hand with `register_forward_hook` (outputs kept by reference in a dict handed back per run, like `.save()`; stopping by raising
   from the hook where interlace stops early), and interlace, with the ratios interlace/raw and
   interlace/bare. Bare and raw run under `torch.no_grad` (interlace does so itself when the graph
   needs no backward).
2. Fixed cost on a tiny model (Linear(4, 4)): an empty trace, and a trace saving only the root
   output minus the bare forward.
3. Scaling with graph size (1, 16, 256 nodes: the tiny model's output, a chain of `h = h + 1`, a
   `.save()`): recording = the `with` body alone; executing = the whole block minus the body minus
   the bare forward (so it includes entering and leaving the trace, hooks and running the graph).

Extending: a model is a `ModelSpec` built by a function in `MODELS`; scenarios are
`(name, make_raw, make_interlace)` triples in `SCENARIOS`. A new section (say `--smollm2`) adds a
spec function and calls `model_rows(spec, repeats, warmup)`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import subprocess
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

# run from a checkout without installing; `--baseline` runs this script with another checkout's interlace
sys.path.insert(0, os.environ.get("INTERLACE_CHECKOUT") or str(Path(__file__).resolve().parents[1]))
import interlace  # noqa: E402


@dataclass
class ModelSpec:
    name: str
    module: torch.nn.Module
    layers: list[str]  # module paths of the blocks, in order
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    tuple_output: bool = field(init=False, default=False)  # blocks return (hidden, ...), not a tensor?

    def __post_init__(self):
        if self.layers:
            seen = []
            handle = self.block(0).register_forward_hook(lambda m, a, out: seen.append(out))
            with torch.no_grad():
                self.forward()
            handle.remove()
            self.tuple_output = isinstance(seen[0], tuple)

    def forward(self):
        return self.module(*self.args, **self.kwargs)

    def trace(self, net, **options):
        return net.trace(*self.args, **self.kwargs, **options)

    def block(self, index: int) -> torch.nn.Module:
        return self.module.get_submodule(self.layers[index])


def mlp_spec(layers: int = 12, width: int = 512, tokens: int = 128) -> ModelSpec:
    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU()) for _ in range(layers)]
    module = torch.nn.Sequential(*blocks).eval()
    return ModelSpec(f"MLP {layers}x{width}", module, [str(i) for i in range(layers)], (torch.randn(tokens, width),))


def gpt2_spec(tokens: int = 128) -> ModelSpec:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config()
    module = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, tokens))
    paths = [f"transformer.h.{i}" for i in range(config.n_layer)]
    return ModelSpec("GPT-2 small (random)", module, paths, kwargs={"input_ids": ids})


@functools.lru_cache(maxsize=1)
def _smollm2():
    return interlace.LanguageModel.default(dispatch=True).module


def smollm2_spec(batch: int, tokens: int) -> ModelSpec:
    """The embedded real SmolLM2-135M (30 blocks), random token ids."""
    module = _smollm2()
    torch.manual_seed(0)
    ids = torch.randint(0, module.config.vocab_size, (batch, tokens))
    paths = [f"model.layers.{i}" for i in range(module.config.num_hidden_layers)]
    return ModelSpec(f"SmolLM2 b{batch} s{tokens}", module, paths, kwargs={"input_ids": ids})


MODELS = {
    "mlp": mlp_spec,
    "gpt2": gpt2_spec,
    **{f"smollm2-b{b}-s{t}": functools.partial(smollm2_spec, b, t) for b in (1, 8) for t in (16, 128)},
}
DEFAULT_MODELS = "mlp,gpt2,smollm2-b1-s16,smollm2-b1-s128,smollm2-b8-s16,smollm2-b8-s128"


# -- scenarios: each maker returns a zero-argument callable doing one run ------------------------
class _Stop(Exception):
    pass


def _hidden(spec, out):
    return out[0] if spec.tuple_output else out


def _with_hooks(spec, hooks):
    """The bare forward under no_grad with `{layer index: hook}` registered, removed after."""
    def run():
        handles = [spec.block(i).register_forward_hook(h) for i, h in hooks.items()]
        try:
            with torch.no_grad():
                return spec.forward()
        except _Stop:
            return None
        finally:
            for handle in handles:
                handle.remove()
    return run


def _keep(store, i, stop=False):
    """A hook storing the output (by reference, as interlace's .save() does), then maybe stopping."""
    def hook(module, args, out):
        store[i] = out
        if stop:
            raise _Stop
    return hook


def raw_save(spec, layers, stop=False):
    """Hooks that keep the outputs in a dict made for each run and handed back, as interlace hands back its
    saved values: a dict kept across runs would hold a run's tensors until the next run replaced them, which
    changes the allocator's work (saving every SmolLM2 layer at 8x128: 30-60 ms a run, either way)."""
    layers = [i % len(spec.layers) for i in layers]
    last = max(layers)

    def run():
        store = {}
        _with_hooks(spec, {i: _keep(store, i, stop and i == last) for i in layers})()
        return store
    return run


def raw_add_middle(spec):
    def hook(module, args, out):
        _hidden(spec, out).add_(1.0)
    return _with_hooks(spec, {len(spec.layers) // 2: hook})


def il_save(spec, net, layers, **options):
    def run():
        with spec.trace(net, **options):
            saved = [net.get(spec.layers[i]).output.save() for i in layers]
        return saved
    return run


def il_add_middle(spec, net):
    def run():
        with spec.trace(net):
            _hidden(spec, net.get(spec.layers[len(spec.layers) // 2]).output).add_(1.0)
            out = net.output.save()
        return out
    return run


# (name, make_raw(spec), make_interlace(spec, net)). Saving the last block with early stop on skips
# whatever follows it (GPT-2: ln_f and the LM head), so the overhead rows turn it off.
SCENARIOS = [
    ("save every layer (no early stop)", lambda s: raw_save(s, range(len(s.layers))),
     lambda s, n: il_save(s, n, range(len(s.layers)), early_stop=False)),
    ("save last layer (no early stop)",
     lambda s: raw_save(s, [-1]), lambda s, n: il_save(s, n, [-1], early_stop=False)),
    ("save last layer (early stop; raw stops too)",
     lambda s: raw_save(s, [-1], stop=True), lambda s, n: il_save(s, n, [-1])),
    ("add 1 in place to middle layer, save output", raw_add_middle, il_add_middle),
    ("save layer 2 (early stop; raw stops too)",
     lambda s: raw_save(s, [2], stop=True), lambda s, n: il_save(s, n, [2])),
]


# -- timing ---------------------------------------------------------------------------------------
def timings(fns: dict, repeats: int, warmup: int, clock=time.perf_counter) -> dict:
    """Seconds of each call, per callable; each repeat calls every callable once, in turn."""
    times = {name: [] for name in fns}
    for rep in range(warmup + repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            if rep >= warmup:
                times[name].append(clock() - start)
    return times


def quantile(times: list, q: float) -> float:
    return sorted(times)[int(q * (len(times) - 1))]


def side_by_side(fns: dict, repeats: int, warmup: int, clock=time.perf_counter, q: float = 0.5) -> dict:
    """Seconds per callable (the median, or another quantile) of `timings`."""
    return {name: quantile(ts, q) for name, ts in timings(fns, repeats, warmup, clock).items()}


def bare(spec):
    def run():
        with torch.no_grad():
            return spec.forward()
    return run


def model_rows(spec: ModelSpec, repeats: int, warmup: int) -> list[list[str]]:
    net = interlace.Model(spec.module)
    rows = []
    for name, make_raw, make_il in SCENARIOS:
        t = side_by_side({"bare": bare(spec), "raw": make_raw(spec), "il": make_il(spec, net)}, repeats, warmup)
        rows.append([spec.name, name, *(f"{t[k] * 1e3:.2f}" for k in ("bare", "raw", "il")),
                     f"{t['il'] / t['raw']:.3f}", f"{t['il'] / t['bare']:.3f}"])
    return rows


def tiny():
    """A Linear(4, 4) as (interlace model, input, bare forward)."""
    torch.manual_seed(0)
    module, x = torch.nn.Linear(4, 4).eval(), torch.randn(1, 4)
    return interlace.Model(module), x, bare(ModelSpec("Linear(4, 4)", module, [], (x,)))


def fixed_cost_rows(repeats: int, warmup: int) -> list[list[str]]:
    net, x, bare_forward = tiny()

    def empty():
        with net.trace(x):
            pass

    def save_root():
        with net.trace(x):
            out = net.output.save()
        return out

    t = side_by_side({"bare": bare_forward, "empty": empty, "root": save_root}, repeats, warmup)
    return [["empty trace (`with net.trace(x): pass`)", f"{t['empty'] * 1e6:.1f}"],
            ["bare forward, no_grad", f"{t['bare'] * 1e6:.1f}"],
            ["save root output - bare forward", f"{(t['root'] - t['bare']) * 1e6:.1f}"]]


def _chain(net, x, size, report):
    """One trace of `size` nodes: the root output, size - 2 adds, a save; `report(body seconds)`.

    The trace's exit rebinds saved proxies in the caller's locals by walking every list, dict and
    tuple there, so this frame holds no growing container (`report` is a bound method)."""
    with net.trace(x) as tracer:
        start = time.perf_counter()
        h = net.output
        for _ in range(size - 1):
            h = h + 1
        if size > 1:
            h.save()
        report(time.perf_counter() - start)
    assert len(tracer.graph) == size


def scaling_rows(repeats: int, warmup: int, sizes=(1, 16, 256)) -> list[list[str]]:
    (net, x, bare_forward), bodies = tiny(), {size: [] for size in sizes}
    fns = {size: functools.partial(_chain, net, x, size, bodies[size].append) for size in sizes}
    t = side_by_side({"bare": bare_forward, **fns}, repeats, warmup)
    rows = []
    for size in sizes:
        record = statistics.median(bodies[size][warmup:])
        run = t[size] - record - t["bare"]
        rows.append([str(size), f"{record * 1e6:.1f}", f"{record / size * 1e6:.2f}", f"{run * 1e6:.1f}",
                     f"{run / size * 1e6:.2f}"])
    return rows


# -- per item: fixed µs + µs per save / edit ---------------------------------------------------------
FIT_COUNTS = {2: (0, 1, 2), 64: (0, 8, 16, 32, 64)}  # blocks -> numbers of saved or edited blocks
NNSIGHT_PYTHON = os.environ.get("NNSIGHT_PYTHON", str(Path(__file__).resolve().parents[1] / ".venv-nnsight/bin/python"))


def small_gpt2(layers: int):
    """A random GPT-2, 64 wide, and 16 token ids."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=64, n_head=4, n_positions=64, vocab_size=128,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval(), torch.randint(0, 128, (1, 16))


def _raw_items(module, ids, k: int, edit: bool, steer):
    kept = []  # a save keeps the output by reference, as `.save()` does

    def hook(mod, args, out):
        if edit:
            out[:, -1] += steer
        else:
            kept.append(out)

    def run():
        kept.clear()
        handles = [module.transformer.h[i].register_forward_hook(hook) for i in range(k)]
        try:
            with torch.no_grad():
                return module(input_ids=ids)
        finally:
            for handle in handles:
                handle.remove()
    return run


def _traced_items(net, ids, k: int, edit: bool, steer, options: dict | None = None):
    """k saves or k edits through a tracing library whose wrapper is `net` (interlace or nnsight); `options` of
    the trace (default: early stop off for this checkout's interlace, none for nnsight)."""
    if options is None:
        options = {"early_stop": False} if isinstance(net, interlace.Model) else {}

    def run():
        with net.trace(input_ids=ids, **options):
            for i in range(k):
                if edit:
                    net.transformer.h[i].output[:, -1] += steer
                else:
                    net.transformer.h[i].output.save()
    return run


def fit(points) -> tuple[float, float]:
    """Least squares a + b*k through [(k, y)]: (a, b)."""
    n = len(points)
    mean_k, mean_y = sum(k for k, _ in points) / n, sum(y for _, y in points) / n
    spread = sum((k - mean_k) ** 2 for k, _ in points)
    slope = sum((k - mean_k) * (y - mean_y) for k, y in points) / spread
    return mean_y - slope * mean_k, slope


def edge_times(module, sides: dict, rounds: int) -> dict:
    """{side: [ns outside the forward, per round]}: each side (a callable that calls `module`, the model) timed at the
    forward's edges, from the call to the model's forward starting and from the forward's end to the return (marked
    by hooks on the root, there for every side), one call of each side per round in a shuffled order, after two
    rounds of warmup; this thread's CPU time. The forward itself is left out of the clock, and with it its noise (on
    64 blocks the difference of two whole calls' quartiles moves by ±100 µs); what a side does inside the forward
    (its hooks) is not seen."""
    clock, marks = time.thread_time_ns, [0, 0]
    handles = [module.register_forward_pre_hook(lambda mod, args: marks.__setitem__(0, clock())),
               module.register_forward_hook(lambda mod, args, out: marks.__setitem__(1, clock()))]
    spent = {side: [] for side in sides}
    order = random.Random(0)
    try:
        for number in range(rounds + 2):
            for side in order.sample(list(sides), len(sides)):
                start = clock()
                sides[side]()
                end = clock()
                if number >= 2:
                    spent[side].append((marks[0] - start) + (end - marks[1]))
    finally:
        for handle in handles:
            handle.remove()
    return spent


def added_at_edges(spent: dict, side: str) -> float:
    """Median over rounds of `side`'s edges minus the bare forward's (`edge_times`), µs."""
    return statistics.median(t - b for t, b in zip(spent[side], spent["bare"])) / 1e3


def edge_costs(module, ids, net, rounds: int) -> tuple[float, float]:
    """What an empty trace adds at the forward's edges (`edge_times`), against the bare forward: (median of trace −
    bare, median of the bare forward's own edges), µs. Interlace's empty trace hooks nothing, so this is all it adds;
    nnsight's hooks every module (its column shows only the whole figure)."""
    spent = edge_times(module, {"bare": bare(ModelSpec("", module, [], kwargs={"input_ids": ids})),
                                "traced": _traced_items(net, ids, 0, False, None)}, rounds)
    return added_at_edges(spent, "traced"), statistics.median(spent["bare"]) / 1e3


def item_costs(wrap, repeats: int, warmup: int) -> dict:
    """{(blocks, "save"|"edit", "raw"|"traced"): (fixed µs, µs per item)}, {(blocks, "empty"): µs} and, for
    interlace, {(blocks, "edges"): `edge_costs`}.

    wrap(module) is the tracing library's wrapper (interlace.Model or nnsight.NNsight)."""
    torch.set_num_threads(1)
    costs = {}
    for layers, counts in FIT_COUNTS.items():
        module, ids = small_gpt2(layers)
        net, steer = wrap(module), torch.full((64,), 0.01)
        if wrap is interlace.Model:  # (nnsight's figure at the edges would leave out its hooks: not shown)
            costs[(layers, "edges")] = edge_costs(module, ids, net, 5 * repeats)  # (rounds: each is short)
        fns = {"bare": bare(ModelSpec("", module, [], kwargs={"input_ids": ids}))}
        for k in counts:
            for work in ("save", "edit"):
                fns[("raw", work, k)] = _raw_items(module, ids, k, work == "edit", steer)
                fns[("traced", work, k)] = _traced_items(net, ids, k, work == "edit", steer)
        times = timings(fns, repeats, warmup, clock=time.thread_time)
        for statistic, of in (("", lambda ts: quantile(ts, 0.25)), ("mean", statistics.fmean)):
            t = {key: of(ts) for key, ts in times.items()}
            added = {key: (value - t["bare"]) * 1e6 for key, value in t.items() if key != "bare"}
            costs[(layers, "empty", statistic)] = added[("traced", "save", 0)]
            for work in ("save", "edit"):
                for side in ("raw", "traced"):
                    costs[(layers, work, side, statistic)] = fit([(k, added[(side, work, k)]) for k in counts])
    return costs


def worker_costs(python: str, repeats: int, warmup: int, checkout: str | None = None):
    """`item_costs` in a process of its own: under nnsight, run by the nnsight venv's `python`, or under the
    interlace of another `checkout` (the same harness, this script). None when there is no such python or
    its run failed."""
    if not os.path.exists(python):
        return None
    what = "baseline" if checkout else "nnsight"
    env = {**os.environ, "INTERLACE_CHECKOUT": os.path.abspath(checkout)} if checkout else None
    command = [python, __file__, "--worker", what, str(repeats), str(warmup)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        print(f"({what} column skipped: its run failed)\n{done.stderr[-2000:]}")
        return None
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    return {tuple(key): value for key, value in rows}


def _worker(what: str, repeats: int, warmup: int) -> None:
    if what == "nnsight":
        import nnsight

        wrap, version = nnsight.NNsight, nnsight.__version__
    else:
        wrap, version = interlace.Model, os.environ["INTERLACE_CHECKOUT"]
    costs = item_costs(wrap, repeats, warmup)
    print(json.dumps([[list(key), value] for key, value in costs.items()] + [[["version"], version]]))


def item_rows(repeats: int, warmup: int, baseline: str | None = None) -> list[list[str]]:
    ours, theirs = item_costs(interlace.Model, repeats, warmup), worker_costs(NNSIGHT_PYTHON, repeats, warmup)
    before = worker_costs(sys.executable, repeats, warmup, baseline) if baseline else None

    def cell(costs, key, side, edges=True):
        if costs is None:
            return "—"
        if key[1] == "empty":
            whole = f"{costs[key + ('',)]:+.0f} (mean {costs[key + ('mean',)]:+.0f})"
            if not edges:  # (nnsight hooks every module: its empty trace adds time inside the forward too)
                return whole
            added, own = costs[(key[0], "edges")]
            return f"{whole}; at the edges +{added:.0f} (the bare forward's own {own:.0f})"
        (fixed, per), mean = costs[key + (side, "")], costs[key + (side, "mean")][1]
        return f"{fixed:+.0f} + {per:.1f}/item (mean {mean:.1f})"

    def baseline_cell(key):  # (with the raw hooks' µs per item of its own process, which ran at another time)
        if before is None or key[1] == "empty":
            return cell(before, key, "traced")
        return f"{cell(before, key, 'traced')} (raw there {before[key + ('raw', '')][1]:.1f}/item)"

    rows = []
    for layers in FIT_COUNTS:
        for work in ("empty", "save", "edit"):
            key = (layers, work)
            raw = "—" if work == "empty" else cell(ours, key, "raw")
            rows.append([f"GPT-2 {layers}x64", work, raw, cell(theirs, key, "traced", edges=False),
                         cell(ours, key, "traced")]
                        + ([baseline_cell(key)] if baseline else []))
    version = theirs[("version",)] if theirs else "not found"
    print(f"(nnsight: {version}" + (f"; baseline: interlace of {before[('version',)]})" if before else ")"))
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a rough check)")
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--fit-only", action="store_true", help="only the per-item section")
    parser.add_argument("--baseline", metavar="CHECKOUT",
                        help="also fit the per-item section under another checkout's interlace "
                             "(`git worktree add /tmp/base <commit>`), in a process of its own")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # run by worker_costs
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args.worker[0], int(args.worker[1]), int(args.worker[2]))
    repeats, warmup, small = (3, 1, 20) if args.quick else (11, 2, 200)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {repeats} after {warmup} "
          f"warmup, load average {os.getloadavg()[0]:.2f} at start (other processes skew timings)\n")
    fit_repeats = 15 if args.quick else 61
    print(table(["model", "work (early stop off)", "raw hooks µs", "nnsight µs", "interlace µs"]
                + (["baseline µs"] if args.baseline else []), item_rows(fit_repeats, warmup, args.baseline)))
    if args.fit_only:
        return
    rows = []
    for key in args.models.split(","):
        rows += model_rows(MODELS[key](), repeats, warmup)
    print("\n" + table(["model", "scenario", "bare ms", "raw hooks ms", "interlace ms", "interlace/raw",
                 "interlace/bare"], rows))
    print("\n" + table(["fixed cost (Linear(4,4))", "µs"], fixed_cost_rows(small, warmup)))
    print("\n" + table(["nodes", "record µs", "record µs/node", "execute µs", "execute µs/node"],
                       scaling_rows(small, warmup)))


if __name__ == "__main__":
    main()
