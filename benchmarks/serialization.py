"""Size and round-trip time (serialize + deserialize) of the wire format.

Graphs of 10, 1,000 and 100,000 nodes (a module value, then a chain of `operator.add` calls), and a
request carrying one 4096x4096 float32 tensor; each with and without zstd. Times are the median of
a few runs. Run: `python benchmarks/serialization.py` (well under a minute on a laptop CPU).
"""

from __future__ import annotations

import statistics
import time

import torch

from interlace.backends.serialize import deserialize_graph, serialize_graph
from interlace.graph import Graph, Ref


def chain(n: int) -> Graph:
    graph = Graph()
    graph.add("module_value", "model.layers.0", kwargs={"kind": "output", "call": 0, "invoke": 0},
              location=("experiment.py", 1))
    for i in range(1, n):
        graph.add("call", "operator.add", (Ref(i - 1), 1.0), location=("experiment.py", 2))
    return graph


def tensor_request() -> Graph:
    graph = Graph()
    source = graph.add("module_value", "model.layers.0", kwargs={"kind": "output", "call": 0, "invoke": 0})
    patch = torch.randn(4096, 4096)
    graph.add("swap", args=(Ref(source.index), patch))
    return graph


def measure(graph: Graph, compress: bool, runs: int):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        data = serialize_graph(graph, [((torch.zeros(1, 8),), {})], compress=compress)
        middle = time.perf_counter()
        deserialize_graph(data)
        end = time.perf_counter()
        times.append((middle - start, end - middle))
    write = statistics.median(t[0] for t in times)
    read = statistics.median(t[1] for t in times)
    return len(data), write, read


def main() -> None:
    cases = [("10 nodes", chain(10), 7), ("1,000 nodes", chain(1_000), 7),
             ("100,000 nodes", chain(100_000), 3), ("4096x4096 float32", tensor_request(), 3)]
    print(f"{'request':<20} {'zstd':<5} {'bytes':>12} {'serialize':>11} {'deserialize':>12} {'round trip':>11}")
    for name, graph, runs in cases:
        for compress in (False, True):
            size, write, read = measure(graph, compress, runs)
            print(f"{name:<20} {'yes' if compress else 'no':<5} {size:>12,} {write * 1e3:>9.2f}ms "
                  f"{read * 1e3:>10.2f}ms {(write + read) * 1e3:>9.2f}ms")


if __name__ == "__main__":
    main()
