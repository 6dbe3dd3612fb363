"""What streaming costs and gains: time to first token and per-token latency, local vs remote, streamed vs not.

Run `python benchmarks/streaming.py [--model tiny] [--tokens 32] [--repeats 10]`. It starts an `interlace
serve` process on 127.0.0.1 (its own key database in a temporary folder), loads the same model here, and
runs one steered generation (a vector added to a middle layer's last position at every step, that
position saved per step in an `interlace.list()`) four ways, in a shuffled order each round, so all see the same machine:
local and remote (over loopback), each with and without `stream=True`. It prints medians of:

- time to first token: from the end of the `with` block to the first step in hand (without streaming,
  the first token comes with the last: the whole generation);
- per-token latency: the median time between steps (streamed), or the whole generation over its tokens;
- the whole generation, and its ratio to the local generation without streaming;
- the longest wait between two streamed tokens over all the rounds (a pause of the server's garbage
  collector, say, which medians hide);
- the streamed first token again, each way's generations in a row instead of alternating: the server
  then runs warm, as the local process does (see `_back_to_back`);
- the request itself: its nodes and bytes, `serialize_request` on the client, and admission on the
  server (reading and checking it, `HostedModel.admit`, and its batching group), which the front does
  once (its worker process, or Ray replica, gets the admitted request).

The server runs the model in a worker process, as `interlace serve` does by default; `--in-process`
keeps it in the server's process, to show what the hop to the worker costs.

`--baseline CHECKOUT` also starts a server from another checkout (`git worktree add /tmp/base <commit>`)
and runs both remote ways on it in the same rounds: this machine's neighbours move the first token by
several ms from one run to the next, so a change to the server is measured against its baseline in one
run (each server serving as many requests: one that served more would be warmer).

Model: the embedded SmolLM2-135M (default) or a tiny random GPT-2 (`--model tiny`). Both processes use
`--threads` intra-op threads (default 1): on a small loaded machine two OpenMP threads in the main thread
made a plain `generate` 5-10x slower than the same in another thread, which would credit streaming (a
thread) with what is the thread pool's doing. The server also gets `OMP_WAIT_POLICY=PASSIVE` (see
benchmarks/remote.py: spinning OpenMP threads slow its HTTP loop).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "server"))
import interlace  # noqa: E402
from interlace.backends.limits import Limits  # noqa: E402
from interlace.backends.serialize import serialize_request  # noqa: E402
from interlace.graph import Request  # noqa: E402
from interlace.server.hosting import HostedModel  # noqa: E402
from interlace.server.keys import KeyStore  # noqa: E402
from remote import _model  # noqa: E402 - the same models as the remote benchmark
from serving import Server, program_from  # noqa: E402


def _generate(lm, layers: str, prompt: str, tokens: int, *, remote: bool, stream: bool):
    """One steered generation; (seconds to the first token, per token, in all; the tokens; the longest wait
    between two tokens, None without streaming)."""
    layer = lm.get(layers)[len(lm.get(layers)) // 2]
    steer = torch.full((lm.config.hidden_size,), 0.01)
    with lm.generate(prompt, max_new_tokens=tokens, remote=remote, stream=stream) as tracer:
        hidden = interlace.list().save()
        with tracer.all():
            layer.output[:, -1] += steer
            hidden.append(layer.output[:, -1])
        out = lm.generator.output.save()
        start = time.perf_counter()  # the block ends right after this line: the run starts
    if not stream:  # every token comes at the end
        total = time.perf_counter() - start
        return total, total / tokens, total, out[0, -tokens:], None
    arrivals, got = [], []
    for step in tracer.stream():
        arrivals.append(time.perf_counter())
        got.append(int(step.tokens[0]))
    assert len(hidden) == tokens
    gaps = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]
    return arrivals[0] - start, statistics.median(gaps), time.perf_counter() - start, torch.tensor(got), max(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads, here and on the server")
    parser.add_argument("--in-process", action="store_true",
                        help="the server runs the model in its own process (default: in its worker process)")
    parser.add_argument("--baseline", metavar="CHECKOUT",
                        help="also run a server from another checkout (a worktree of an earlier commit, say) and "
                             "stream from both, alternating: a server-side change measured side by side")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        source, local, layers, prompt = _model(args.model, folder)
        store = KeyStore(os.path.join(folder, "keys.db"))
        key = store.create("bench")
        flags = ["--rate", "100000"] + (["--in-process"] if args.in_process else [])
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(args.threads)}
        name = os.path.basename(source) if args.model == "tiny" else "smollm2"
        servers, remotes = [], []
        try:
            for checkout in [None] + ([os.path.abspath(args.baseline)] if args.baseline else []):
                servers.append(Server(source, os.path.join(folder, "keys.db"), *flags, ready_within=300, env=env,
                                      program=program_from(checkout)))
                remotes.append(interlace.LanguageModel(name, host=servers[-1].url, api_key=key))
                remotes[-1]._remote.progress = False
            _report(local, remotes, name, layers, prompt, args)
        finally:
            for server in servers:
                server.stop()


def _report(local, remotes, name, layers, prompt, args) -> None:
    remote = remotes[0]
    ways = {"local": (local, False, False), "local, streamed": (local, False, True),
            "remote": (remote, True, False), "remote, streamed": (remote, True, True)}
    if len(remotes) > 1:  # (both ways, as for the server under test: each server then gets as many requests)
        ways["baseline"] = (remotes[1], True, False)
        ways["baseline, streamed"] = (remotes[1], True, True)
    for lm, is_remote, stream in ways.values():  # warm every path
        _generate(lm, layers, prompt, 4, remote=is_remote, stream=stream)
    first, per_token, total, longest = ({way: [] for way in ways} for _ in range(4))
    tokens = {}
    order, shuffler = list(ways), random.Random(0)
    for _ in range(args.repeats):
        # a shuffled order each round: a way that always followed another on its own server (remote streamed
        # after remote) would find it warm, one that never did (the baseline) cold; that alone moved the first
        # token by 2 ms between two servers running the same code
        shuffler.shuffle(order)
        for way in order:
            lm, is_remote, stream = ways[way]
            to_first, each, whole, got, gap = _generate(lm, layers, prompt, args.tokens, remote=is_remote, stream=stream)
            first[way].append(to_first)
            per_token[way].append(each)
            total[way].append(whole)
            longest[way].append(gap)
            tokens.setdefault(way, got)
    same = all(torch.equal(got, tokens["local"]) for got in tokens.values())
    print(f"model: {name}; {args.tokens} new tokens, steered at every step, one value saved per step; "
          f"median of {args.repeats}; server: model {'in its process' if args.in_process else 'in a worker process'}; "
          f"the same tokens every way: {same}")
    base = statistics.median(total["local"])
    print(f"{'':20}{'first token ms':>16}{'per token ms':>14}{'whole ms':>10}{'whole / local':>15}"
          f"{'longest wait ms':>17}")
    for way in ways:
        whole = statistics.median(total[way])
        wait = f"{max(longest[way]) * 1000:17.1f}" if longest[way][0] is not None else f"{'—':>17}"
        print(f"{way:20}{statistics.median(first[way]) * 1000:16.2f}{statistics.median(per_token[way]) * 1000:14.2f}"
              f"{whole * 1000:10.1f}{whole / base:15.2f}{wait}")
    local_first = statistics.median(first["local, streamed"]) * 1000
    print()
    for way in [way for way in ways if way.endswith(", streamed") and way != "local, streamed"]:
        label = "remote" if way == "remote, streamed" else f"baseline ({args.baseline})"
        print(f"{label} streamed first token - local streamed first token: "
              f"{statistics.median(first[way]) * 1000 - local_first:+.2f} ms")
    for where in ("local", "remote"):
        streamed = statistics.median(per_token[f"{where}, streamed"]) / statistics.median(per_token[where])
        print(f"{where}: per token, streamed / not streamed: {streamed:.2f}x; first token, streamed / not: "
              f"{statistics.median(first[f'{where}, streamed']) / statistics.median(first[where]):.2f}x")
    _back_to_back(local, remote, layers, prompt, args)
    _request_costs(local, layers, prompt, args.tokens)


def _back_to_back(local, remote, layers: str, prompt: str, args) -> None:
    """Streamed first token with each way's generations in a row rather than alternating. Alternating, the
    server sits idle while the client runs the local ways, and on a small shared machine code that ran
    after something else (or after a sleep) runs up to 2x slower for its first ms (a plain forward of the
    tiny model: 0.8 ms in a loop, 1.8-2.1 ms after a 20 ms sleep, a 20 ms busy loop or a 64 MB write).
    In a row, the server runs more often warm, as the local process does."""
    medians = {}
    for where, lm in (("local", local), ("remote", remote)):
        for _ in range(2):  # warm this way
            _generate(lm, layers, prompt, args.tokens, remote=where == "remote", stream=True)
        medians[where] = statistics.median(
            _generate(lm, layers, prompt, args.tokens, remote=where == "remote", stream=True)[0]
            for _ in range(args.repeats)) * 1000
    print(f"each way {args.repeats} times in a row, streamed first token: local {medians['local']:.2f} ms, remote "
          f"{medians['remote']:.2f} ms: remote - local {medians['remote'] - medians['local']:+.2f} ms")


def _request_costs(lm, layers: str, prompt: str, tokens: int) -> None:
    """The request of the steered generation: its size, and the time to write it and to admit it."""
    layer = lm.get(layers)[len(lm.get(layers)) // 2]
    with lm.generate(prompt, max_new_tokens=tokens) as tracer:
        hidden = interlace.list().save()
        with tracer.all():
            layer.output[:, -1] += torch.full((lm.config.hidden_size,), 0.01)
            hidden.append(layer.output[:, -1])
        lm.generator.output.save()
    request = Request(tracer.graph, [tracer.spec(len(tracer.graph))])
    hosted = HostedModel(lm, name="bench", limits=Limits())
    data = serialize_request(request)

    def admit():
        hosted.batching(hosted.admit(data), hosted.limits)

    def median_ms(run, times=100):
        run()
        spent = []
        for _ in range(times):
            start = time.perf_counter()
            run()
            spent.append(time.perf_counter() - start)
        return statistics.median(spent) * 1000

    print(f"request: {len(request.graph)} nodes ({len(request.graph.repeats)} repeated block(s)), {len(data)} bytes; "
          f"serialize_request {median_ms(lambda: serialize_request(request)):.2f} ms, admission "
          f"{median_ms(admit):.2f} ms")


if __name__ == "__main__":
    main()
