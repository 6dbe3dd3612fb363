"""What running a stranger's graph costs: planning at scale, loading, and untrusted vs local execution.

Run `python benchmarks/untrusted.py [--smollm2]`. Printed, all measured in this run:

1. Planning 100,000 nodes of each kind (stops, in-place changes down a chain of views, nodes guarded
   by a cond, a mix): the time to build the plan, and the time to load and check the same graph from
   bytes (`deserialize_request`, structure checks included).
2. The same request run locally (`untrusted=False`) and untrusted (`untrusted=True`: model checks, size
   rules before every call, write protection, deadline), side by side in a shuffled order each repeat,
   median CPU time of repeats (one torch thread unless --threads), with the ratio and the median of the
   per-repeat differences; on a 12-block MLP and, with --smollm2, on the embedded SmolLM2-135M. Untrusted
   twice: as `interlace serve` runs it (the model held, `ModelTree.hold`: each run's second line starts from
   what the last one read) and on a model that is not held (`Model.run(untrusted=True)` in a process whose
   other code may change the model between runs: every run reads everything at its start).
3. What the untrusted run's second line costs per run (`writes.Versions`: every weight's version
   counter read at the start and compared at the end; `state.Attachments`: hooks and instance
   attributes taken and put back), next to the untrusted run's own time.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import interlace  # noqa: E402
from interlace.backends.limits import Limits  # noqa: E402
from interlace.backends.plan import Plan  # noqa: E402
from interlace.backends.serialize import deserialize_request, serialize_graph  # noqa: E402
from interlace.backends.state import Attachments  # noqa: E402
from interlace.backends.tree import ModelTree  # noqa: E402
from interlace.backends.writes import Versions  # noqa: E402
from interlace.graph import Graph, Ref  # noqa: E402

N = 100_000


def _graph(kind: str) -> Graph:
    graph = Graph()
    value = graph.add("module_value", "0", kwargs={"kind": "output", "call": 0, "invoke": None}).index
    cond = graph.add("cond", args=(True,)).index
    for i in range(N - 2):
        choice = kind if kind != "mix" else ("stops", "views", "guards")[i % 3]
        if choice == "stops":
            graph.add("stop")
        elif choice == "views":
            value = graph.add("call", "operator.getitem", (Ref(value), slice(None))).index
            graph.add("call", "operator.iadd", (Ref(value), 1.0))
        else:
            graph.add("call", "operator.add", (Ref(value), 1.0), guard=cond)
    del graph.nodes[N:]
    return graph


def planning_rows() -> list[str]:
    rows = ["| 100,000 nodes | plan | load and check from bytes |", "|---|---|---|"]
    for kind in ("stops", "views", "guards", "mix"):
        graph = _graph(kind)
        start = time.perf_counter()
        Plan(graph, 0, len(graph))
        planned = time.perf_counter() - start
        data = serialize_graph(graph, [((torch.zeros(1, 4),), {})])
        start = time.perf_counter()
        deserialize_request(data, limits=Limits(max_nodes=N))
        loaded = time.perf_counter() - start
        rows.append(f"| {kind} | {planned * 1e3:.0f} ms | {loaded * 1e3:.0f} ms |")
    # a session plans each of its traces (at most max_traces): in spans, the same graph
    graph, spans = _graph("mix"), Limits().max_traces
    start = time.perf_counter()
    for span in range(spans):
        Plan(graph, span * N // spans, (span + 1) * N // spans)
    rows.append(f"| mix, as {spans} traces of a session | {(time.perf_counter() - start) * 1e3:.0f} ms | |")
    return rows


def _median(fn, repeats: int) -> float:
    """Median CPU time of this thread (a run is one thread; neighbours on a shared machine add wall time)."""
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return statistics.median(times)


def run_rows(name: str, model: interlace.Model, record, repeats: int) -> list[str]:
    """`record(model)` records a trace; its request runs locally and untrusted, alternating."""
    tracer = record(model)
    data = serialize_graph(tracer.graph, tracer.invokes, options=tracer.spec(0).options)
    request = deserialize_request(data)
    limits = Limits()
    local = lambda: model.run(request)  # noqa: E731
    untrusted = lambda: model.run(request, untrusted=True, limits=limits)  # noqa: E731
    ModelTree.hold(model.module)  # first as a server holds its model, then released
    try:
        held = _side_by_side(local, untrusted, repeats)
    finally:
        ModelTree.hold(model.module, False)
    not_held = _side_by_side(local, untrusted, repeats)
    row = f"| {name} | {len(tracer.graph)} | {held[0]:.2f} |"
    for local_ms, untrusted_ms, paired in (held, not_held):
        row += f" {untrusted_ms:.2f} | {untrusted_ms / local_ms:.3f} | {paired:+.2f} |"
    SECOND_LINE.append((name, model.module, not_held[1]))
    return [row]


def _side_by_side(local, untrusted, repeats: int) -> tuple[float, float, float]:
    """(local ms, untrusted ms, the median of the untrusted − local differences in ms), run in turns."""
    runs = [("local", local), ("untrusted", untrusted)]
    for _, fn in runs:
        fn()
    times = {"local": [], "untrusted": []}
    for _ in range(repeats):
        # in a shuffled order: run always second, the untrusted run read ~2% slow on SmolLM2 (its matmuls too,
        # which are the model's own), and a local run timed against itself the same way reads up to 1% apart
        random.shuffle(runs)
        for key, fn in runs:
            times[key].append(_median(fn, 1))
    paired = statistics.median(u - l for u, l in zip(times["untrusted"], times["local"]))
    return statistics.median(times["local"]) * 1e3, statistics.median(times["untrusted"]) * 1e3, paired * 1e3


SECOND_LINE: list = []  # (request, module, its untrusted run in ms), from run_rows


def second_line_rows(repeats: int) -> list[str]:
    rows = ["| model of the request | weights | version counters, ms | hooks and attributes, ms | "
            "both / untrusted run |", "|---|---|---|---|---|"]
    for name, module, run_ms in SECOND_LINE:
        versions = _median(lambda: Versions(module).changed(), repeats) * 1e3
        attachments = _median(lambda: Attachments(module).restore(), repeats) * 1e3
        count = len(Versions(module).versions)
        rows.append(f"| {name} | {count} | {versions:.3f} | {attachments:.3f} | {(versions + attachments) / run_ms:.3f} |")
    return rows


def _mlp_trace(net):
    x = torch.randn(16, 256)
    with net.trace(x) as tracer:
        for block in net:
            block.output[:, :8] *= 0.5
        hidden = [block.output.mean(0).save() for block in net]
        net.output.softmax(-1).save()
    return tracer


def _smollm2_trace(lm):
    with lm.trace("The Eiffel Tower is in the city of") as tracer:
        lm.model.layers[5].output[:, -1].save()
        lm.model.layers[10].output[:, -1] += 2.0
        lm.output.logits[:, -1].save()
    return tracer


def _smollm2_lens(lm):
    with lm.trace("The Eiffel Tower is in the city of") as tracer:
        for layer in (5, 10, 15, 20, 25):
            (lm.model.norm(lm.model.layers[layer].output[:, -1]) @ lm.lm_head.weight.T).argmax(-1).save()
    return tracer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", action="store_true", help="also the embedded SmolLM2-135M")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (on a small loaded machine two spinning OpenMP threads made a "
                             "0.2 ms MLP forward take 100 ms, drowning what is measured)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print("\n".join(planning_rows()))
    print()
    print("| request | nodes | local ms | held: untrusted ms | /local | − local, paired, ms | not held: untrusted ms "
          "| /local | − local, paired, ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    mlp = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU()) for _ in range(12)])
    print("\n".join(run_rows("MLP 12x256, steer every block, save 13", interlace.Model(mlp.eval()), _mlp_trace,
                             args.repeats)))
    if args.smollm2:
        lm = interlace.LanguageModel.default(dispatch=True)
        print("\n".join(run_rows("SmolLM2: save layer 5, steer layer 10, save logits", lm, _smollm2_trace,
                                 args.repeats)))
        print("\n".join(run_rows("SmolLM2: a logit lens through lm_head.weight", lm,
                                 _smollm2_lens, args.repeats)))
    print()
    print("\n".join(second_line_rows(args.repeats)))


if __name__ == "__main__":
    main()
