"""What running on a server costs: a small job remote over loopback vs the same trace here, and jobs/s.

Run `python benchmarks/remote.py [--model tiny] [--repeats 30] [--jobs 96]`. It starts two `interlace
serve` processes on 127.0.0.1 (its own key database in a temporary folder), loads the same model here, and prints,
all measured in this run:

1. The small job (save one layer's last position) run locally and remotely, alternating, median of
   repeats; the difference is what remote adds. Where that time goes: serializing the request,
   the job on the server (from its start and finish times), reading the result, and the rest (HTTP
   over loopback, queueing, waking the waiting request).
2. Jobs per second and per-job latency (median, 95th percentile) with 1, 4 and 16 concurrent
   clients (threads, each with its own key), on a server that batches users' jobs (the default)
   and on one that runs them one at a time (`--batch-jobs 1`), against the local rate of the same
   trace run one after another.

Model: the embedded SmolLM2-135M (default) or a tiny random GPT-2 (`--model tiny`).

On a small machine the model's OpenMP threads keep spinning after each job and compete with the HTTP
loop for the cores; `OMP_WAIT_POLICY=PASSIVE` in the server's environment gave back about 2 ms of
the remote overhead on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "server"))
import interlace  # noqa: E402
from interlace.backends.remote import RemoteBackend  # noqa: E402
from interlace.backends.serialize import deserialize_results, serialize_request  # noqa: E402
from interlace.graph import Request  # noqa: E402
from interlace.server.keys import KeyStore  # noqa: E402
from serving import Server  # noqa: E402

PROMPT = "The Eiffel Tower is in the city of"
CLIENTS = (1, 4, 16)


def _model(kind: str, folder: str):
    """(what `interlace serve` gets, the model loaded here, the layers' envoy path, the prompt)."""
    if kind == "tiny":
        from helpers import tiny, tiny_tokenizer

        path = os.path.join(folder, "tiny-gpt2")
        tiny("gpt2", positions=1024).save_pretrained(path)  # (long generations: streaming.py --tokens 512)
        tiny_tokenizer().save_pretrained(path)
        return path, interlace.LanguageModel(path, dispatch=True), "transformer.h", "w5 w6 w7 w8 w9"
    return "smollm2", interlace.LanguageModel.default(dispatch=True), "model.layers", PROMPT


def _small_job(lm, layers: str, prompt: str, remote: bool):
    with lm.trace(prompt, remote=remote):
        hidden = lm.get(layers)[5 if layers == "model.layers" else 1].output[:, -1].save()
    return hidden


def _request(lm, layers, prompt) -> Request:
    with lm.trace(prompt) as tracer:
        lm.get(layers)[5 if layers == "model.layers" else 1].output[:, -1].save()
    return Request(tracer.graph, [tracer.spec(len(tracer.graph))])


def _median_ms(times) -> float:
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--jobs", type=int, default=96, help="jobs per throughput measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        source, local, layers, prompt = _model(args.model, folder)
        store = KeyStore(os.path.join(folder, "keys.db"))
        keys = [store.create(f"client{i}") for i in range(max(CLIENTS))]
        quotas = ("--rate", "100000", "--jobs-per-key", "64")
        server = Server(source, os.path.join(folder, "keys.db"), *quotas, ready_within=300)
        alone = Server(source, os.path.join(folder, "keys.db"), *quotas, "--batch-jobs", "1", ready_within=300)
        try:
            name = os.path.basename(source) if args.model == "tiny" else "smollm2"
            remote = interlace.LanguageModel(name, host=server.url, api_key=keys[0])
            _report(local, remote, server, alone, keys, name, layers, prompt, args)
        finally:
            server.stop()
            alone.stop()


def _report(local, remote, server, alone, keys, name, layers, prompt, args) -> None:
    for _ in range(3):  # warm both sides
        _small_job(local, layers, prompt, False), _small_job(remote, layers, prompt, True)
    here, there = [], []
    for _ in range(args.repeats):  # alternating, so both see the same machine
        start = time.perf_counter()
        _small_job(local, layers, prompt, False)
        here.append(time.perf_counter() - start)
        start = time.perf_counter()
        _small_job(remote, layers, prompt, True)
        there.append(time.perf_counter() - start)
    print(f"model: {name}; small job: save {layers}[..].output[:, -1]; median of {args.repeats}")
    print(f"{'':34}{'ms':>9}")
    print(f"{'local trace':34}{_median_ms(here):9.2f}")
    print(f"{'remote trace (loopback)':34}{_median_ms(there):9.2f}")
    print(f"{'remote adds':34}{_median_ms(there) - _median_ms(here):9.2f}   (ratio {_median_ms(there) / _median_ms(here):.2f}x)")

    # where the remote time goes
    request = _request(local, layers, prompt)
    client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {keys[0]}"})
    parts = {"serialize request": [], "HTTP round trip": [], "job on the server": [], "read result": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        data = serialize_request(request)
        parts["serialize request"].append(time.perf_counter() - start)
        start = time.perf_counter()
        response = client.post("/v1/jobs", params={"wait": 10, "model": name}, content=data)
        parts["HTTP round trip"].append(time.perf_counter() - start)
        start = time.perf_counter()
        deserialize_results(response.content)
        parts["read result"].append(time.perf_counter() - start)
        info = client.get(f"/v1/jobs/{response.headers['interlace-job']}").json()
        parts["job on the server"].append(info["finished"] - info["started"])
    print("where the remote time goes (median ms):")
    for part, times in parts.items():
        print(f"  {part:32}{_median_ms(times):9.2f}")
    overhead = _median_ms(parts["HTTP round trip"]) - _median_ms(parts["job on the server"])
    print(f"  {'HTTP + queue + wake (round trip - job)':32}{overhead:9.2f}")

    # throughput, with and without cross-user batching
    start = time.perf_counter()
    for _ in range(args.jobs):
        _small_job(local, layers, prompt, False)
    local_rate = args.jobs / (time.perf_counter() - start)
    print(f"\njobs per second and per-job latency ({args.jobs} jobs each; local: the same trace run here, "
          f"{local_rate:.1f} jobs/s)")
    print(f"{'clients':>8}{'server':>18}{'jobs/s':>9}{'vs local':>10}{'median ms':>11}{'p95 ms':>9}")
    rates = {}
    for clients in CLIENTS:
        for label, url in (("one at a time", alone.url), ("batched", server.url)):
            backends = [RemoteBackend(url, key, model=name, progress=False) for key in keys]

            def job(number):
                begun = time.perf_counter()
                backends[number % clients].run(request)
                return time.perf_counter() - begun

            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(job, range(clients)))  # warm: connections open, threads started
                start = time.perf_counter()
                latencies = sorted(pool.map(job, range(args.jobs)))
                rate = args.jobs / (time.perf_counter() - start)
            rates[clients, label] = rate
            p95 = latencies[min(len(latencies) - 1, round(0.95 * len(latencies)))]
            print(f"{clients:>8}{label:>18}{rate:9.1f}{rate / local_rate:10.2f}{_median_ms(latencies):11.1f}"
                  f"{p95 * 1000:9.1f}")
    for clients in CLIENTS:
        print(f"batched / one at a time, {clients:2} clients: "
              f"{rates[clients, 'batched'] / rates[clients, 'one at a time']:.2f}x")

if __name__ == "__main__":
    main()
