"""How long a short generation waits when a server batches it with a long one.

Run `python benchmarks/batched_generation.py [--tokens 200] [--repeats 5]`. It starts an `interlace serve`
process on 127.0.0.1 (a tiny random Llama, its own key database in a temporary folder) that batches two
jobs at a time, and two users: one asks for a generation that makes its end token at step 2, the other for
one that never does (`--tokens` steps). It prints, as medians over rounds that alternate the two ways, the
time from a job's start to its end as the server records them (`started`, `finished`; not the wait for a
companion before its batch starts, which is `--batch-wait` for a job alone):

- the short job alone;
- the same job batched with the long one (both submitted together), and the long job.

A job of a shared batch is answered at its own last step, so the batched short job should take about what
it takes alone (plus the longer forward of a batch of two), not what the long one takes. `--baseline
CHECKOUT` runs the same rounds on a second server started from another checkout (`git worktree add
/tmp/base <commit>`), to compare a change in one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "server"))
import interlace  # noqa: E402
from helpers import tiny, tiny_tokenizer  # noqa: E402
from interlace.backends.remote import RemoteBackend  # noqa: E402
from interlace.graph import Request  # noqa: E402
from interlace.server.keys import KeyStore  # noqa: E402
from serving import Server, program_from  # noqa: E402

SHORT, LONG = "w9 w2 w7", "w1 w2 w3"  # prompts of one length: a server batches them


def _model(folder: str) -> interlace.LanguageModel:
    tiny("llama", positions=4096).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return interlace.LanguageModel(folder)


def _request(lm, prompt: str, tokens: int, end: int) -> Request:
    with lm.generate(prompt, max_new_tokens=tokens, eos_token_id=end) as tracer:
        lm.generator.output.save()
    return Request(tracer.graph, [tracer.spec(len(tracer.graph))])


def _end_token(lm, tokens: int) -> int:
    """The short prompt's third new token: the long prompt must not make it in `tokens` steps."""
    def made(prompt):
        with lm.generate(prompt, max_new_tokens=tokens) as tracer:
            out = lm.generator.output.save()
        return out[0, 3:].tolist()

    end = made(SHORT)[2]
    if end in made(SHORT)[:2] or end in made(LONG):
        raise SystemExit(f"token {end} does not end only the short generation: change the prompts or --tokens")
    return end


def _ran(job) -> float:
    """Seconds from the job's start to its end, on the server."""
    job.result(timeout=120)
    info = job.status()
    return info["finished"] - info["started"]


def _round(backends, short: Request, long: Request) -> tuple[float, float, float]:
    """(short alone, short batched, long batched): seconds each ran."""
    alone = _ran(backends[0].run(short, blocking=False))
    jobs = [backends[0].run(short, blocking=False), backends[1].run(long, blocking=False)]
    return alone, _ran(jobs[0]), _ran(jobs[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=200, help="steps of the long generation")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", metavar="CHECKOUT", help="also a server from this checkout, in the same rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = tempfile.mkdtemp()
    folder = os.path.join(root, "tiny-llama")
    lm = _model(folder)
    end = _end_token(lm, args.tokens)
    short, long = _request(lm, SHORT, args.tokens, end), _request(lm, LONG, args.tokens, end)
    store = KeyStore(os.path.join(root, "keys.db"))
    keys = [store.create(f"user{number}") for number in range(2)]
    checkouts = {"this checkout": None}
    if args.baseline:
        checkouts["baseline"] = str(Path(args.baseline).resolve())
    flags = ("--batch-jobs", "2", "--batch-wait", "0.3", "--max-new-tokens", str(args.tokens), "--name", "tiny")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    servers = {}
    try:
        for name, checkout in checkouts.items():
            servers[name] = Server(folder, os.path.join(root, "keys.db"), *flags, env=env,
                                   program=program_from(checkout))
        backends = {name: [RemoteBackend(server.url, key, model="tiny", progress=False) for key in keys]
                    for name, server in servers.items()}
        times = {name: [] for name in servers}
        for _ in range(args.repeats + 1):  # (the first round warms the servers up)
            for name in servers:
                times[name].append(_round(backends[name], short, long))
        print(f"tiny Llama; the short job ends at step 2, the long one runs {args.tokens} steps; "
              f"median of {args.repeats} rounds")
        print(f"{'server':16}{'short alone ms':>16}{'short batched ms':>18}{'long batched ms':>17}{'batched / alone':>17}")
        for name, rounds in times.items():
            alone, batched, whole = (statistics.median(r[i] for r in rounds[1:]) * 1000 for i in range(3))
            print(f"{name:16}{alone:16.1f}{batched:18.1f}{whole:17.1f}{batched / alone:16.2f}x")
    finally:
        for server in servers.values():
            server.stop()


if __name__ == "__main__":
    main()
